"""How fast a run trained, measured without slowing it down: where a step's time goes, and MFU.

GPU work is asynchronous: reading a clock after each step would make the host wait for the GPU
every step, which is the cost being measured. So the GPU parts of a step (forward+backward, the
optimizer) are bracketed by CUDA events, and the events are read only where the host waits for
the GPU anyway (a logging step reads the loss; a checkpoint copies the weights). Host-side parts
(fetching and collating batches, evaluation, saving) take the wall clock. On the CPU, where
every op runs before the next is issued, every part takes the wall clock.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "T4": 65e12}
"""Dense bf16 matrix peak per device (the T4's is fp16: it has no bf16), from the vendors' datasheets,
matched by a substring of torch.cuda.get_device_name(). Others get no MFU rather than a guess."""

PARTS = ("data", "forward_backward", "optimizer", "evaluation", "saving")


def peak_flops(device_name: str) -> float | None:
    return next((flops for name, flops in PEAK_FLOPS.items() if name in device_name), None)


def parameter_count(model) -> int:
    """Every parameter once (tied embeddings once); a 4-bit weight counts as its unpacked shape."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def mfu(parameters: int, tokens_per_s: float | None, device_name: str) -> float | None:
    """Model FLOPs utilisation by the usual 6N rule (forward 2N + backward 4N FLOPs per token; Kaplan
    et al. 2020, PaLM's appendix B): 6N × tokens/s over the device's peak. A LoRA run skips the
    frozen weights' gradients (about 4N), so its real utilisation is about 2/3 of this; the 6N
    convention is kept so runs and papers compare. Attention's own FLOPs are left out."""
    peak = peak_flops(device_name)
    if not peak or not tokens_per_s:
        return None
    return 6 * parameters * tokens_per_s / peak


class StepClock:
    """Seconds per part of training (`PARTS`), summed over the run.

    `mark()` is a point in time on the GPU's stream (a recorded CUDA event) or the host's clock;
    `span(part, start)` adds the time from `start` to now. GPU spans stay pending until
    `collect()`, which the trainer calls only where the host has just waited for the GPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.pending: list[tuple[str, object, object]] = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def span(self, part: str, start) -> None:
        """The time from `start` (a mark) to now, on the GPU stream (pending) or the host clock."""
        if self.cuda:
            self.pending.append((part, start, self.mark()))
        else:
            self.seconds[part] += time.perf_counter() - start

    def host(self, part: str, seconds: float) -> None:
        """Host wall time of a part that waits for its own GPU work (evaluation, saving) or has none (data)."""
        self.seconds[part] += seconds

    def collect(self) -> None:
        for part, start, end in self.pending:
            end.synchronize()  # done already where collect() is called: the host has just waited
            self.seconds[part] += start.elapsed_time(end) / 1000
        self.pending.clear()

    def totals(self) -> dict[str, float]:
        self.collect()
        return {part: round(self.seconds.get(part, 0.0), 3) for part in PARTS}
