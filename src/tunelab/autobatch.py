"""`train.batch_size: auto`: the micro-batch that fills the GPU, with the optimisation the recipe asks for.

A recipe fixes the rows of one optimizer step (`train.tokens_per_step`, or batch_size × grad_accum);
how those rows split into micro-steps is a property of the machine. On one CUDA device SFT probes
it: one forward and backward on real packed rows at growing sizes, the peak memory of each read
(plus an estimate of the optimizer state, which a probe does not allocate), a line through the
first two peaks predicting the largest size under the target, which is then probed to confirm.
Only divisors of the step's rows are candidates, so grad_accum = rows / micro-batch meets the step
exactly and a different GPU gives the same learning curve. Elsewhere (the CPU, several processes,
a number batch_size) the split is the config's own (`TrainConfig.planned`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

MEMORY_TARGET = 0.85
"""Share of the GPU memory (free now plus what this process holds) a probed step may peak at: the
rest absorbs allocator fragmentation and the longer tails of real batches."""
OPTIMIZER_BYTES_PER_PARAM = 8
"""AdamW's two fp32 moments per trainable parameter; the probe runs no optimizer step."""


@dataclass
class Plan:
    """How one optimizer step's rows are split: what the run prints and records in summary.json."""

    batch_size: int  # rows per micro-step (per process)
    grad_accum: int
    rows_per_step: int
    max_length: int
    auto: bool  # chosen by probing
    target_gib: float | None = None
    peak_gib: float | None = None  # the chosen size's probed peak, optimizer state included
    probes: list[tuple[int, float | None]] = field(default_factory=list)  # (rows, peak GiB or None: out of memory)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.max_length

    def describe(self) -> str:
        how = (f"probed, peak {self.peak_gib:.1f} of {self.target_gib:.1f} GiB target" if self.auto and self.peak_gib
               else "probed, nothing smaller to try" if self.auto else "as configured")
        return (f"train.batch_size: {self.batch_size} rows × {self.max_length} tokens per micro-step, grad_accum "
                f"{self.grad_accum} → {self.tokens_per_step:,} token slots per optimizer step ({how})")

    def summary(self) -> dict:
        return {**asdict(self), "tokens_per_step": self.tokens_per_step}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose(rows: int, probe: Callable[[int], float | None], target: float) -> tuple[int, dict[int, float | None]]:
    """(the largest divisor of `rows` whose probe stays within `target`, every probe's result).

    probe(b): peak bytes of a step of b rows, None when it ran out of memory. Sizes are probed
    growing: the two smallest, then the largest a line through their peaks predicts (activation
    memory grows linearly with the rows), then smaller ones until one fits. Size 1 is the floor:
    it is chosen even when it does not fit (training then says what to lower)."""
    sizes = divisors(rows)
    tried: dict[int, float | None] = {}

    def fits(b: int) -> bool:
        if b not in tried:
            tried[b] = probe(b)
        return tried[b] is not None and tried[b] <= target

    if not fits(sizes[0]) or len(sizes) == 1 or not fits(sizes[1]):
        return sizes[0], tried
    a, b = sizes[0], sizes[1]
    per_row = (tried[b] - tried[a]) / (b - a)
    reach = rows if per_row <= 0 else a + (target - tried[a]) / per_row
    for size in reversed([s for s in sizes[2:] if s <= reach]):
        if fits(size):
            return size, tried
    return b, tried


def plan(t, max_length: int, processes: int, probe: Callable[[int], float | None] | None,
         total_bytes: float | None) -> Plan:
    """The split for train.* settings `t`: probed (`probe`, `total_bytes` of usable memory) when
    batch_size is auto and a probe is given, else the config's own."""
    rows = t.rows_per_step(max_length, processes)
    if t.batch_size != "auto" or probe is None:
        batch, accum = t.planned(max_length, processes)
        return Plan(batch, accum, batch * accum, max_length, auto=False)
    target = MEMORY_TARGET * total_bytes
    batch, tried = choose(rows, probe, target)
    gib = {size: None if peak is None else peak / 2**30 for size, peak in tried.items()}
    result = Plan(batch, rows // batch, rows, max_length, auto=True, target_gib=target / 2**30,
                  peak_gib=gib.get(batch), probes=sorted(gib.items()))
    if tried.get(batch) is None or tried[batch] > target:
        log.warning("train.batch_size=auto: even 1 row of %d tokens peaks over the %.1f GiB target; lower "
                    "data.max_length or set train.gradient_checkpointing=true", max_length, target / 2**30)
    return result


def step_on(model, rows: list[dict], collate, autocast_dtype) -> Callable[[int], None]:
    """step(b): one training forward and backward of `model` on b of `rows` (cycled), collated to
    the full [b, max_length] shape, on the model's device under the run's autocast, without an
    optimizer step; the gradients are dropped after it and the model's mode restored. The probe
    and the compile check (`kernels.regional.check`) run it."""
    import torch

    device = next(p for p in model.parameters()).device

    def step(b: int) -> None:
        batch = {k: v.to(device) for k, v in collate([rows[i % len(rows)] for i in range(b)]).items()}
        was_training = model.training
        model.train()
        cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        try:
            with cast:
                loss = model(**batch).loss
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    return step


def cuda_probe(step: Callable[[int], None], trainable: int) -> tuple[Callable[[int], float | None], float]:
    """(probe, usable bytes) on the current CUDA device: probe(b) runs step(b) and returns the peak
    allocated bytes plus the optimizer state of `trainable` parameters (None: out of memory);
    usable = free memory + what this process holds."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device())

    def probe(b: int) -> float | None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step(b)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) + OPTIMIZER_BYTES_PER_PARAM * trainable
        except torch.OutOfMemoryError:
            return None
        finally:
            torch.cuda.empty_cache()

    free, _total = torch.cuda.mem_get_info(device)
    return probe, free + torch.cuda.memory_reserved(device)
