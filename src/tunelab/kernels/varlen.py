"""Attention for packed rows without a mask: each sample attends only to itself, through
PyTorch's variable-length flash kernel (`torch.nn.attention.varlen`).

Why: a packed row holds several samples; transformers isolates them for `sdpa` with a
block-diagonal mask, which sends sdpa to its slower masked kernel and spends work on the
masked-out blocks. The varlen kernel takes the sample boundaries (`cu_seqlens`, read off the
restarting `position_ids`) and computes only the diagonal blocks. No flash-attn build exists
on our GPU machines; this kernel ships with torch itself.

Used only in training mode on packed rows; generation, evaluation and anything with dropout
fall through to transformers' own sdpa path, so behaviour there is unchanged.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "tunelab_varlen"


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sample boundaries of packed rows as cumulative offsets into the flattened tokens, and the
    longest sample. A sample starts wherever its position is 0; every row starts a sample."""
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[:: position_ids.shape[-1]] = True  # a row never continues the previous row's sample
    begin = starts.nonzero().flatten()
    bounds = torch.cat([begin, begin.new_tensor([flat.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def reference_varlen(q, k, v, cu, max_len, scale):
    """What the kernel computes, one sample at a time with plain causal sdpa: the CPU reference
    that tests compare against. q: (T, Hq, D); k, v: (T, Hkv, D)."""
    del max_len
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[a:b].transpose(0, 1)
        ks = k[a:b].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[a:b].transpose(0, 1).repeat_interleave(groups, 0)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def torch_varlen(q, k, v, cu, max_len, scale):
    """torch's flash varlen kernel, causal, with grouped-query heads; papers over the API change
    between torch 2.9-2.11 (`is_causal`) and 2.12+ (`window_size`, `enable_gqa`)."""
    from torch.nn.attention.varlen import varlen_attn

    causal, gqa = _varlen_options()
    if not gqa and q.shape[1] != k.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    extra = {"enable_gqa": True} if gqa else {}
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal, **extra)


@functools.cache
def _varlen_options() -> tuple[dict, bool]:
    """(the causal keyword of this torch's varlen_attn, whether it takes enable_gqa), read once:
    attention runs in every layer of every step."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return causal, "enable_gqa" in params


kernel = torch_varlen
"""The function `attention_forward` calls; tests on the CPU swap in `reference_varlen`."""


def available() -> bool:
    """True where the varlen kernel can run: CUDA and a torch that ships it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-interface signature; query (B, Hq, S, D), key/value (B, Hkv, S, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    dtype = _half_dtype(query)
    if not module.training or position_ids is None or dropout or query.shape[2] != key.shape[2] or dtype is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return packed_attention(query, key, value, position_ids, scaling, dtype), None


@torch.compiler.disable
def packed_attention(query, key, value, position_ids, scaling, dtype):
    """The kernel on packed rows: (B, S, Hq, D). Left out of compiled graphs (train.compile): the sample
    boundaries are read on the host, whose values a graph would otherwise be specialised on."""
    batch, heads, seq, dim = query.shape
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    cu, longest = _boundaries(position_ids)
    flat = lambda t: t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim).to(dtype)  # noqa: E731
    out = kernel(flat(query), flat(key), flat(value), cu, longest, scaling)
    return out.view(batch, seq, heads, dim).to(query.dtype)


def _half_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype the flash kernel runs in: the tensors' own, else autocast's (fp32 norms or
    adapters can hand fp32 activations to attention inside a bf16 autocast region); None for real
    fp32 training, which keeps the exact sdpa path."""
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return None


_cache: tuple[torch.Tensor, int, tuple[torch.Tensor, int]] | None = None  # (position_ids, its version, result)


def _boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens for this batch, computed once per forward (and its recomputation under
    activation checkpointing) rather than once per layer: each computation syncs the GPU."""
    global _cache
    if _cache is None or _cache[0] is not position_ids or _cache[1] != position_ids._version:
        _cache = (position_ids, position_ids._version, cu_seqlens(position_ids))
    return _cache[2]


def register() -> None:
    """Make `attn_implementation="tunelab_varlen"` known to transformers (idempotent). Masks are
    built as for sdpa, which the fall-through path needs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
