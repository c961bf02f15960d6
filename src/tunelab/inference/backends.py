"""Choose and build an inference backend: the only module that imports them all.

`paged` (default): tunelab's own engine — paged KV pool, continuous batching, graph-captured
decode (`paged.py`) — for Llama-architecture models; other models fall back to `static` with a
one-line notice. `static`: plain `generate()` on padded batches, the comparison baseline
(`static.py`). `vllm`: vLLM when it is installed and a GPU is present (`vllm_backend.py`).
"""

from __future__ import annotations

import logging

from tunelab.errors import TunelabError
from tunelab.inference.base import Engine

BACKENDS = ("auto", "paged", "static", "vllm")
log = logging.getLogger(__name__)


def build_engine(backend: str, model, tokenizer, **options) -> Engine:
    """An engine of `backend` over an already loaded model (see `load_engine` for a target name)."""
    if backend == "paged":
        from tunelab.inference.runner import model_parts

        parts = model_parts(model)
        if not isinstance(parts, str):
            from tunelab.inference.paged import PagedEngine

            return PagedEngine(model, tokenizer, parts=parts, **options)
        log.warning("--backend paged: %s; generating with the static backend instead", parts)
        backend = "static"
    if backend == "static":
        from tunelab.inference.static import StaticEngine

        return StaticEngine(model, tokenizer, **options)
    if backend == "vllm":
        raise TunelabError("--backend vllm loads the model itself: use load_engine(target, backend='vllm')")
    raise TunelabError(f"--backend: got {backend!r}; choose one of {', '.join(BACKENDS)}")


def choose_backend(backend: str) -> str:
    """`auto`: vLLM when it is installed and a GPU is present, else `paged`."""
    if backend not in BACKENDS:
        raise TunelabError(f"--backend: got {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        from tunelab.inference import vllm_backend

        return "vllm" if vllm_backend.available() else "paged"
    return backend


def load_engine(target: str, backend: str = "auto", **options) -> Engine:
    """Load what `tunelab eval` loads (run folder, adapter, model folder, Hub id, .gguf, `embedded`)
    with the run's own tokenizer, and start an engine on it."""
    backend = choose_backend(backend)
    if backend == "vllm":
        from tunelab.inference.vllm_backend import VllmEngine

        return VllmEngine(target, **options)
    from tunelab.models.build import load_for_eval

    model, tokenizer = load_for_eval(target)
    return build_engine(backend, model, tokenizer, **options)
