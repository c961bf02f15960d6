"""Picking the next token of every row on the device: greedy, temperature, top-k, top-p, seeded.

Sampling is the Gumbel-max trick (argmax of logits/T + Gumbel noise draws from softmax(logits/T))
over the tokens the filters keep, so one argmax serves every row. The noise is a hash of
(request seed, position in the output, token id), not a draw from a shared generator: a seeded
request gets the same tokens whatever else is in the batch and wherever it sits, on the CPU and
the GPU alike, and the step stays one CUDA graph (no generator state, no host sync).
Filters follow transformers' order (temperature → top-k → top-p, Holtzman et al. 2020: the
smallest set of tokens whose probability reaches top_p, the most likely always kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF


@dataclass
class SamplingTensors:
    """Per sampled row (S,): temperature (0 = greedy), top_k (0 = off), top_p (1 = off) as float32/
    int64, the request's seed and the index of the token being drawn (int64)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor
    index: torch.Tensor


def mode_for(params) -> str:
    """What a batch of SamplingParams needs: 'greedy' (argmax only), 'sample' (temperature), or
    'filter' (some row uses top-k or top-p: a sort per row)."""
    sampled = [p for p in params if not p.greedy]
    if not sampled:
        return "greedy"
    return "filter" if any(p.top_k or p.top_p < 1 for p in sampled) else "sample"


def sample(logits: torch.Tensor, t: SamplingTensors, mode: str) -> torch.Tensor:
    """logits (S, V) float32 → token ids (S,) int64."""
    greedy = logits.argmax(-1)
    if mode == "greedy":
        return greedy
    scaled = logits / t.temperature.clamp_min(1e-6)[:, None]
    noise = gumbel(t.seed, t.index, logits.shape[-1])  # (S, V)
    if mode == "sample":
        drawn = (scaled + noise).argmax(-1)
    else:
        drawn = _filtered(scaled, noise, t)
    return torch.where(t.temperature > 0, drawn, greedy)


def _filtered(scaled: torch.Tensor, noise: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    vocab = scaled.shape[-1]
    ordered, order = scaled.sort(dim=-1, descending=True)  # (S, V)
    rank = torch.arange(vocab, device=scaled.device)
    keep = rank[None, :] < torch.where(t.top_k > 0, t.top_k, vocab)[:, None]
    ordered = ordered.masked_fill(~keep, float("-inf"))
    probs = ordered.softmax(-1)
    keep &= (probs.cumsum(-1) - probs) < t.top_p[:, None]  # probability mass before this token
    choice = torch.where(keep, ordered + noise.gather(1, order), float("-inf")).argmax(-1)
    return order.gather(1, choice[:, None])[:, 0]


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32-style) on int64 tensors holding values < 2^32; the
    multipliers are < 2^31 so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & M32
    return x ^ (x >> 16)


def gumbel(seed: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise (S, V) from (seed, index) per row and the token id: −log(−log u)."""
    row = _mix(_mix(seed & M32) ^ (index & M32))  # (S,)
    token = (torch.arange(vocab, device=seed.device, dtype=torch.int64) * 0x27D4EB2F) & M32  # (V,)
    bits = _mix(_mix(row[:, None] ^ token[None, :]))  # (S, V)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1)
    return -torch.log(-torch.log(u))
