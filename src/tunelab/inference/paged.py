"""The `paged` backend: transformers' paged KV cache and continuous batching, wrapped.

transformers (>= 5.17) runs a background thread that schedules requests into one token batch
per step, allocating cache blocks of `page_size` tokens on demand and freeing them when a
request ends (`model.init_continuous_batching`). We size the cache explicitly (its defaults
probe GPU memory and are slow on CPU), route its outputs to per-request handles, turn sampling
options into its per-request processor arguments, and read its block tables once per step for
the KV accounting (`kv.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading

from tunelab.errors import TunelabError
from tunelab.inference.base import Delta, Engine, Handle, eos_ids, finish_reason
from tunelab.inference.kv import KVLedger, PagedCacheReader

log = logging.getLogger(__name__)

CPU_KV_BUDGET_TOKENS = 8192  # on CPU the cache is sized explicitly; transformers' probe is for GPUs
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}
"""Any value other than the neutral one makes transformers build the processor, which then takes
each request's own value; a greedy request is top_k=1 (the argmax, sampled with certainty)."""


def cb_config(page_size: int, num_blocks: int | None, max_batch_tokens: int | None, seed: int | None, on_cpu: bool,
              cuda_graph: bool | None = None):
    """A ContinuousBatchingConfig for transformers 5.17 (`block_size`) and 5.2x (`page_size`)."""
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:
        import transformers

        raise TunelabError(
            f"--backend paged needs transformers >= 5.17 (continuous batching); found {transformers.__version__}. "
            "Upgrade transformers or use --backend static"
        ) from None
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    kwargs = {"page_size" if "page_size" in names else "block_size": page_size, "num_blocks": num_blocks,
              "max_batch_tokens": max_batch_tokens, "seed": seed, "per_request_processors": True,
              # Prefix sharing makes blocks shared between requests; off, so every block is one request's.
              "allow_block_sharing": False}
    if on_cpu:  # no CUDA graphs and no double buffering without a GPU stream
        kwargs |= {"use_cuda_graph": False, "use_async_batching": False}
    elif cuda_graph is not None:
        kwargs["use_cuda_graph"] = cuda_graph
    return ContinuousBatchingConfig(**kwargs)


