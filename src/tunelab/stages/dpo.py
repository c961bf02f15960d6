"""`tunelab dpo RECIPE`: preference optimisation on chosen/rejected pairs, with or without a reference model.

preference.method picks the loss; the data, the recipe and the run folder stay the same, which is
why the reference-free methods are methods of this command rather than commands of their own:

- `dpo` (Rafailov et al. 2023), trl's DPOTrainer. LoRA/QLoRA: the reference is the starting model —
  the base with the adapter disabled for a fresh adapter, or a frozen copy of the adapter when
  continuing a LoRA run (see `models.build.load_policy`); full fine-tuning keeps a second, frozen
  copy of the whole model, the memory the next two save.
- `orpo` (Hong et al. 2024), trl's ORPOTrainer: the SFT loss on the chosen answer plus λ·(−log σ of
  the log odds ratio of chosen over rejected), λ = preference.beta; no reference model.
- `simpo` (Meng et al. 2024), trl's CPOTrainer with loss_type="simpo" and no SFT term (cpo_alpha=0):
  −log σ(β·(mean token log-prob of chosen − of rejected) − γ); no reference model.

Held-out metrics before and after, computed exactly over every validation pair:

- `logp_accuracy` / `logp_margin`: how often, and by how much, the policy gives the chosen answer the
  higher mean per-token log-probability (the quantity SimPO and ORPO push; meaningful before training);
- dpo: `reward_accuracy` / `reward_margin` of DPO's implicit reward β·(log π(y|x) − log π_ref(y|x)) of
  the chosen answer against the rejected one (ties count half: before training every pair ties);
- `loss`: the method's own loss on the validation pairs (sigmoid DPO: ln 2 ≈ 0.693 before training);
- the eval.metrics (ROUGE-L, …) of greedy generations against the chosen answers.
"""

from __future__ import annotations

from tunelab import lifecycle
from tunelab.config import Config
from tunelab.lifecycle import Loaded, RunResult


def _trainer_class(method: str):
    """(trainer class, config class, their method-specific arguments from preference.*)."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig, lambda p: {"beta": p.beta, "loss_type": [p.loss_type],
                                                 "label_smoothing": p.label_smoothing}
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, lambda p: {"beta": p.beta}
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig, lambda p: {"beta": p.beta, "loss_type": "simpo", "cpo_alpha": 0.0,
                                             "simpo_gamma": p.simpo_gamma}


def build(cfg: Config, loaded: Loaded, args_for, callbacks):
    from tunelab.models.build import build_model, load_policy, model_options
    from tunelab.models.loading import resolve

    p, tokenizer, data = cfg.preference, loaded.tokenizer, loaded.data
    trainer_class, config_class, method_args = _trainer_class(p.method)
    model, peft_config = load_policy(cfg, tokenizer)
    args = args_for(config_class, max_length=cfg.data.max_length, **method_args(p))
    extra = {}
    if p.method == "dpo":  # full fine-tuning: the frozen reference is a second copy of the starting model
        full = cfg.peft.method == "full"
        extra["ref_model"] = build_model(resolve(cfg.model.name), tokenizer, **model_options(cfg)).eval() if full else None
    return trainer_class(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        callbacks=callbacks, peft_config=peft_config, **extra,
    )


def _sides(method: str):
    """Cuts a validation batch of the method's collator into the chosen and the rejected answers."""
    from tunelab.evals.policy_logps import completion_labels

    if method == "dpo":  # DPO's collator stacks chosen over rejected, answers in completion_mask
        def sides(batch):
            return [completion_labels(*(batch[k].chunk(2)[half] for k in ("input_ids", "attention_mask", "completion_mask")))
                    for half in (0, 1)]
    else:  # ORPO's and CPO's: chosen_* and rejected_* sequences, the prompt's labels already masked
        def sides(batch):
            return [{"input_ids": batch[f"{s}_input_ids"], "attention_mask": batch[f"{s}_attention_mask"],
                     "labels": batch[f"{s}_labels"]} for s in ("chosen", "rejected")]
    return sides


def preference_metrics(logps: dict, cfg: Config) -> dict:
    """The held-out metrics of the module docstring from the log-probs of (chosen, rejected) answers."""
    import torch

    from tunelab.evals.pairs import pair_metrics

    p = cfg.preference
    mean = logps["policy"] / logps["tokens"].clamp(min=1)  # (2, pairs): mean per-token log-prob
    by_logp = pair_metrics(mean[0] - mean[1])
    metrics = {"logp_accuracy": by_logp["accuracy"], "logp_margin": by_logp["margin"]}
    if p.method == "dpo":
        rewards = p.beta * (logps["policy"] - logps["reference"])
        metrics.update(pair_metrics(rewards[0] - rewards[1], prefix="reward_"))
    elif p.method == "simpo":
        metrics["loss"] = -torch.nn.functional.logsigmoid(p.beta * (mean[0] - mean[1]) - p.simpo_gamma).mean().item()
    else:  # orpo: the chosen answer's NLL + λ·(−log σ(log odds chosen − log odds rejected)), odds = P / (1 − P)
        log_odds = mean - torch.log1p(-mean.exp().clamp(max=1 - 1e-7))
        ratio = -torch.nn.functional.logsigmoid(log_odds[0] - log_odds[1])
        metrics["loss"] = (-mean[0] + p.beta * ratio).mean().item()
    return metrics


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    from tunelab.evals.generation import generation_eval
    from tunelab.evals.policy_logps import eval_logps

    method = cfg.preference.method
    metrics = preference_metrics(eval_logps(trainer, _sides(method), reference=method == "dpo"), cfg)
    task, rows = generation_eval(
        trainer.model, trainer.processing_class, loaded.data.generation_rows(), cfg.eval.generation_samples,
        cfg.eval.metrics, cfg.eval.max_new_tokens, cfg.eval.batch_size, desc=f"generating ({label})",
    )
    return {**metrics, **task}, rows


STAGE = lifecycle.Stage(
    name="dpo",
    load=lifecycle.load_pairs,
    build=build,
    measure=measure,
    perplexity=False,
    curves={
        "rewards": ("Implicit rewards", {"rewards/chosen": "chosen", "rewards/rejected": "rejected",
                                         "rewards/margins": "margin", "eval_rewards/margins": "margin (validation)"}),
        "accuracy": ("Preference accuracy", {"rewards/accuracies": "train", "eval_rewards/accuracies": "validation"}),
    },
)


def run(cfg: Config) -> RunResult:
    return lifecycle.run(cfg, STAGE)
