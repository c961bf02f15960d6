"""`tunelab dpo RECIPE`: direct preference optimisation (Rafailov et al. 2023) with trl's DPOTrainer.

LoRA/QLoRA: the reference is the starting model — the base with the adapter disabled for a fresh
adapter, or a frozen copy of the adapter when continuing a LoRA run (see `models.build.load_policy`);
full fine-tuning gets a second, frozen copy. Held-out metrics before and after, computed exactly
over every validation pair (trl's evaluation averages per-batch means):

- `reward_accuracy` / `reward_margin`: DPO's implicit reward β·(log π(y|x) − log π_ref(y|x)) of the
  chosen answer against the rejected one (ties count half: before training every pair ties);
- `logp_accuracy`: how often the policy itself gives the chosen answer the higher mean per-token
  log-probability — meaningful before training too;
- `loss`: the sigmoid DPO loss −log σ(reward margin), ln 2 ≈ 0.693 before training;
- the eval.metrics (ROUGE-L, …) of greedy generations against the chosen answers.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tunelab import lifecycle
from tunelab.config import Config
from tunelab.evals.pairs import pair_metrics
from tunelab.lifecycle import Loaded, RunResult


def build(cfg: Config, loaded: Loaded, args_for, callbacks):
    from trl import DPOConfig, DPOTrainer

    from tunelab.models.build import build_model, load_policy, model_options
    from tunelab.models.loading import resolve

    p, tokenizer, data = cfg.preference, loaded.tokenizer, loaded.data
    model, peft_config = load_policy(cfg, tokenizer)
    full = cfg.peft.method == "full"  # the frozen reference is a second copy of the starting model
    reference = build_model(resolve(cfg.model.name), tokenizer, **model_options(cfg)).eval() if full else None
    args = args_for(DPOConfig, beta=p.beta, loss_type=[p.loss_type], label_smoothing=p.label_smoothing,
                    max_length=cfg.data.max_length)
    return DPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config,
    )


def _answer_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's answer tokens, and their count. (2B,) each."""
    from tunelab.data.templates import IGNORE_INDEX
    from tunelab.evals.loss import token_losses

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    losses, mask = token_losses(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                        "labels": labels})
    return -losses.sum(-1), mask.sum(-1)


@torch.no_grad()
def answer_logps(trainer) -> dict[str, torch.Tensor]:
    """Per validation pair: log π and log π_ref of the chosen and the rejected answer, and token counts."""
    from trl.trainer.utils import use_adapter

    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {key: [] for key in ("policy", "reference", "tokens")}
    for batch in tqdm(trainer.get_eval_dataloader(), desc="validation log-probs", leave=False):
        batch = trainer._prepare_inputs(batch)
        policy, tokens = _answer_logps(model, batch)
        if trainer.ref_model is not None:
            reference, _ = _answer_logps(trainer.ref_model, batch)
        else:  # trl's own rule: the frozen `ref` copy of a continued adapter, else the adapter disabled
            with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                reference, _ = _answer_logps(model, batch)
        for key, value in (("policy", policy), ("reference", reference), ("tokens", tokens)):
            parts[key].append(torch.stack(value.float().chunk(2)))  # the collator stacks chosen over rejected
    model.train(was_training)
    return {key: torch.cat(values, dim=1).cpu() for key, values in parts.items()}  # (2, pairs): chosen, rejected


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    from tunelab.evals.generation import generation_eval

    logps = answer_logps(trainer)
    rewards = cfg.preference.beta * (logps["policy"] - logps["reference"])
    metrics = pair_metrics(rewards[0] - rewards[1], prefix="reward_")
    mean_logp = logps["policy"] / logps["tokens"].clamp(min=1)
    metrics["logp_accuracy"] = pair_metrics(mean_logp[0] - mean_logp[1])["accuracy"]
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
