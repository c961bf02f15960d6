"""Log-probabilities of answers under the policy and its reference, for the held-out metrics of
`tunelab dpo` (all its methods) and `tunelab kto`, computed exactly over every validation row by our
own loop (trl's evaluation averages per-batch means)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from tunelab.data.templates import IGNORE_INDEX
from tunelab.evals.loss import token_losses


def completion_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """A model batch whose labels are the answer tokens (trl's DPO and KTO collators mark them in completion_mask)."""
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)}


def answer_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's answer tokens (labels ≠ IGNORE_INDEX), and their count. (B,) each."""
    losses, mask = token_losses(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    return -losses.sum(-1), mask.sum(-1)


@contextmanager
def reference_model(trainer):
    """The model that gives log π_ref under trl's own rule: the trainer's ref_model, else the frozen `ref`
    copy of a continued adapter, else the policy with its adapter disabled."""
    from trl.trainer.utils import use_adapter

    if trainer.ref_model is not None:
        yield trainer.ref_model
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
        yield model


@torch.no_grad()
def eval_logps(trainer, sides: Callable[[dict], list[dict]], reference: bool = True) -> dict[str, torch.Tensor]:
    """Over the trainer's validation loader: for each side `sides(batch)` cuts a batch into (e.g. chosen
    and rejected), the policy's summed answer log-probs, the reference's (when `reference`) and the
    answer token counts; (sides, rows) each, on the CPU."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"policy": [], "tokens": [], **({"reference": []} if reference else {})}
    for batch in tqdm(trainer.get_eval_dataloader(), desc="validation log-probs", leave=False):
        cut = sides(trainer._prepare_inputs(batch))
        policy, tokens = zip(*(answer_logps(model, side) for side in cut))
        parts["policy"].append(torch.stack(policy).float())
        parts["tokens"].append(torch.stack(tokens).float())
        if reference:
            with reference_model(trainer) as ref:
                parts["reference"].append(torch.stack([answer_logps(ref, side)[0] for side in cut]).float())
    model.train(was_training)
    return {key: torch.cat(values, dim=1).cpu() for key, values in parts.items()}
