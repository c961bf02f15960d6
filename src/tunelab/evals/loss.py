"""Token-weighted validation loss and perplexity.

The Trainer's own evaluation averages per-batch mean losses, which over-weights short batches;
this sums the loss over every label token and divides once, so the number does not depend on
how rows were batched or packed.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from tunelab.data.templates import IGNORE_INDEX


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (B, T-1) and the mask of label tokens, for next-token prediction."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.masked_fill(~mask, 0).reshape(-1), reduction="none"
    ).view_as(targets)  # (B, T-1)
    return loss * mask, mask


@torch.no_grad()
def loss_sums(model, loader, desc: str = "validation loss") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-token loss and label-token count over a loader (sum them across ranks, then divide)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for batch in tqdm(loader, desc=desc, leave=False):
        loss, mask = token_losses(model, {k: v.to(device) for k, v in batch.items()})
        total += loss.sum().double()
        count += mask.sum()
    model.train(was_training)
    return total, count


def summarize(total: float, count: int) -> dict:
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": int(count)}
