"""The `static` backend: plain `generate()` on left-padded batches — the comparison baseline.

A batch starts together and ends when its longest row ends; every row holds the cache of the
longest prompt plus every step, finished or not. Within a KV budget the batch can only take as
many rows as fit in the worst case, `rows × (longest prompt + max_new_tokens)`, since the cache
cannot be given back mid-batch. Requests with the same sampling options share a batch (FIFO).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque

import torch

from tunelab.inference.base import Delta, Engine, Handle, eos_ids, finish_reason
from tunelab.inference.kv import KVLedger, KVSnapshot, static_batch_snapshots


class StaticEngine(Engine):
    name = "static"

    def __init__(self, model, tokenizer, *, kv_budget_tokens: int | None = None, max_batch: int | None = 64,
                 seed: int | None = None, **_paged_only):
        """kv_budget_tokens: the cache a batch may plan for; max_batch: a cap on rows (None: the budget alone)."""
        super().__init__(model, tokenizer)
        self.budget, self.max_batch, self.seed = kv_budget_tokens, max_batch, seed
        self.eos = eos_ids(model, tokenizer)
        self.ledger = KVLedger.for_model(model)
        self._waiting: deque[Handle] = deque()
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="tunelab-static", daemon=True)
        self._worker.start()

    def _submit(self, handle: Handle) -> None:
        self._submit_many([handle])

    def _submit_many(self, handles: list[Handle]) -> None:
        """All at once, so that the first batch can take them all."""
        with self._cond:
            self._waiting.extend(handles)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            waiting = next((h for h in self._waiting if h.id == request_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
            self._cancelled.add(request_id)
        if waiting is not None:
            waiting.put(Delta([], True, "cancelled"))

    def waiting(self) -> int:
        return len(self._waiting)

    def alive(self) -> bool:
        return self._worker.is_alive() and not self._closed

    def exclusive(self) -> threading.Lock:
        """The model is free between batches; hold this lock to use it."""
        return self._model_lock

    def _next_batch(self) -> list[Handle]:
        """FIFO rows with the first row's sampling options (token limits may differ: the batch runs
        to the largest and cuts each row at its own), as many as the budget allows."""
        same = dataclasses.replace(self._waiting[0].params, max_new_tokens=1)
        batch, width, new = [], 0, 0
        for handle in list(self._waiting):
            if dataclasses.replace(handle.params, max_new_tokens=1) != same or len(batch) == self.max_batch:
                continue
            w, n = max(width, len(handle.prompt_ids)), max(new, handle.params.max_new_tokens)
            if batch and self.budget and (len(batch) + 1) * (w + n) > self.budget:
                break
            batch.append(handle)
            width, new = w, n
            self._waiting.remove(handle)
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._next_batch()
            with self._model_lock:
                try:
                    rows = self._generate(batch)
                except Exception as err:  # noqa: BLE001 — reported on every request of the batch, not lost in a thread
                    for handle in batch:
                        handle.put(Delta([], True, "error", f"{type(err).__name__}: {err}"))
                    continue
            self._deliver(batch, rows)
            self.ledger.record(KVSnapshot(waiting=len(self._waiting)), step=False)

    @torch.no_grad()
    def _generate(self, batch: list[Handle]) -> list[list[int]]:
        p = batch[0].params
        width, new = max(len(h.prompt_ids) for h in batch), max(h.params.max_new_tokens for h in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(h.prompt_ids)) + h.prompt_ids for h in batch])
        mask = torch.tensor([[0] * (width - len(h.prompt_ids)) + [1] * len(h.prompt_ids) for h in batch])
        if p.seed is not None or self.seed is not None:
            torch.manual_seed(p.seed if p.seed is not None else self.seed)
        sampling = {} if p.greedy else {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p,
                                         "top_k": p.top_k or None}
        out = self.model.generate(
            input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
            max_new_tokens=new, do_sample=not p.greedy, pad_token_id=pad,
            eos_token_id=sorted(self.eos), **sampling)[:, width:].tolist()
        rows = [self._cut(row[: h.params.max_new_tokens]) for row, h in zip(out, batch)]
        steps = len(out[0]) if out else 0
        for snap in static_batch_snapshots([len(h.prompt_ids) for h in batch], [len(r) for r in rows], width, steps):
            self.ledger.record(dataclasses.replace(snap, waiting=len(self._waiting)))
        return rows

    def _cut(self, row: list[int]) -> list[int]:
        """A row's own tokens: up to and including its first EOS (the rest is padding)."""
        end = next((i + 1 for i, t in enumerate(row) if t in self.eos), len(row))
        return row[:end]

    def _deliver(self, batch: list[Handle], rows: list[list[int]]) -> None:
        for handle, row in zip(batch, rows):
            if handle.id in self._cancelled:
                self._cancelled.discard(handle.id)
                continue
            self._delivered(len(row))
            handle.put(Delta(row, True, finish_reason(row, self.eos)))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5)
