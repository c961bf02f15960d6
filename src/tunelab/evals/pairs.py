"""Held-out metrics of preference training, from per-pair margins."""

from __future__ import annotations

import torch


def pair_metrics(margins: torch.Tensor, prefix: str = "") -> dict:
    """Metrics from per-pair margins (score of chosen − score of rejected): the pairwise loss
    −log σ(margin), the share of pairs ordered right (a tie counts half, so an untrained model
    that cannot tell the two apart scores 0.5, not 0) and the mean margin."""
    margins = margins.double()
    right = (margins > 0).double() + 0.5 * (margins == 0).double()
    return {
        "loss": -torch.nn.functional.logsigmoid(margins).mean().item(),
        f"{prefix}accuracy": right.mean().item(),
        f"{prefix}margin": margins.mean().item(),
    }
