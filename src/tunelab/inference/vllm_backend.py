"""The `vllm` backend: vLLM's engine behind the same interface, when vLLM and a GPU are there.

vLLM is optional (not installable on every machine) and imported only here. LoRA runs are
served through vLLM's LoRA support (`LoRARequest`), not merged. This backend is not exercised
by the CPU test suite beyond being chosen and refused correctly.
"""

from __future__ import annotations

import importlib.util
import threading

from tunelab.errors import TunelabError
from tunelab.inference.base import Delta, Engine, Handle, finish_reason


def available() -> bool:
    """vLLM importable and a CUDA GPU present."""
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def _require() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise TunelabError("--backend vllm: vLLM is not installed; `pip install vllm` on a CUDA machine, "
                           "or use --backend paged")
    import torch

    if not torch.cuda.is_available():
        raise TunelabError("--backend vllm: needs a CUDA GPU; use --backend paged on this machine")


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, target: str, *, kv_budget_tokens: int | None = None, seed: int | None = None, **_paged_only):
        """vLLM loads the weights itself, from the target's folder or Hub id (adapters stay separate)."""
        _require()
        from vllm import EngineArgs, LLMEngine
        from vllm.lora.request import LoRARequest

        from tunelab.models.build import load_tokenizer
        from tunelab.models.loading import resolve

        source = resolve(target)
        super().__init__(None, load_tokenizer(source))
        args = EngineArgs(model=source.path, tokenizer=str(source.adapter or source.path), seed=seed or 0,
                          enable_lora=source.adapter is not None)
        if kv_budget_tokens:
            args.num_gpu_blocks_override = kv_budget_tokens // 16  # vLLM's default block size is 16 tokens
        self.llm = LLMEngine.from_engine_args(args)
        self.lora = LoRARequest("run", 1, str(source.adapter)) if source.adapter else None
        self.eos = {self.tokenizer.eos_token_id}
        self._handles: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tunelab-vllm", daemon=True)
        self._thread.start()

    def _submit(self, handle: Handle) -> None:
        from vllm import SamplingParams as VllmSampling

        p = handle.params
        sampling = VllmSampling(max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                                top_k=p.top_k or -1, seed=p.seed)
        with self._lock:
            self._handles[handle.id] = handle
            self.llm.add_request(handle.id, {"prompt_token_ids": handle.prompt_ids}, sampling, lora_request=self.lora)

    def _loop(self) -> None:
        import time

        while not self._closed:
            with self._lock:
                outputs = self.llm.step() if self.llm.has_unfinished_requests() else []
            if not outputs:
                time.sleep(0.005)
            for out in outputs:
                handle = self._handles.get(out.request_id)
                if handle is None:
                    continue
                tokens = list(out.outputs[0].token_ids)
                new, handle.seen = tokens[handle.seen :], len(tokens)
                self._delivered(len(new))
                if out.finished:
                    self._handles.pop(out.request_id, None)
                    handle.put(Delta(new, True, finish_reason(tokens, self.eos)))
                elif new:
                    handle.put(Delta(new))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            handle = self._handles.pop(request_id, None)
            self.llm.abort_request(request_id)
        if handle is not None:
            handle.put(Delta([], True, "cancelled"))

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
