"""liger-kernel's Triton kernels for Llama-family models, applied to one model instance.

What they buy (measured in benchmarks/train_speed.py): the fused linear + cross-entropy never
materialises the (tokens × vocabulary) logits and their fp32 gradient — gigabytes at 7B scale
with 8k tokens per step — and RMSNorm, SwiGLU and RoPE become one kernel each instead of a
chain of elementwise ops. liger is a well-kept, widely used library, so we call it rather than
write these kernels again; it is an optional dependency (`pip install 'tunelab[gpu]'`).
"""

from __future__ import annotations

import importlib.util

ENTRY_POINTS = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral"}
"""model_type → liger's patch function (Llama 2/3 and SmolLM2 are `llama`)."""

PARTS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")


def available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply(model, fused_cross_entropy: bool = True) -> list[str]:
    """Patch this model instance (and, for RoPE, transformers' module-level function, which liger
    can only patch globally; the kernel is exact, so other models lose nothing)."""
    import liger_kernel.transformers as liger

    parts = {part: part != "fused_linear_cross_entropy" or fused_cross_entropy for part in PARTS}
    patch = getattr(liger, ENTRY_POINTS[model.config.model_type])
    patch(model=model, cross_entropy=False, **parts)
    return [f"liger:{part}" for part, on in parts.items() if on]
