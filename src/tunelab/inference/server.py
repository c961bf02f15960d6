"""`tunelab serve`: an OpenAI-compatible HTTP server over one engine.

POST /v1/chat/completions and /v1/completions (JSON or SSE streaming; `logprobs` on
completions, scored by the model on the prompt + generated tokens), GET /v1/models, /health,
/metrics. The request's `model` picks the base model or one of the named LoRA adapters, which
peft holds side by side on the one base. Requests are batched together only while they use the
same adapter: a request for another adapter waits until those in flight finish, then the
adapter is switched (peft applies one adapter set to a whole batch).

Every client mistake gets a 4xx with OpenAI's error body `{"error": {message, type, param, code}}`.
A body over `max_body_bytes` is refused (413) before it is parsed, prompts are tokenized off the
event loop (so /health and the streams keep answering), and a request whose client hangs up is
cancelled in the engine, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from tunelab.errors import TunelabError
from tunelab.inference.base import Engine, SamplingParams, TextStream
from tunelab.inference.prompts import prompt_ids

T = TypeVar("T")
MIN_BODY_BYTES = 256 * 2**10
BODY_BYTES_PER_TOKEN = 16  # JSON of a prompt that fills the context: ~4-5 a token in English, \uXXXX escapes ~12
UNKNOWN_CONTEXT_BODY_BYTES = 8 * 2**20
# Prompts tokenized at once, off the event loop: two, so one long prompt does not hold the others
# up, and no more, so the tokenizer does not crowd the loop and the engine's thread off the CPU and
# the GIL (six at once on 2 cores: /health at ~0.5 s; one or two: ~0.1-0.2 s)
TOKENIZER_THREADS = 2


def default_body_limit(max_context: int | None) -> int:
    """Bytes of request body the server reads: what a prompt filling the context could take, with room.
    A bigger body could only end in `context_length_exceeded`, after seconds of tokenizing (~3 s a MB)."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_context) if max_context else UNKNOWN_CONTEXT_BODY_BYTES


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class BodyLimit:
    """ASGI middleware: reads the request body itself, counting, and answers 413 once it passes `limit`
    (or at once when Content-Length says so), so an oversized body is never buffered whole, parsed or
    tokenized; the app gets the same bytes, then the server's own messages (`http.disconnect`)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before its body arrived: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        error = ApiError(413, f"the request body is over {self.limit:,} bytes; send a shorter prompt, or start "
                              "the server with a larger --max-body-bytes", code="request_too_large")
        await error.response()(scope, receive, send)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client hangs up first; `work` is then cancelled (its
    generator's `finally` cancels the engine request), as Starlette does for a streaming response."""
    async def hung_up():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the engine request is cancelled before we return
    return task.result() if not task.cancelled() else None


class _Sampling(BaseModel):
    """Fields both endpoints share. Strict types: `"max_tokens": "5"` is an error, not a 5."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)  # not in OpenAI's API; vLLM and others accept it
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)

    def params(self, default_max: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(max_new_tokens=self.max_tokens or default_max, temperature=self.temperature or 0.0,
                              top_p=self.top_p or 1.0, top_k=self.top_k or 0, stop=tuple(stop), seed=self.seed)


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, v):
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send one prompt per request")
        return v


class AdapterGate:
    """Lets requests for the active adapter in together; switches only when none is in flight,
    and holds new arrivals for the active adapter back while another adapter waits (no starvation)."""

    def __init__(self, select, active: str):
        self.select, self.active, self.in_flight = select, active, 0
        self._cond = asyncio.Condition()
        self._waiting: Counter[str] = Counter()

    def _may_enter(self, name: str) -> bool:
        others = sum(n for k, n in self._waiting.items() if k != self.active)
        return self.in_flight == 0 or (name == self.active and others == 0)

    @asynccontextmanager
    async def use(self, name: str):
        async with self._cond:
            self._waiting[name] += 1
            try:
                await self._cond.wait_for(lambda: self._may_enter(name))
            finally:
                self._waiting[name] -= 1
            if name != self.active:
                self.select(name)
                self.active = name
            self.in_flight += 1
        try:
            yield
        finally:
            async with self._cond:
                self.in_flight -= 1
                self._cond.notify_all()


def select_adapter(model, name: str | None) -> None:
    """Make `name` (None: the base model) the adapter every following forward uses."""
    if not hasattr(model, "peft_config"):
        return
    if name is None:
        model.base_model.disable_adapter_layers()
    else:
        model.base_model.enable_adapter_layers()
        model.set_adapter(name)


def score_logprobs(engine: Engine, prompt: list[int], generated: list[int], top: int) -> dict:
    """OpenAI's completions `logprobs` from one forward pass of the model over prompt + completion."""
    import torch

    tok = engine.tokenizer
    with engine.exclusive(), torch.no_grad():
        ids = torch.tensor([prompt + generated], device=engine.model.device)
        logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, torch.tensor(generated, device=logp.device)[:, None])[:, 0].tolist()
    tokens = [tok.decode([t]) for t in generated]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops = []
    if top:
        values, indices = logp.topk(top, dim=-1)
        tops = [{tok.decode([i]): v for v, i in zip(vs, ix)} for vs, ix in zip(values.tolist(), indices.tolist())]
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops or None, "text_offset": offsets}


