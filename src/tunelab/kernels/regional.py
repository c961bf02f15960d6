"""`train.compile: auto`: each decoder layer's training forward through torch.compile (regional compilation).

Why regional: the decoder layers are one module repeated N times. Compiling the layer's forward,
which every layer then reuses (parameters are graph inputs, not constants), costs one compilation
instead of a whole-model graph's, and leaves the embedding, the fused cross-entropy and the loop
eager. Why it pays: fewer, fused kernels and far less Python per step; the host stays ahead of the
GPU. Packed rows padded to [rows, max_length] (`Collator(width=, rows=)`) give one static shape, so
the code compiled on the first step serves every step (`dynamic=False`).

Only the training forward (training mode, gradients on) runs compiled: validation, generation
(other shapes, a KV cache) and anything under no_grad take the eager layer. Varlen attention stays
eager inside the graph (`varlen.packed_attention` is `torch.compiler.disable`d: it reads sample
boundaries on the host); liger's Triton kernels and the fused LoRA Functions are traced where Dynamo
can, with graph breaks where it cannot. A stack that does not compile at all is caught by `check`,
one compiled training step before training starts: the layers go back to eager and the run says so.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks (transformers names them `<Arch>DecoderLayer`), through any peft wrapping."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


BACKEND = "inductor"
"""torch.compile's backend. Tests on the CPU set "aot_eager" (the same graphs and autograd, no code
generation), which `apply` then also compiles for; with inductor it compiles on CUDA only."""


def apply(model, mode: str) -> list[str]:
    """Compile `model`'s decoder layers for training under `train.compile` = mode; what is on."""
    if mode == "off" or (BACKEND == "inductor" and not torch.cuda.is_available()):
        return []
    layers = decoder_layers(model)
    for layer in layers:
        compile_layer(layer, BACKEND)
    return [f"compile:{len(layers)}_layers"] if layers else []


def compile_layer(layer: torch.nn.Module, backend: str) -> None:
    eager = layer.forward
    compiled = torch.compile(eager, backend=backend, dynamic=False)

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    layer._tunelab_eager_forward = eager
    layer.forward = forward


def remove(model) -> None:
    """Back to the eager forwards (the class's own, or whatever was bound before `apply`)."""
    for layer in decoder_layers(model):
        eager = layer.__dict__.pop("_tunelab_eager_forward", None)
        if eager is None:
            continue
        if getattr(eager, "__func__", None) is type(layer).forward:
            del layer.forward
        else:
            layer.forward = eager


def check(model, step: Callable[[], None]) -> bool:
    """Run `step` (one training forward and backward) on the compiled layers; on any error compile
    raises, back to eager with a warning. True when the compiled step ran."""
    try:
        step()
    except Exception as err:  # noqa: BLE001 (Dynamo/Inductor raise many types; eager training still works)
        remove(model)
        torch._dynamo.reset()
        log.warning("train.compile=auto: the decoder layers did not compile (%s: %s); training them eagerly",
                    type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
        return False
    return True
