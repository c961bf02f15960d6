"""The pieces of a Llama layer that the fused step program computes itself, each as a torch
reference (what the CPU runs; what `triton_ops` is tested against) dispatching to its Triton
kernel on the GPU. The references compute exactly what transformers' modules compute."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.inference.attention import write_kv


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            fast: bool = False) -> torch.Tensor:
    """LlamaRMSNorm of x (T, H); with `residual`, first residual += x in place and norm that
    (the decoder layer's `residual + hidden_states` followed by the next norm)."""
    if fast:
        from tunelab.inference import triton_ops

        return triton_ops.rmsnorm(x, weight, eps, residual)
    if residual is not None:
        x = residual.add_(x)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: torch.Tensor, slots: torch.Tensor, fast: bool = False) -> None:
    """RoPE on q (T, Hq·D) in place and on k (T, Hkv·D); k and v go into cache (2, blocks, page,
    Hkv, D) at slots (T,). cos, sin: (T, D), as the model's rotary embedding returns them."""
    if fast:
        from tunelab.inference import triton_ops

        return triton_ops.rope_write(q, k, v, cos, sin, cache, slots)
    tokens, dim = q.shape[0], cache.shape[-1]
    qh, kh = q.view(tokens, -1, dim), k.view(tokens, -1, dim)
    c, s = cos[:, None, :], sin[:, None, :]
    qh.copy_(qh * c + _rotate_half(qh) * s)
    write_kv(cache, kh * c + _rotate_half(kh) * s, v.view(tokens, -1, dim), slots)
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """act_fn(gate_proj(x)) * up_proj(x) for act_fn = SiLU."""
    if fast:
        from tunelab.inference import triton_ops

        return triton_ops.silu_mul(gate, up)
    return F.silu(gate) * up
