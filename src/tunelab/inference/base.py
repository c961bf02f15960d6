"""The generation interface every backend implements, and the types it speaks in.

An `Engine` takes requests (`submit`), delivers each request's tokens as `Delta` events on its
`Handle`, and cancels them; text, stop strings and finish reasons are handled here, once, for
all backends. This module imports no backend: `backends.py` chooses and builds them, and each
backend module imports only this one (and `kv.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from tunelab.errors import TunelabError
from tunelab.inference.kv import KVLedger

RATE_WINDOW_S = 10.0  # /metrics tokens/s: generated tokens over the last this many seconds


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not 0 <= self.temperature <= 5:
            problems.append(f"temperature must be in [0, 5], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if problems:
            raise TunelabError("sampling: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Delta:
    """New tokens of one request; the last event of a request has `finished` set."""

    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "cancelled", "error"
    error: str | None = None


class Handle:
    """A submitted request: its id, prompt and the events the backend delivers (thread-safe).

    With `loop`, events are also put on an asyncio queue of that loop (for the server);
    otherwise they are read with the blocking `events()`.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, loop=None):
        self.id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.submitted = time.perf_counter()
        self.first_at: float | None = None  # when the first token arrived (time to first token)
        self.finished_at: float | None = None
        self.seen = 0  # tokens delivered so far (backends that report cumulative outputs)
        self._loop = loop
        self._queue: queue.SimpleQueue[Delta] | asyncio.Queue[Delta] = asyncio.Queue() if loop else queue.SimpleQueue()

    def put(self, delta: Delta) -> None:
        if self.first_at is None and delta.token_ids:
            self.first_at = time.perf_counter()
        if delta.finished:
            self.finished_at = time.perf_counter()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        else:
            self._queue.put(delta)

    def events(self) -> Iterator[Delta]:
        while True:
            delta = self._queue.get()
            yield delta
            if delta.finished:
                return

    async def aevents(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finished:
                return


@dataclass
class Completion:
    """A finished request as text."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class TextStream:
    """Turns token deltas into text deltas, holding back text that could be the start of a stop
    string, and says when a stop string ends the request."""

    tokenizer: object
    stop: tuple[str, ...]
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already handed out
    stopped: bool = False

    def push(self, token_ids: list[int], final: bool = False) -> str:
        self.token_ids += token_ids
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for s in self.stop if (i := text.find(s, max(0, self.emitted - len(s)))) >= 0), default=-1)
        if cut >= 0:
            self.stopped, final, text = True, True, text[:cut]
        elif text.endswith("\ufffd") and not final:  # half of a multi-byte character: wait for the rest
            return ""
        safe = len(text) if final else len(text) - self._held(text)
        out, self.emitted = text[self.emitted : max(safe, self.emitted)], max(safe, self.emitted)
        return out

    def _held(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)[: self.emitted]


class Engine(ABC):
    """Submit requests, stream their tokens, cancel them; report the KV cache.

    `model` is the transformers model the engine generates with, or None when the backend holds
    its weights itself (vLLM); `exclusive()` lends that model outside the batch loop (the
    server scores logprobs with it). Callers that need either check `model is not None`.
    """

    name: str
    _ids = itertools.count()

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.ledger: KVLedger | None = None  # backends that account their KV cache set one (vLLM keeps its own)
        self.tokens_out = 0  # generated tokens delivered
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW_S seconds

    # -- what a backend implements ------------------------------------------------------------
    @abstractmethod
    def _submit(self, handle: Handle) -> None: ...

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request; its cache is freed and its handle gets a final `cancelled` event."""

    def kv(self) -> dict:
        """{"now": current KV state, "summary": over the run so far}."""
        if self.ledger is None:
            return {"now": {}, "summary": {}}
        return {"now": self.ledger.now(), "summary": self.ledger.summary()}

    def alive(self) -> bool:
        """Whether the engine can still generate (its background thread runs); the server's /health
        and new requests read it, so a dead engine answers 503 instead of leaving clients hanging."""
        return True

    def exclusive(self) -> contextlib.AbstractContextManager:
        """Hold `model` while no generation step runs (to use it for something else)."""
        raise TunelabError(f"--backend {self.name}: the model is not reachable outside the engine; "
                           "use --backend paged or static")

    def close(self) -> None:
        """Stop background work."""

    def waiting(self) -> int:
        """Requests submitted but not yet running."""
        return self.kv()["now"].get("waiting", 0)

    # -- shared -------------------------------------------------------------------------------
    def _submit_many(self, handles: list[Handle]) -> None:
        for handle in handles:
            self._submit(handle)

    def _handle(self, prompt_ids: list[int], params: SamplingParams, loop=None) -> Handle:
        if not prompt_ids:
            raise TunelabError("prompt: empty after tokenization")
        return Handle(f"{self.name}-{next(self._ids)}", list(prompt_ids), params, loop)

    def submit(self, prompt_ids: list[int], params: SamplingParams, loop=None) -> Handle:
        handle = self._handle(prompt_ids, params, loop)
        self._submit(handle)
        return handle

    def submit_many(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Handle]:
        """Submit a workload at once (a static batch can then take all of it from the start);
        one SamplingParams for all, or one per prompt."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        handles = [self._handle(p, sp) for p, sp in zip(prompts, per_prompt)]
        self._submit_many(handles)
        return handles

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Text deltas of one request as they come (stop strings cut and end it)."""
        handle = self.submit(prompt_ids, params)
        text = TextStream(self.tokenizer, params.stop)
        for delta in handle.events():
            if delta.error:
                raise TunelabError(f"generation failed: {delta.error}")
            piece = text.push(delta.token_ids, final=delta.finished)
            if piece:
                yield piece
            if text.stopped:
                self.cancel(handle.id)
                return

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None) -> list[Completion]:
        """Submit every prompt at once and collect the completions in order."""
        return [self.collect(h, progress) for h in self.submit_many(prompts, params)]

    def collect(self, handle: Handle, progress=None) -> Completion:
        text = TextStream(self.tokenizer, handle.params.stop)
        reason, error = "length", None
        for delta in handle.events():
            text.push(delta.token_ids, final=delta.finished)
            if text.stopped:
                self.cancel(handle.id)
                reason = "stop"
                break
            if delta.finished:
                reason, error = delta.finish_reason or "length", delta.error
        if progress is not None:
            progress.update(1)
        return Completion(text.text, text.token_ids, reason, len(handle.prompt_ids),
                          (handle.finished_at or time.perf_counter()) - handle.submitted, error)

    def _delivered(self, n: int) -> None:
        """Count generated tokens (called by the backend's delivery thread)."""
        now = time.perf_counter()
        self.tokens_out += n
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def metrics(self) -> dict:
        recent = [n for t, n in list(self._recent) if t >= time.perf_counter() - RATE_WINDOW_S]
        kv = self.kv()
        return {"backend": self.name, "queue_depth": self.waiting(), "tokens_generated": self.tokens_out,
                "tokens_per_s": round(sum(recent) / RATE_WINDOW_S, 2), "kv": kv["now"], "kv_summary": kv["summary"]}


def finish_reason(token_ids: list[int], eos: set[int]) -> str:
    """'stop' when the last token ends the turn, else 'length' (the token limit)."""
    return "stop" if token_ids and token_ids[-1] in eos else "length"


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the model's generation config may list several (chat models)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
