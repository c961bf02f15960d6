"""`tunelab rl RECIPE`: online RL of the policy against reward models and reward functions, KL-controlled.

For each prompt the trainer samples `num_generations` completions, scores each with
preference.rewards — `tunelab reward` runs (rebuilt exactly as trained, scoring prompt + completion
rendered with the chat template, as they were trained), built-in functions (exact_match, rouge,
length, regex) or your own (`python:module:function`), summed with their weights
(`evals/rewards.py`) — and moves the policy toward the better ones. preference.algorithm:

- `rloo` (Ahmadian et al. 2024, the default): each completion is baselined on the mean reward of the
  *others* for its prompt, which removes the per-prompt offset a Bradley–Terry reward model leaves
  arbitrary; trl 1.16 subtracts the KL penalty β·Σ_t (log π − log π_ref) from the reward itself, so
  the KL budget is paid in reward units, as in RLHF with PPO (trl removed PPO).
- `grpo` (Shao et al. 2024): advantages are the rewards minus their group mean, divided by the
  group's (or batch's) std (preference.scale_rewards), and the KL term sits in the loss; trl's loss
  variants by preference.grpo_loss (dapo, grpo, dr_grpo, bnpo, cispo, sapo). Suited to verifiable
  rewards (exact_match, a regex), where the std division is harmless; with a learned reward model it
  magnifies reward-model noise whenever a group's completions score alike — RLOO is the default.

The data: prompts with a reference answer (`data/preferences.load_prompts`): pairs (the chosen answer
is the reference) or chat examples (the last assistant turn). Per step, metrics.jsonl gets the mean
reward (and each reward's mean, for GRPO) and the KL to the reference (the starting policy);
before/after, every reward of greedy completions for the validation prompts and their weighted sum.
"""

from __future__ import annotations

from tunelab import lifecycle
from tunelab.config import Config
from tunelab.errors import TunelabError
from tunelab.lifecycle import Loaded, RunResult


def check(cfg: Config) -> None:
    """What rl needs beyond the schema, before any model loads."""
    from tunelab.evals.rewards import python_function
    from tunelab.models.reward_model import reward_run_problem

    p, t = cfg.preference, cfg.train
    problems = []
    if not p.reward_specs:
        problems.append("preference.rewards: required by tunelab rl: the `tunelab reward` run folder "
                        "(preference.reward_model) or reward functions, e.g. [exact_match, {reward_model: runs/rm}]")
    for spec in p.reward_specs:
        if spec.reward_model is not None and (problem := reward_run_problem(spec.reward_model)):
            problems.append(problem)
        elif spec.function is not None and spec.function.startswith("python:"):
            try:
                python_function(spec.function)
            except TunelabError as err:
                problems.append(str(err))
    rows, accum = t.planned(cfg.data.max_length)
    if (rows * accum) % p.num_generations:
        problems.append(f"train.batch_size: batch_size × grad_accum ({rows} × {accum}) counts "
                        f"completions and must be a multiple of preference.num_generations={p.num_generations}")
    if t.eval_every:
        problems.append("train.eval_every: tunelab rl evaluates before and after training only; unset it "
                        "(and early_stopping / load_best with it)")
    if cfg.eval.generation_samples == 0:
        problems.append("eval.generation_samples: rl measures the reward of generations for validation prompts; "
                        "set it to 1 or more")
    if problems:
        raise TunelabError("invalid config for tunelab rl:\n  - " + "\n  - ".join(problems))


def load(cfg: Config, sharded: bool = False) -> Loaded:
    from tunelab.data.preferences import load_prompts
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import resolve

    tokenizer = load_tokenizer(resolve(cfg.model.name), cfg.model.chat_template)
    return Loaded(tokenizer, load_prompts(cfg, tokenizer))


def build(cfg: Config, loaded: Loaded, args_for, callbacks):
    from tunelab.evals.rewards import build_rewards
    from tunelab.models.build import load_policy

    p = cfg.preference
    rewards = build_rewards(p.reward_specs)
    model, peft_config = load_policy(cfg, loaded.tokenizer)
    common = {"beta": p.kl_coef, "num_generations": p.num_generations, "max_completion_length": p.max_new_tokens,
              "temperature": p.temperature, "remove_unused_columns": False, "reward_weights": rewards.weights}
    # Rollouts go through tunelab's engine on the policy's current weights (inference/rollouts.py:
    # one trl method overridden; trl's own path stays for vLLM, several processes, other models).
    from tunelab.inference.rollouts import EngineRollouts, GrpoEngineRollouts

    if p.algorithm == "rloo":
        from trl import RLOOConfig as config_class, RLOOTrainer

        trainer_class = type("TunelabRLOO", (EngineRollouts, RLOOTrainer), {})
    else:
        from trl import GRPOConfig as config_class, GRPOTrainer

        trainer_class = type("TunelabGRPO", (GrpoEngineRollouts, GRPOTrainer), {})
        common.update(loss_type=p.grpo_loss, scale_rewards=p.scale_rewards)
    return trainer_class(
        model=model, reward_funcs=rewards.funcs, args=args_for(config_class, **common), train_dataset=loaded.data.train,
        processing_class=loaded.tokenizer, reward_processing_classes=rewards.processing_classes, callbacks=callbacks,
        peft_config=peft_config,
    )


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    from tunelab.evals.generation import generation_eval
    from tunelab.evals.rewards import Rewards, score

    examples = loaded.data.generation_rows()
    task, rows = generation_eval(
        trainer.model, trainer.processing_class, examples, cfg.eval.generation_samples, cfg.eval.metrics,
        cfg.preference.max_new_tokens, cfg.eval.batch_size, desc=f"generating ({label})",
    )
    rewards = Rewards(trainer.reward_funcs, trainer.reward_processing_classes, trainer.reward_weights.tolist(),
                      [spec.name for spec in cfg.preference.reward_specs])  # what the trainer scores with
    prompts = [example["messages"][:-1] for example in examples[: len(rows)]]
    references = [example["messages"][-1]["content"] for example in examples[: len(rows)]]
    scores = score(rewards, prompts, [row["prediction"] for row in rows], references, cfg.eval.batch_size)
    means = {name: sum(values) / len(values) for name, values in scores.items()}
    total = sum(w * means[name] for w, name in zip(rewards.weights, rewards.names))
    return {"reward": total, **({f"reward/{name}": v for name, v in means.items()} if len(means) > 1 else {}), **task}, rows


STAGE = lifecycle.Stage(
    name="rl",
    load=load,
    build=build,
    measure=measure,
    perplexity=False,
    curves={
        "reward": ("Reward", {"reward": "mean reward of the sampled completions"}),
        "kl": ("KL to the reference", {"kl": "per token"}),
    },
)


def run(cfg: Config) -> RunResult:
    check(cfg)
    return lifecycle.run(cfg, STAGE)
