"""`tunelab rl RECIPE`: online RL of the policy against a trained reward model, KL-controlled.

trl removed PPO; its online trainers are RLOO and GRPO. We use RLOO (Ahmadian et al. 2024): for
each prompt it samples `num_generations` completions, scores them with the reward model, and
baselines each on the mean reward of the *others*. That is sound with a learned reward model:
the baseline removes the per-prompt offset a Bradley–Terry reward model leaves arbitrary, and
trl 1.16 subtracts the KL penalty β·Σ_t (log π − log π_ref) from the reward itself, so the KL
budget is paid in reward units, as in RLHF with PPO. GRPO would instead divide advantages by the
group's reward std, which magnifies reward-model noise whenever a group's completions score
alike, and puts the KL term in the loss rather than in the reward.

The reward model is the `tunelab reward` run named by preference.reward_model, rebuilt exactly as
trained (`models.reward_model.load_reward_model`); trl scores prompt + completion rendered with its chat
template, as the reward model was trained. Per step, metrics.jsonl gets the mean reward and the
KL to the reference (the starting policy); before/after, the mean reward of greedy completions
for the validation prompts.
"""

from __future__ import annotations

import torch

from tunelab import lifecycle
from tunelab.config import Config
from tunelab.errors import TunelabError
from tunelab.lifecycle import Loaded, RunResult


def check(cfg: Config) -> None:
    """What rl needs beyond the schema, before any model loads."""
    from tunelab.models.reward_model import reward_run_problem

    p, t = cfg.preference, cfg.train
    problems = []
    if not p.reward_model:
        problems.append("preference.reward_model: required by tunelab rl; the run folder of `tunelab reward`")
    elif problem := reward_run_problem(p.reward_model):
        problems.append(problem)
    if (t.batch_size * t.grad_accum) % p.num_generations:
        problems.append(f"train.batch_size: batch_size × grad_accum ({t.batch_size} × {t.grad_accum}) counts "
                        f"completions and must be a multiple of preference.num_generations={p.num_generations}")
    if t.eval_every:
        problems.append("train.eval_every: tunelab rl evaluates before and after training only; unset it "
                        "(and early_stopping / load_best with it)")
    if cfg.eval.generation_samples == 0:
        problems.append("eval.generation_samples: rl measures the reward of generations for validation prompts; "
                        "set it to 1 or more")
    if problems:
        raise TunelabError("invalid config for tunelab rl:\n  - " + "\n  - ".join(problems))


def build(cfg: Config, loaded: Loaded, args_for, callbacks):
    from trl import RLOOConfig, RLOOTrainer

    from tunelab.models.build import load_policy
    from tunelab.models.reward_model import load_reward_model

    p = cfg.preference
    reward_model, reward_tokenizer = load_reward_model(p.reward_model)
    model, peft_config = load_policy(cfg, loaded.tokenizer)
    args = args_for(RLOOConfig, beta=p.kl_coef, num_generations=p.num_generations,
                    max_completion_length=p.max_new_tokens, temperature=p.temperature, remove_unused_columns=False)
    return RLOOTrainer(
        model=model, reward_funcs=reward_model, args=args, train_dataset=loaded.data.train.select_columns(["prompt"]),
        processing_class=loaded.tokenizer, reward_processing_classes=reward_tokenizer, callbacks=callbacks,
        peft_config=peft_config,
    )


@torch.no_grad()
def rewards(trainer, prompts: list[list[dict]], completions: list[str], batch_size: int) -> torch.Tensor:
    """The reward model's score of each prompt + completion, rendered as RLOO renders them."""
    from trl.data_utils import apply_chat_template

    model, tokenizer = trainer.reward_funcs[0], trainer.reward_processing_classes[0]
    texts = [apply_chat_template({"messages": p + [{"role": "assistant", "content": c}]}, tokenizer)["text"]
             for p, c in zip(prompts, completions)]
    scores = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(text=texts[start : start + batch_size], return_tensors="pt", padding=True,
                           padding_side="right", add_special_tokens=False).to(model.device)
        scores.append(model(**inputs).logits[:, 0].float().cpu())
    return torch.cat(scores)


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    from tunelab.evals.generation import generation_eval

    examples = loaded.data.generation_rows()
    task, rows = generation_eval(
        trainer.model, trainer.processing_class, examples, cfg.eval.generation_samples, cfg.eval.metrics,
        cfg.preference.max_new_tokens, cfg.eval.batch_size, desc=f"generating ({label})",
    )
    prompts = [example["messages"][:-1] for example in examples[: len(rows)]]
    scores = rewards(trainer, prompts, [row["prediction"] for row in rows], cfg.eval.batch_size)
    return {"reward": scores.mean().item(), **task}, rows


STAGE = lifecycle.Stage(
    name="rl",
    load=lifecycle.load_pairs,
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
