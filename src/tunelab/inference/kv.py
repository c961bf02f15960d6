"""KV-cache accounting: bytes reserved for the cache vs bytes holding live tokens.

"Reserved" is what the running sequences hold and nobody else can use: whole blocks for the
paged cache, the padded rectangle `batch × (longest prompt + steps)` for a static batch.
"Live" is the positions that hold a real token of a running sequence. Waste = 1 − live/reserved,
averaged over generation steps (each step weighs by what it holds), as in the PagedAttention
paper (Kwon et al., 2023, §2.3: reservation, internal and external fragmentation).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass


def bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V of one token across all layers: 2 × layers × kv_heads × head_dim × element size."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class KVSnapshot:
    """The cache at one generation step (or now, when idle)."""

    reserved_tokens: int = 0
    live_tokens: int = 0
    blocks_in_use: int = 0
    blocks_total: int = 0
    running: int = 0
    waiting: int = 0
    preemptions: int = 0  # cumulative

    @property
    def waste_pct(self) -> float:
        return 100.0 * (1 - self.live_tokens / self.reserved_tokens) if self.reserved_tokens else 0.0


class KVLedger:
    """Per-step snapshots (the last `keep`) and their running sums, for a run summary in bytes."""

    def __init__(self, bytes_per_token: int, keep: int = 100_000):
        self.bytes_per_token = bytes_per_token
        self.batches: deque[KVSnapshot] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self.reset()

    @classmethod
    def for_model(cls, model) -> KVLedger:
        return cls(bytes_per_token(model.config.get_text_config(), model.dtype.itemsize))

    def reset(self) -> None:
        """Start a new summary (e.g. after a warm-up)."""
        with self._lock:
            self.batches.clear()
            self.current = KVSnapshot()
            self._steps = self._reserved = self._live = 0
            self._peak_reserved = self._peak_blocks = self._peak_running = 0

    def record(self, snap: KVSnapshot, step: bool = True) -> None:
        """Keep `snap` as the current state; a generation step (not an idle poll) also counts in the summary."""
        with self._lock:
            self.current = snap
            if not step:
                return
            self.batches.append(snap)
            self._steps += 1
            self._reserved += snap.reserved_tokens
            self._live += snap.live_tokens
            self._peak_reserved = max(self._peak_reserved, snap.reserved_tokens)
            self._peak_blocks = max(self._peak_blocks, snap.blocks_in_use)
            self._peak_running = max(self._peak_running, snap.running)

    def _with_bytes(self, snap: KVSnapshot) -> dict:
        return {**asdict(snap), "waste_pct": round(snap.waste_pct, 2),
                "reserved_bytes": snap.reserved_tokens * self.bytes_per_token,
                "live_bytes": snap.live_tokens * self.bytes_per_token}

    def now(self) -> dict:
        """The current state, with bytes."""
        return self._with_bytes(self.current)

    def per_batch(self) -> list[dict]:
        """One row per recorded generation step (the last `keep`), with bytes."""
        with self._lock:
            snaps = list(self.batches)
        return [{"step": i, **self._with_bytes(s)} for i, s in enumerate(snaps)]

    def summary(self) -> dict:
        """Over all steps so far: waste (step-weighted), peaks and preemptions."""
        with self._lock:
            waste = 100.0 * (1 - self._live / self._reserved) if self._reserved else 0.0
            return {
                "steps": self._steps,
                "kv_waste_pct": round(waste, 2),
                "mean_reserved_bytes": self._reserved * self.bytes_per_token // max(self._steps, 1),
                "mean_live_bytes": self._live * self.bytes_per_token // max(self._steps, 1),
                "peak_reserved_bytes": self._peak_reserved * self.bytes_per_token,
                "peak_blocks_in_use": self._peak_blocks,
                "peak_running": self._peak_running,
                "preemptions": self.current.preemptions,
            }


def static_batch_snapshots(prompt_lens: list[int], generated: list[int], width: int, steps: int) -> list[KVSnapshot]:
    """What a left-padded `generate()` batch holds at each of its `steps`: every row keeps `width`
    (the longest prompt) plus one position per step, finished rows included."""
    rows = len(prompt_lens)
    return [
        KVSnapshot(reserved_tokens=rows * (width + t), live_tokens=sum(p + min(t, g) for p, g in zip(prompt_lens, generated)),
                   running=sum(g > t for g in generated) or rows)
        for t in range(steps)
    ]
