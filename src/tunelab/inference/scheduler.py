"""Continuous batching: which tokens of which sequences the next engine step computes.

Each step first gives every decoding sequence its next token — a new block when its last one
is full, and when the pool has none left, the newest running sequences are preempted: their
blocks go back and they wait to be recomputed (prompt + what they generated so far), vLLM's
policy (Kwon et al., 2023, §4.5). The rest of the step's token budget goes to prompt chunks, of
sequences already prefilling first, then of waiting ones in arrival order: chunked prefill
(Agrawal et al., 2024, Sarathi-Serve), so a long prompt never stalls the streams beside it.
A decode is just a chunk of one token whose context is already cached.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tunelab.inference.base import Handle
from tunelab.inference.blocks import BlockPool
from tunelab.inference.sampling import mode_for

PLACEHOLDER = -1  # a token drawn by a step in flight, not read yet


@dataclass(eq=False)
class Sequence:
    """A request inside the engine: its tokens (prompt + generated), the blocks holding their K/V."""

    handle: Handle
    tokens: list[int]
    prompt_len: int
    seed: int  # < 2^32
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens whose K/V are in the pool
    row: int = -1  # its row of the block-table array while it holds blocks
    done: bool = False  # finished or cancelled; a step in flight may still compute its row
    drawn: int = 0  # generated tokens read back (the rest of `tokens` are placeholders)
    preempted: bool = False  # has been preempted (and so is recomputed) at least once

    @property
    def params(self):
        return self.handle.params

    @property
    def knobs(self) -> tuple[float, int, float, int]:
        """(temperature, top_k, top_p, seed), as the step's sampling arrays take them."""
        p = self.handle.params
        return p.temperature, p.top_k, p.top_p, self.seed

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


@dataclass
class Chunk:
    """Tokens start..start+length of one sequence, computed this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """The chunk ends at the sequence's last token, so its logits give the next token."""
        return self.start + self.length == len(self.seq.tokens)


@dataclass
class StepInputs:
    """A step as arrays (int64 unless said): T tokens, N sequences (decodes first), S sampled rows."""

    ids: np.ndarray  # (T,)
    positions: np.ndarray  # (T,)
    slots: np.ndarray  # (T,) block * page + offset, where each token's K/V go
    num_decode: int  # the first num_decode sequences (and tokens) are one-token decodes
    tables: np.ndarray  # (N, W) block tables
    context_lens: np.ndarray  # (N,) cached + this step's tokens
    q_lens: np.ndarray  # (N,)
    context_slots: np.ndarray  # (sum of prefill context lens,) pool slots of the prefill rows' contexts
    sample_rows: np.ndarray  # (S,) index of each sampled row's last token in the T tokens
    temperature: np.ndarray  # (S,) float32
    top_k: np.ndarray  # (S,)
    top_p: np.ndarray  # (S,) float32
    seed: np.ndarray  # (S,)
    index: np.ndarray  # (S,) position of the token being drawn in its request's output
    mode: str  # sampling.mode_for the sampled rows

    @property
    def decode_only(self) -> bool:
        return self.num_decode == len(self.ids)


@dataclass
class Step:
    chunks: list[Chunk]
    inputs: StepInputs


