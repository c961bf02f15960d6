"""Attention over the paged KV cache: what one layer of one engine step computes.

A step's tokens are flat, `(T, H, D)`: first one query token per decoding sequence, then the
chunks of sequences being prefilled. Each layer writes the step's keys and values into the pool
at their slots (`write_kv`), then attends:

- decode rows (one query each, the whole context in the pool): `decode` — our Triton kernel on
  CUDA (one program per sequence and KV head, walking the block table, online softmax as in
  FlashAttention-2 / vLLM's paged attention v1), the torch reference elsewhere;
- prefill rows (a chunk of queries, causal over everything before them): the context's keys
  and values are gathered from the pool into one packed tensor and handed to torch's varlen
  flash kernel (bottom-right causal, so a chunk sees the prefix cached by earlier chunks).

`AttentionContext` carries the step's layout; the model step (`runner.py`) sets it, and the
attention function transformers calls (`paged_attention_forward`, registered as `NAME`) reads
it. The torch references are what the CPU runs and what the GPU kernels are tested against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "tunelab_paged"


@dataclass
class Prefill:
    """The prefill rows of a step: `cu_q`/`cu_k` cumulative query/context lengths (N+1,) int32 on
    the device, their maxima as ints, and the pool slots of every context token (sum ctx,)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    slots: torch.Tensor
    q_lens: list[int]
    k_lens: list[int]
    masks: list[torch.Tensor] | None = None  # the torch reference's causal masks, made once a step


@dataclass
class AttentionContext:
    """One step's layout. kv: (layers, 2, blocks, page, Hkv, D); slots (T,) int64: where each
    token's K/V go; decode: the first `num_decode` tokens with their block tables (B, W) and
    context lengths (B,) (the written token included); prefill: the rest, or None."""

    kv: torch.Tensor
    slots: torch.Tensor
    num_decode: int
    block_tables: torch.Tensor | None
    context_lens: torch.Tensor | None
    prefill: Prefill | None
    fast: bool  # Triton decode + varlen prefill (CUDA, 16-bit); else the torch references
    index: tuple | None = None  # the torch reference's decode gather (slots, mask), made once a step


context: AttentionContext | None = None
"""The step in flight (set by the runner around a forward pass, None otherwise)."""


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """cache: (2, blocks, page, Hkv, D); k, v: (T, Hkv, D); slots (T,) int64 = block * page + offset."""
    heads, dim = cache.shape[-2:]
    cache[0].view(-1, heads, dim).index_copy_(0, slots, k)
    cache[1].view(-1, heads, dim).index_copy_(0, slots, v)


def attend(layer: int, q: torch.Tensor, scale: float, k: torch.Tensor | None = None,
           v: torch.Tensor | None = None) -> torch.Tensor:
    """q (T, Hq, D) of the step in `context` → attention output (T, Hq, D); k/v (T, Hkv, D) are
    written to the pool first (None: the caller wrote them already)."""
    ctx = context
    cache = ctx.kv[layer]
    if k is not None:
        write_kv(cache, k, v, ctx.slots)
    n = ctx.num_decode
    if n and not ctx.fast and ctx.index is None:
        ctx.index = decode_index(ctx.block_tables, ctx.context_lens, cache.shape[2])
    if ctx.prefill is None:
        return decode(q, cache, ctx.block_tables, ctx.context_lens, scale, ctx.fast, ctx.index)
    out = torch.empty_like(q)
    if n:
        out[:n] = decode(q[:n], cache, ctx.block_tables, ctx.context_lens, scale, ctx.fast, ctx.index)
    out[n:] = prefill(q[n:], cache, ctx.prefill, scale, ctx.fast)
    return out


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-interface signature, for the engine's steps only: query
    (1, Hq, T, D), key/value (1, Hkv, T, D) with RoPE applied → ((1, T, Hq, D), None)."""
    del attention_mask, dropout, kwargs
    flat = lambda t: t[0].transpose(0, 1)  # noqa: E731 — (1, H, T, D) → (T, H, D)
    out = attend(module.layer_idx, flat(query), scaling, flat(key), flat(value))
    return out.unsqueeze(0), None


def register() -> None:
    """Make `attn_implementation=NAME` known to transformers (idempotent). The runner calls the
    decoder layers with no mask, so the mask function builds none."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, paged_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, lambda *args, **kwargs: None)