class PagedEngine(Engine):
    name = "paged"

    def __init__(self, model, tokenizer, *, page_size: int = 16, kv_budget_tokens: int | None = None,
                 max_batch_tokens: int | None = None, sampling: bool = True, seed: int | None = None,
                 cuda_graph: bool | None = None):
        """kv_budget_tokens: cache size in tokens (num_blocks = budget / page_size); None = 8,192 on
        CPU, transformers' choice from free memory on a GPU. sampling=False builds no sampling
        processors (greedy only, the fastest step); seed seeds the engine's sampler; cuda_graph
        None lets transformers decide."""
        super().__init__(model, tokenizer)
        if not hasattr(model, "init_continuous_batching"):
            raise TunelabError("--backend paged: this model class has no continuous batching in the installed "
                               "transformers; use --backend static")
        on_cpu = model.device.type == "cpu"
        if kv_budget_tokens is None and on_cpu:
            kv_budget_tokens = CPU_KV_BUDGET_TOKENS
        if page_size < 4:
            raise TunelabError(f"--page-size must be >= 4 (transformers' minimum), got {page_size}")
        num_blocks = None if kv_budget_tokens is None else max(kv_budget_tokens // page_size, 1)
        if max_batch_tokens is None and on_cpu:
            max_batch_tokens = 256
        from transformers import GenerationConfig

        if not logging.getLogger().isEnabledFor(logging.DEBUG):  # its INFO lines are per-batch chatter
            logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        self.sampling = sampling
        self.eos = eos_ids(model, tokenizer)
        gen = GenerationConfig(max_new_tokens=128, eos_token_id=sorted(self.eos), pad_token_id=tokenizer.pad_token_id,
                               do_sample=sampling, **(SAMPLING_DEFAULTS if sampling else {}))
        self.manager = model.init_continuous_batching(
            generation_config=gen,
            continuous_batching_config=cb_config(page_size, num_blocks, max_batch_tokens, seed, on_cpu, cuda_graph))
        self.ledger = KVLedger.for_model(model)
        self._reader = PagedCacheReader()
        self._handles: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self._watch_steps()
        self.manager.start()
        self._closed = False
        self._router = threading.Thread(target=self._route, name="tunelab-paged-router", daemon=True)
        self._router.start()

    def _watch_steps(self) -> None:
        """Snapshot the cache after each scheduling decision, in the generation thread (where the
        scheduler's dicts are consistent). transformers has no hook for this, so the batch
        processor's `prepare_next_batch` is wrapped on this instance only, when the thread makes it."""
        manager = self.manager
        create = manager._create_batch_processor

        def create_watched():
            processor = create()
            prepare = processor.prepare_next_batch
            if getattr(prepare, "_tunelab_watched", False):  # a reused processor is already watched
                return processor

            def prepare_and_record() -> bool:
                scheduled = prepare()
                self.ledger.record(self._reader.snapshot(processor), step=scheduled)
                return scheduled

            prepare_and_record._tunelab_watched = True
            processor.prepare_next_batch = prepare_and_record
            return processor

        manager._create_batch_processor = create_watched

    def _route(self) -> None:
        """Move each output from transformers' shared queue to its request's handle."""
        while not self._closed:
            out = self.manager.get_result(timeout=0.1)
            if out is None:
                if not self.manager.is_running() and not self._closed:
                    self._fail_all("the generation thread stopped (see the log above)")
                    return
                continue
            with self._lock:
                handle = self._handles.get(out.request_id)
            if handle is None:  # cancelled already
                continue
            new = list(out.generated_tokens[handle.seen :])
            handle.seen += len(new)
            self._delivered(len(new))
            if not out.is_finished():
                handle.put(Delta(new))
                continue
            with self._lock:
                self._handles.pop(out.request_id, None)
            if out.error:
                handle.put(Delta(new, True, "error", out.error))
            else:
                handle.put(Delta(new, True, finish_reason(out.generated_tokens, self.eos)))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.put(Delta([], True, "error", message))

    def _submit(self, handle: Handle) -> None:
        p = handle.params
        if not p.greedy and not self.sampling:
            raise TunelabError("temperature > 0 needs an engine started with sampling (this one is greedy-only)")
        kwargs = {}
        if self.sampling:  # every request passes all three: transformers' per-request processors are on
            vocab = self.model.config.get_text_config().vocab_size
            kwargs = {"temperature": float(p.temperature or 1.0), "top_p": float(p.top_p),
                      "top_k": int(1 if p.greedy else (p.top_k or vocab))}
        with self._lock:
            self._handles[handle.id] = handle
        rid = self.manager.add_request(handle.prompt_ids, request_id=handle.id, max_new_tokens=p.max_new_tokens,
                                       streaming=True, eos_token_id=sorted(self.eos), **kwargs)
        if rid is None:
            with self._lock:
                self._handles.pop(handle.id, None)
            raise TunelabError("the paged engine is stopping and takes no new requests")

    def cancel(self, request_id: str) -> None:
        with self._lock:
            handle = self._handles.pop(request_id, None)
        self.manager.cancel_request(request_id)
        if handle is not None:
            handle.put(Delta([], True, "cancelled"))

    def waiting(self) -> int:
        return self.ledger.current.waiting + self.manager.input_queue.qsize()

    def exclusive(self) -> contextlib.AbstractContextManager:
        """Use the model outside the batch loop (to score logprobs): transformers 5.2x can pause
        the loop; 5.17 cannot, and has switched the model to paged attention while it runs."""
        if not hasattr(self.manager, "pause"):
            raise TunelabError("logprobs need transformers >= 5.23 with --backend paged (it pauses the batch loop); "
                               "use --backend static")
        return self.manager.pause()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.manager.stop(block=True, timeout=10)
        self._router.join(timeout=2)
        if hasattr(self.manager, "destroy"):
            self.manager.destroy()