def create_app(engine: Engine, model_name: str, *, adapters: list[str] = (), api_key: str | None = None,
               max_context: int | None = None, default_max_tokens: int = 256,
               max_body_bytes: int | None = None) -> FastAPI:
    """The app over a running engine; `adapters` are names already loaded on engine.model by peft;
    `max_body_bytes` None: `default_body_limit` of the context.

    The server uses the engine's model itself (adapter switching, logprob scoring), so a backend
    that keeps its weights to itself (vLLM, whose own server is `vllm serve`) is refused."""
    if engine.model is None:
        raise TunelabError(f"serve: the {engine.name} backend does not expose its model; "
                           "tunelab serves with --backend paged or static (for vLLM use `vllm serve`)")
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)
    names = [model_name, *adapters]
    created = int(time.time())
    gate = AdapterGate(lambda name: select_adapter(engine.model, None if name == model_name else name), model_name)
    tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tunelab-tokenize")
    if max_context is None:
        max_context = getattr(engine.model.config, "max_position_embeddings", None)
    # added before _auth, so inside it: a wrong key is refused before its body is read
    app.add_middleware(BodyLimit, limit=max_body_bytes or default_body_limit(max_context))

    @app.exception_handler(ApiError)
    async def _api_error(_request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, err: RequestValidationError):
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return ApiError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                            code="invalid_json").response()
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return ApiError(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value").response()

    @app.exception_handler(TunelabError)
    async def _tunelab(_request, err: TunelabError):
        return ApiError(400, str(err), code="invalid_value").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            return ApiError(401, "missing or incorrect API key: send `Authorization: Bearer <key>`",
                            code="invalid_api_key").response()
        return await call_next(request)

    async def tokenized(fn, *args) -> list[int] | dict:
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    def checked(req: _Sampling, ids: list[int]) -> SamplingParams:
        if not engine.alive():
            raise ApiError(503, "the generation engine has stopped (see the server's log); restart `tunelab serve`",
                           kind="server_error", code="engine_stopped")
        if req.model not in names:
            raise ApiError(404, f"model '{req.model}' does not exist; available: {', '.join(names)}",
                           param="model", code="model_not_found")
        params = req.params(default_max_tokens)
        if max_context and len(ids) + params.max_new_tokens > max_context:
            raise ApiError(400, f"this model's context is {max_context} tokens; the prompt has {len(ids)} and "
                           f"max_tokens asks for {params.max_new_tokens} more", param="max_tokens",
                           code="context_length_exceeded")
        return params

    async def run(request: Request, req: _Sampling, ids: list[int], params: SamplingParams, chunk,
                  final) -> Response | dict:
        """Generate under the adapter gate; stream SSE chunks or return the final body."""
        rid = ("chatcmpl-" if isinstance(req, ChatRequest) else "cmpl-") + uuid.uuid4().hex[:24]

        async def tokens():
            async with gate.use(req.model):
                handle = engine.submit(ids, params, loop=asyncio.get_running_loop())
                text = TextStream(engine.tokenizer, params.stop)
                reason = "length"
                try:
                    async for delta in handle.aevents():
                        if delta.error:
                            raise ApiError(500, f"generation failed: {delta.error}", kind="server_error")
                        piece = text.push(delta.token_ids, final=delta.finished)
                        if text.stopped:
                            reason = "stop"
                            yield piece, text, reason
                            return
                        reason = delta.finish_reason or reason
                        yield piece, text, (reason if delta.finished else None)
                finally:
                    if not handle.finished_at:
                        engine.cancel(handle.id)  # client gone or stop string: free the cache now

        if req.stream:
            async def sse():
                async for piece, _text, reason in tokens():
                    if piece or reason:
                        yield f"data: {json.dumps(chunk(rid, piece, reason))}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        async def answer():
            text, reason = None, "length"
            async for _piece, text, reason in tokens():
                pass
            return text, reason

        done = await unless_disconnected(request, answer())
        if done is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return await final(rid, *done)  # not cancelled: logprob scoring holds the model in a thread

    def usage(ids, text) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": len(text.token_ids),
                "total_tokens": len(ids) + len(text.token_ids)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        ids = await tokenized(prompt_ids, engine.tokenizer, [m.model_dump() for m in req.messages])
        if req.max_completion_tokens and not req.max_tokens:
            req.max_tokens = req.max_completion_tokens
        params = checked(req, ids)

        def chunk(rid, piece, reason):
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": reason}]}

        async def final(rid, text, reason):
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text.text},
                                 "finish_reason": reason}], "usage": usage(ids, text)}

        return await run(request, req, ids, params, chunk, final)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt[0] if isinstance(req.prompt, list) else req.prompt
        ids = (await tokenized(engine.tokenizer, prompt))["input_ids"]
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
        params = checked(req, ids)
        if req.stream and req.logprobs is not None:
            raise ApiError(400, "logprobs are returned on non-streaming requests only", param="logprobs")
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")

        def chunk(rid, piece, reason):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                    "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}]}

        async def final(rid, text, reason):
            logprobs = None
            if req.logprobs is not None and text.token_ids:
                async with gate.use(req.model):  # score with the same adapter that generated
                    logprobs = await asyncio.to_thread(score_logprobs, engine, ids, text.token_ids, req.logprobs)
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                    "choices": [{"index": 0, "text": text.text, "logprobs": logprobs, "finish_reason": reason}],
                    "usage": usage(ids, text)}

        return await run(request, req, ids, params, chunk, final)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "tunelab"}
                                           for n in names]}

    @app.get("/health")
    async def health():
        if not engine.alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return {**engine.metrics(), "requests_in_flight": gate.in_flight, "active_model": gate.active}

    return app


def parse_adapters(spec: str | None) -> dict[str, str]:
    """`a=dir,b=dir` → {"a": "dir", "b": "dir"}."""
    out = {}
    for part in filter(None, (spec or "").split(",")):
        name, sep, folder = part.partition("=")
        if not sep or not name or not folder:
            raise TunelabError(f"--adapters: expected name=folder[,name=folder...], got {part!r}")
        out[name.strip()] = folder.strip()
    return out
