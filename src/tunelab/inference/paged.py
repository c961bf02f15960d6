"""The `paged` backend: tunelab's own engine — a paged KV pool, continuous batching with
chunked prefill and recompute preemption, the model's own modules, graph-captured decode.

One background thread owns the model while the engine runs: it takes new requests and
cancellations between steps, asks the scheduler (`scheduler.py`) for the next step, runs it
(`runner.py`: one forward over the step's flat tokens, sampling on the device, a single host
sync to read the sampled ids), and hands every request its new token. In steady decoding the
next graph step is queued before the one in flight is read (its input tokens are gathered on
the device), so scheduling and delivery run while the GPU computes. EOS, token limits and stop
strings end a request inside that loop, so a finished row never holds the batch back (at most
one queued step computes a row that has just ended, and drops it).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque

import torch

from tunelab.errors import TunelabError
from tunelab.inference.base import Delta, Engine, Handle, eos_ids
from tunelab.inference.blocks import BlockPool, pool_blocks
from tunelab.inference.kv import KVLedger, KVSnapshot, bytes_per_token
from tunelab.inference.runner import ModelRunner, Parts, workspace_bytes
from tunelab.inference.scheduler import Scheduler, Sequence

log = logging.getLogger(__name__)

CPU_MAX_BATCH_TOKENS, GPU_MAX_BATCH_TOKENS = 512, 8192  # tokens one step computes (chunked prefill)
"""An eager prefill step costs the host ~40 ms of launches on a small model whatever its size, so
the GPU takes big ones (vLLM's offline default is the same 8,192)."""
CPU_MAX_SEQS, GPU_MAX_SEQS = 64, 256  # sequences running at once


class PagedEngine(Engine):
    name = "paged"

    def __init__(self, model, tokenizer, *, parts: Parts, kv_budget_tokens: int | None = None, page_size: int = 16,
                 demand_tokens: int | None = None, max_seqs: int | None = None, max_batch_tokens: int | None = None,
                 seed: int | None = None, cuda_graphs: bool = True, overlap: bool = True, program: str | None = None,
                 **_other_backends):
        """`backends.build_engine` makes one (it checks the architecture first). kv_budget_tokens:
        the pool in tokens (None: 8,192 on the CPU, 90 % of free GPU memory less the workspace,
        either capped at demand_tokens, the total a known workload needs);
        page_size: tokens per block; max_seqs / max_batch_tokens: sequences and tokens per step;
        seed: where unseeded sampled requests draw their seeds from; overlap: queue the next graph
        decode step before reading the one in flight (the host's work hides behind the GPU's);
        program: 'hf' or 'fused' (None: fused on a GPU where the layer allows it)."""
        super().__init__(model, tokenizer)
        if page_size < 1:
            raise TunelabError(f"--page-size must be >= 1, got {page_size}")
        config = parts.config
        device = parts.decoder.embed_tokens.weight.device
        on_gpu = device.type == "cuda"
        self.max_seqs = max_seqs or (GPU_MAX_SEQS if on_gpu else CPU_MAX_SEQS)
        self.max_batch_tokens = max(max_batch_tokens or (GPU_MAX_BATCH_TOKENS if on_gpu else CPU_MAX_BATCH_TOKENS),
                                    self.max_seqs)
        dtype_bytes = parts.decoder.embed_tokens.weight.element_size()
        self.workspace_bytes = workspace_bytes(config, dtype_bytes, self.max_batch_tokens, self.max_seqs)
        per_token = bytes_per_token(config, dtype_bytes)
        num_blocks = pool_blocks(kv_budget_tokens, page_size, per_token, device, self.workspace_bytes, demand_tokens)
        self.pool = BlockPool(num_blocks, page_size)
        self.max_len = min(self.pool.capacity * page_size, config.max_position_embeddings)
        width = self.pool.blocks_for(self.max_len)
        self.scheduler = Scheduler(self.pool, max_seqs=self.max_seqs, max_batch_tokens=self.max_batch_tokens,
                                   max_blocks_per_seq=width)
        self.runner = ModelRunner(model, parts, num_blocks=num_blocks, page=page_size, max_seqs=self.max_seqs,
                                  max_blocks=width, graphs=cuda_graphs, program=program)
        self.kv_bytes = self.runner.kv.numel() * self.runner.kv.element_size()
        self.overlap = overlap
        self.eos = eos_ids(model, tokenizer)
        self.ledger = KVLedger(per_token)
        self._seeds = random.Random(seed)
        self.phases: Counter[str] = Counter()  # steps by kind (count, s), host work (s), steps queued behind another
        self._inbox: deque[Handle] = deque()
        self._cancels: set[str] = set()
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="tunelab-paged", daemon=True)
        self._worker.start()

    def describe(self) -> str:
        """One line: the pool, the stated workspace, the step program."""
        r = self.runner
        return (f"paged engine: {self.pool.capacity} blocks × {self.pool.page} tokens = "
                f"{self.pool.capacity * self.pool.page:,} tokens of KV ({self.kv_bytes / 2**30:.2f} GiB), workspace "
                f"≤ {self.workspace_bytes / 2**30:.2f} GiB, ≤ {self.max_seqs} sequences and {self.max_batch_tokens} "
                f"tokens a step, program {r.program}, attention {'triton+varlen' if r.fast else 'torch reference'}, "
                f"CUDA graphs {'on' if r.graphs else 'off'}")

    # -- the Engine interface -----------------------------------------------------------------
    def _submit(self, handle: Handle) -> None:
        self._submit_many([handle])

    def _submit_many(self, handles: list[Handle]) -> None:
        with self._cond:
            if self._closed:
                raise TunelabError("the paged engine is closed and takes no new requests")
            self._inbox.extend(handles)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify()

    def waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    def alive(self) -> bool:
        return self._worker.is_alive() and not self._closed

    def exclusive(self) -> threading.Lock:
        """The model is free between steps; hold this lock to use it."""
        return self._model_lock

    def capture(self, up_to: int | None = None) -> int:
        """Capture the greedy decode graphs up front (else each bucket is captured at first use)."""
        with self._model_lock:
            return self.runner.capture(up_to)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)
        self.runner = None  # the pool and the graphs go with it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        flight = None  # (step, its sampling rows, pending read-back): a decode step queued on the GPU
        while True:
            with self._cond:
                idle = lambda: not (flight or self._inbox or self._cancels or self.scheduler.has_work()  # noqa: E731
                                    or self._closed)
                if idle():
                    self._record(step=False)  # nothing runs now: the KV figures say so until the next step
                while idle():
                    self._cond.wait()
                if self._closed:
                    if flight is not None:
                        self.runner.wait(flight[2])
                    self._fail_all("the engine was closed", "cancelled")
                    return
                new, self._inbox = list(self._inbox), deque()
                cancels, self._cancels = self._cancels, set()
            try:
                for handle in new:
                    self._admit(handle)
                for request_id in cancels:
                    self._cancel_now(request_id)
                with self._model_lock:
                    flight = self._turn(flight)
            except Exception as err:  # noqa: BLE001 — reported on every request, not lost in a thread
                log.exception("paged engine step failed")
                self._fail_all(f"{type(err).__name__}: {err}", "error")
                flight = None

    def _turn(self, flight):
        """One turn of the loop. With a decode step in flight: queue the next one behind it when it
        can be planned without the tokens in flight (then the GPU never waits for the host), read
        the in-flight tokens, hand them out. Else: schedule a step; a graph-decode step is left in
        flight, any other runs to the end here. Returns the step now in flight, or None."""
        t0 = time.perf_counter()
        if flight is None:
            step = self.scheduler.schedule()
            if step is None:
                self._record(step=False)
                return None
            self._record(step=True, computing=len(step.inputs.ids))  # what this step holds, its own tokens written
            pending = self.runner.try_launch(step.inputs) if self.overlap else None
            if pending is not None:
                self.phases["host_s"] += time.perf_counter() - t0
                return step, self.scheduler.commit(step), pending
            t1 = time.perf_counter()
            sampled = self.runner.step(step.inputs)
            t2 = time.perf_counter()
            self._hand_out(self.scheduler.fill(self.scheduler.commit(step), sampled))
            kind = "decode" if step.inputs.decode_only else "mixed"
            self.phases[f"{kind}_steps"] += 1
            self.phases[f"{kind}_s"] += t2 - t1
            self.phases["host_s"] += (t1 - t0) + (time.perf_counter() - t2)
            return None
        step, rows, pending = flight
        following = None
        planned = self.scheduler.plan_decodes(step)
        if planned is not None and self.runner.captured(planned[0].inputs):
            nxt, src = planned
            self._record(step=True, computing=len(nxt.inputs.ids))
            queued = self.runner.launch(nxt.inputs, src)
            following = nxt, self.scheduler.commit(nxt), queued
            self.phases["queued_behind"] += 1
        t1 = time.perf_counter()
        sampled = self.runner.wait(pending)
        t2 = time.perf_counter()
        self._hand_out(self.scheduler.fill(rows, sampled))
        self.phases["decode_steps"] += 1
        self.phases["decode_s"] += t2 - t1
        self.phases["host_s"] += (t1 - t0) + (time.perf_counter() - t2)
        return following

    def _hand_out(self, drawn: list[tuple[Sequence, int]]) -> None:
        for seq, token in drawn:
            self._deliver(seq, token)
        self._delivered(len(drawn))

    def _admit(self, handle: Handle) -> None:
        need = len(handle.prompt_ids) + handle.params.max_new_tokens
        if need > self.max_len:
            handle.put(Delta([], True, "error", f"the prompt ({len(handle.prompt_ids)} tokens) + max_new_tokens "
                                                f"({handle.params.max_new_tokens}) = {need} tokens exceed the "
                                                f"{self.max_len} a sequence can hold (the model's context, or the KV "
                                                "pool: raise --kv-budget-tokens)"))
            return
        seed = handle.params.seed if handle.params.seed is not None else self._seeds.getrandbits(32)
        self.scheduler.add(Sequence(handle, list(handle.prompt_ids), len(handle.prompt_ids), seed & 0xFFFFFFFF))

    def _cancel_now(self, request_id: str) -> None:
        seq = self.scheduler.find(request_id)
        if seq is None:  # finished already, or never admitted
            return
        self.scheduler.finish(seq)
        seq.handle.put(Delta([], True, "cancelled"))

    def _deliver(self, seq: Sequence, token: int) -> None:
        reason = self._finish_reason(seq, token)
        if reason is None:
            seq.handle.put(Delta([token]))
            return
        self.scheduler.finish(seq)
        seq.handle.put(Delta([token], True, reason))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.handle.params
        if token in self.eos or (p.stop and self._hits_stop(seq)):
            return "stop"
        return "length" if seq.drawn >= p.max_new_tokens else None

    def _hits_stop(self, seq: Sequence) -> bool:
        """A stop string in the text of the last few tokens (enough to hold the longest one);
        the consumer's TextStream cuts the text at it."""
        longest = max(map(len, seq.params.stop))
        end = seq.prompt_len + seq.drawn
        tail = seq.tokens[max(seq.prompt_len, end - longest - 2) : end]
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in seq.params.stop)

    def _fail_all(self, message: str, reason: str) -> None:
        seqs = [*self.scheduler.running, *self.scheduler.waiting]
        for seq in seqs:
            self.scheduler.finish(seq)
            seq.handle.put(Delta([], True, reason, None if reason == "cancelled" else message))
        for handle in self._inbox:
            handle.put(Delta([], True, reason, None if reason == "cancelled" else message))
        self._inbox.clear()

    def _record(self, step: bool, computing: int = 0) -> None:
        """The pool now, into the ledger; `step`: a generation step that writes `computing` more tokens."""
        s = self.scheduler
        self.ledger.record(KVSnapshot(
            reserved_tokens=self.pool.used * self.pool.page,
            live_tokens=sum(q.computed for q in s.running) + computing,
            blocks_in_use=self.pool.used, blocks_total=self.pool.capacity, running=len(s.running),
            waiting=len(s.waiting) + len(self._inbox), preemptions=s.preemptions), step=step)