class Scheduler:
    """Waiting and running sequences over one BlockPool, and the block-table array the steps read."""

    def __init__(self, pool: BlockPool, *, max_seqs: int, max_batch_tokens: int, max_blocks_per_seq: int):
        self.pool, self.max_seqs, self.max_batch_tokens = pool, max_seqs, max_batch_tokens
        self.max_gather = 2 * max_batch_tokens  # context tokens one step's prefill rows may gather
        self.watermark = max(1, pool.capacity // 100)  # blocks a new admission leaves free (vLLM's 1 %)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.tables = np.zeros((max_seqs, max_blocks_per_seq), dtype=np.int64)
        self._rows = list(range(max_seqs - 1, -1, -1))
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in [*self.running, *self.waiting] if s.handle.id == request_id), None)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence (finished or cancelled) and free its blocks. A step in flight may still
        write its row's K/V into them: that write is ordered before any later step's on the stream,
        so a block handed out again is rewritten by its new owner before anything reads it."""
        seq.done = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> Step | None:
        """The next step, or None when nothing can run."""
        while self.has_work():
            chunks, num_decode = self._plan()
            if chunks:
                return Step(chunks, self._inputs(chunks, num_decode))
            if not self.running:
                return None
            self._preempt_newest()  # every running sequence is stuck mid-prefill: make room
        return None

    def _plan(self) -> tuple[list[Chunk], int]:
        chunks: list[Chunk] = []
        page = self.pool.page
        for seq in list(self.running):
            if seq.row < 0 or len(seq.tokens) - seq.computed != 1:  # preempted meanwhile, or prefilling
                continue
            if len(seq.blocks) * page <= seq.computed and not self._make_room(seq, seq.computed + 1):
                continue  # its next token needs a new block, and it was the one preempted for it
            chunks.append(Chunk(seq, seq.computed, 1))
        num_decode = len(chunks)
        budget, gather = self.max_batch_tokens - num_decode, 0
        for seq in [s for s in self.running if s.pending > 1] + list(self.waiting):
            if budget <= 0:
                break
            new = seq.row < 0
            if new and len(self.running) >= self.max_seqs:
                break
            if new and self.running and not self._admissible(seq):
                break
            length = min(seq.pending, budget, (len(seq.blocks) + self.pool.free) * self.pool.page - seq.computed)
            if length <= 0 or (gather and gather + seq.computed + length > self.max_gather):
                break
            if new:
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.row = self._rows.pop()
            self._grant(seq, self.pool.blocks_for(seq.computed + length) - len(seq.blocks))
            chunks.append(Chunk(seq, seq.computed, length))
            budget -= length
            gather += seq.computed + length
        return chunks, num_decode

    def _admissible(self, seq: Sequence) -> bool:
        """Room to let `seq` in beside the running ones: its whole prompt (a part admitted now would
        be preempted, its compute lost, as soon as a running sequence needs a block), with a block
        to spare per running sequence (vLLM keeps 1 % of the pool; each decoder may need one any
        step); a preempted sequence waits for room to reach its token limit, or it would be
        recomputed again."""
        tokens = len(seq.tokens)
        if seq.preempted:
            tokens += seq.handle.params.max_new_tokens - seq.drawn
        return self.pool.blocks_for(tokens) + max(self.watermark, len(self.running)) <= self.pool.free

    def _ends_in_its_blocks(self, seq: Sequence) -> bool:
        """Decoding, and its blocks already hold it to its token limit."""
        end = len(seq.tokens) + seq.handle.params.max_new_tokens - seq.drawn
        return seq.row >= 0 and len(seq.tokens) - seq.computed == 1 and end <= len(seq.blocks) * self.pool.page

    def _make_room(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for `seq` to hold `tokens`, preempting the newest running sequences while the
        pool is short; False when `seq` itself was the one to go."""
        need = self.pool.blocks_for(tokens) - len(seq.blocks)
        if need > self.pool.free and any(self._ends_in_its_blocks(s) for s in self.running if s is not seq):
            return False  # wait a step or few: a sequence that needs no more blocks will end and free its own
        while need > self.pool.free:
            if self._preempt_newest() is seq:
                return False
        self._grant(seq, need)
        return True

    def _grant(self, seq: Sequence, n: int) -> None:
        if n > 0:
            blocks = self.pool.allocate(n)
            self.tables[seq.row, len(seq.blocks) : len(seq.blocks) + n] = blocks
            seq.blocks += blocks

    def _preempt_newest(self) -> Sequence:
        """The newest running sequence waits again (first in line) to be recomputed: its blocks go
        back now, its tokens (generated ones too) stay."""
        seq = self.running.pop()
        self._release(seq)
        seq.computed = 0
        seq.preempted = True
        self.waiting.appendleft(seq)
        self.preemptions += 1
        return seq

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        if seq.row >= 0:
            self._rows.append(seq.row)
            seq.row = -1

    def commit(self, step: Step) -> list[Sequence | None]:
        """Account a launched step: its chunks count as cached, and each sampling chunk's sequence
        gets a PLACEHOLDER for the token being drawn (`fill` puts it in), so the next step can be
        planned before this one's tokens are read. Returns the sampling rows' sequences (None for
        one that ended meanwhile: its row is computed and dropped)."""
        rows = []
        for chunk in step.chunks:
            seq = chunk.seq
            if seq.done:
                if chunk.samples:
                    rows.append(None)
                continue
            seq.computed += chunk.length
            if chunk.samples:
                seq.tokens.append(PLACEHOLDER)
                rows.append(seq)
        return rows

    @staticmethod
    def fill(rows: list[Sequence | None], sampled: list[int]) -> list[tuple[Sequence, int]]:
        """The drawn tokens into their placeholders (each sequence's oldest)."""
        out = []
        for seq, token in zip(rows, sampled):
            if seq is None or seq.done:
                continue
            seq.tokens[seq.prompt_len + seq.drawn] = token
            seq.drawn += 1
            out.append((seq, token))
        return out

    def plan_decodes(self, after: Step) -> tuple[Step, list[int]] | None:
        """The next step while `after` is still running, when it can be only decodes: every running
        sequence is decoding, none waits to be admitted, and the pool has their blocks (no
        preemption); sequences at their token limit after `after` are left out. Returns the step
        and, per row, its row in `after` (the input token is on the device there), else None."""
        if self.waiting:
            return None
        where = {id(c.seq): i for i, c in enumerate(after.chunks)}
        chunks, src, page = [], [], self.pool.page
        for seq in self.running:
            if len(seq.tokens) - seq.computed != 1 or id(seq) not in where:
                return None
            if len(seq.tokens) - seq.prompt_len >= seq.handle.params.max_new_tokens:
                continue  # ends with the token `after` draws
            if len(seq.blocks) * page <= seq.computed:
                if not self.pool.free:
                    return None  # the synchronous path preempts
                self._grant(seq, 1)
            chunks.append(Chunk(seq, seq.computed, 1))
            src.append(where[id(seq)])
        if not chunks:
            return None
        return Step(chunks, self._inputs(chunks, len(chunks))), src

    # -- the step's arrays --------------------------------------------------------------------
    def _inputs(self, chunks: list[Chunk], num_decode: int) -> StepInputs:
        page = self.pool.page
        rows = np.array([c.seq.row for c in chunks], dtype=np.int64)
        starts = np.array([c.start for c in chunks], dtype=np.int64)
        lengths = np.array([c.length for c in chunks], dtype=np.int64)
        tables = self.tables[rows]  # (N, W)
        dec = slice(0, num_decode)
        ids = [c.seq.tokens[-1] for c in chunks[dec]]
        positions = [starts[dec]]
        row_of_token = [np.arange(num_decode)]
        context_slots = []
        for i, c in enumerate(chunks[num_decode:], num_decode):
            ids += c.seq.tokens[c.start : c.start + c.length]
            positions.append(np.arange(c.start, c.start + c.length))
            row_of_token.append(np.full(c.length, i))
            context = np.arange(c.start + c.length)
            context_slots.append(tables[i, context // page] * page + context % page)
        pos = np.concatenate(positions)
        tok_rows = np.concatenate(row_of_token)
        slots = tables[tok_rows, pos // page] * page + pos % page
        ends = np.cumsum(lengths) - 1
        sampled = [i for i, c in enumerate(chunks) if c.samples]
        seqs = [chunks[i].seq for i in sampled]
        knobs = np.array([s.knobs for s in seqs], dtype=np.float64).reshape(-1, 4)  # seeds < 2^32 are exact
        return StepInputs(
            ids=np.array(ids, dtype=np.int64), positions=pos, slots=slots, num_decode=num_decode, tables=tables,
            context_lens=starts + lengths, q_lens=lengths,
            context_slots=np.concatenate(context_slots) if context_slots else np.zeros(0, dtype=np.int64),
            sample_rows=ends[sampled],
            temperature=knobs[:, 0].astype(np.float32), top_k=knobs[:, 1].astype(np.int64),
            top_p=knobs[:, 2].astype(np.float32), seed=knobs[:, 3].astype(np.int64),
            index=np.array([s.generated for s in seqs], dtype=np.int64),
            mode=mode_for([s.params for s in seqs]),
        )