# -- decode ---------------------------------------------------------------------------------
def decode(q, cache, block_tables, context_lens, scale: float, fast: bool, index=None) -> torch.Tensor:
    """q (B, Hq, D) against each row's context in the pool → (B, Hq, D)."""
    if fast:
        from tunelab.inference.triton_ops import paged_decode

        return paged_decode(q, cache, block_tables, context_lens, scale)
    return reference_decode(q, cache, block_tables, context_lens, scale, index)


def decode_index(block_tables, context_lens, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool slots of every row's context, padded to the longest (B, L), and which are real
    (B, 1, 1, L): the same for every layer of a step."""
    longest = int(context_lens.max())
    pos = torch.arange(longest, device=context_lens.device)
    slots = block_tables[:, pos // page].long() * page + pos % page
    return slots, (pos[None, :] < context_lens[:, None])[:, None, None, :]


def reference_decode(q, cache, block_tables, context_lens, scale: float, index=None) -> torch.Tensor:
    """Gather every row's keys and values (padded to the longest context) and run masked sdpa."""
    slots, mask = index or decode_index(block_tables, context_lens, cache.shape[2])
    keys, values = (_flat(cache[i])[slots].transpose(1, 2) for i in (0, 1))  # (B, Hkv, L, D)
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, 0, :]


# -- prefill --------------------------------------------------------------------------------
def prefill(q, cache, p: Prefill, scale: float, fast: bool) -> torch.Tensor:
    """q (Tq, Hq, D): chunks of N sequences, causal over their whole context in the pool."""
    keys, values = _flat(cache[0])[p.slots], _flat(cache[1])[p.slots]  # (sum ctx, Hkv, D)
    if fast:
        return varlen_prefill(q, keys, values, p, scale)
    return reference_prefill(q, keys, values, p, scale)


def reference_prefill(q, keys, values, p: Prefill, scale: float) -> torch.Tensor:
    """One sequence at a time: sdpa with the causal mask aligned to the end of the context."""
    out = torch.empty_like(q)
    if p.masks is None:  # query i of a chunk sees keys ≤ kl − ql + i
        p.masks = [torch.ones(ql, kl, dtype=torch.bool, device=q.device).tril(kl - ql) for ql, kl in zip(p.q_lens, p.k_lens)]
    qa = ka = 0
    for ql, kl, mask in zip(p.q_lens, p.k_lens, p.masks):
        qs, ks, vs = q[qa : qa + ql].transpose(0, 1), keys[ka : ka + kl].transpose(0, 1), values[ka : ka + kl].transpose(0, 1)
        out[qa : qa + ql] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                           enable_gqa=True).transpose(0, 1)
        qa, ka = qa + ql, ka + kl
    return out


def varlen_prefill(q, keys, values, p: Prefill, scale: float) -> torch.Tensor:
    """torch's flash varlen kernel; causal is bottom-right aligned when a query chunk is shorter
    than its context (FlashAttention ≥ 2.1 semantics), which `tests` and the GPU smoke check pin."""
    from torch.nn.attention.varlen import varlen_attn

    from tunelab.kernels.varlen import _varlen_options

    causal, gqa = _varlen_options()
    if not gqa and q.shape[1] != keys.shape[1]:  # torch ≤ 2.11: no grouped-query heads
        groups = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    extra = {"enable_gqa": True} if gqa else {}
    return varlen_attn(q.contiguous(), keys, values, p.cu_q, p.cu_k, p.max_q, p.max_k, scale=scale, **causal, **extra)


def _flat(cache_half: torch.Tensor) -> torch.Tensor:
    """(blocks, page, Hkv, D) → (blocks·page, Hkv, D): one row per slot."""
    return cache_half.view(-1, *cache_half.shape[-2:])


@functools.cache
def fast_available(device_type: str, dtype: torch.dtype) -> bool:
    """Triton decode and varlen prefill need CUDA, Triton and 16-bit activations."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import triton  # noqa: F401
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True
