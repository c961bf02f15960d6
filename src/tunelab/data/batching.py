"""The two batching strategies: packing (default) and length-grouped padding.

Packing puts whole samples into rows of at most `max_length` tokens with best-fit decreasing
(a sample is never split across rows) and restarts `position_ids` at 0 for every sample.
transformers' mask builders read restarting positions as sample boundaries and build a
block-diagonal causal mask (sdpa and eager, CPU and GPU), so no sample attends to another;
for that the model must get no `attention_mask` and no KV cache.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from tunelab.data.templates import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to ≤ capacity; longest samples placed first,
    each into the fullest bin it still fits. Every length must be ≤ capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens > capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            remaining, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (remaining - n, b))
    return bins


def pack_batch(batch: dict, max_length: int) -> dict:
    """`datasets.map(batched=True)` function: rows of samples → rows of packs."""
    bins = best_fit_decreasing([len(ids) for ids in batch["input_ids"]], max_length)
    out = {"input_ids": [], "labels": [], "position_ids": [], "num_samples": []}
    for members in bins:
        ids, labels, positions = [], [], []
        for i in members:
            ids += batch["input_ids"][i]
            labels += batch["labels"][i]
            positions += range(len(batch["input_ids"][i]))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["num_samples"].append(len(members))
    return out


@dataclass
class Collator:
    """Right-pads a list of rows into tensors and counts real vs. padded tokens.

    Packed rows (with position_ids) get no attention_mask: the restarting positions isolate the
    samples, and the padding tail continues as a sample of its own with IGNORE_INDEX labels.
    Padded rows get an attention_mask. `width` pads every batch to that many tokens and `rows`
    adds empty rows (no loss) up to that many: one static shape for a compiled step, the last
    batch of an epoch included. Filled into numpy arrays: the collator runs on the training
    loop's own thread, once per micro-step. A train and an eval loader each get their own, so
    the counts are the training tokens only.
    """

    pad_token_id: int
    width: int | None = None
    rows: int | None = None
    real_tokens: int = 0
    total_tokens: int = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = self.width or max(len(r["input_ids"]) for r in rows)
        count = max(len(rows), self.rows or 0)
        packed = "position_ids" in rows[0]
        ids = np.full((count, width), self.pad_token_id, dtype=np.int64)
        labels = np.full((count, width), IGNORE_INDEX, dtype=np.int64)
        # (count, width): positions restart in each pad tail (and fill empty rows); else the mask
        extra = np.tile(np.arange(width, dtype=np.int64), (count, 1)) if packed else np.zeros_like(ids)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = r["input_ids"]
            labels[i, :n] = r["labels"]
            if packed:
                extra[i, :n] = r["position_ids"]
                extra[i, n:] = np.arange(width - n)
            else:
                extra[i, :n] = 1
            self.real_tokens += n
        self.total_tokens += width * count
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids" if packed else "attention_mask": torch.from_numpy(extra)}

    @property
    def pad_fraction(self) -> float | None:
        return 1 - self.real_tokens / self.total_tokens if self.total_tokens else None
