"""Triton kernels of the engine's GPU step: paged decode attention and the fused pieces of a
Llama layer (RMSNorm, residual add + RMSNorm, RoPE + KV write, SiLU·mul).

Why fused: a small model's decode step is launch-bound (SmolLM2-135M: ~40 kernels per layer
through transformers' modules, most of them elementwise on a few KB). These cut a layer to
~13 launches. Each kernel rounds to the activation dtype exactly where transformers' modules
do (e.g. RMSNorm normalises in fp32, rounds, then multiplies by the weight), so outputs match
the module path bit for bit up to the last-ulp differences of `exp`. Imported only on CUDA;
`fused.py` holds the torch references the CPU runs and the tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def paged_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, lens_ptr, scale,
                        q_stride_t, q_stride_h, kv_stride_b, kv_stride_p, kv_stride_h, table_stride,
                        o_stride_t, o_stride_h,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                        TILE: tl.constexpr):
    """One (sequence, KV head): q (GROUP, D) against the sequence's `length` cached tokens."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    length = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    in_group = (g < GROUP)[:, None]
    q = tl.load(q_ptr + seq * q_stride_t + heads[:, None] * q_stride_h + d[None, :], mask=in_group, other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for start in range(0, length, TILE):
        pos = start + tl.arange(0, TILE)
        valid = pos < length
        block = tl.load(tables_ptr + seq * table_stride + pos // PAGE, mask=valid, other=0).to(tl.int64)
        row = block * kv_stride_b + (pos % PAGE) * kv_stride_p + kvh * kv_stride_h  # (TILE,)
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (TILE, D)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (GROUP_PAD, TILE)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    out = acc / l[:, None]
    tl.store(o_ptr + seq * o_stride_t + heads[:, None] * o_stride_h + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=in_group)


def paged_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q (B, Hq, D) → (B, Hq, D). Grid (B, Hkv); each program takes the G = Hq/Hkv query heads
    of one KV head (padded to 16 rows for tl.dot) and walks the row's blocks 64 tokens at a time."""
    batch, heads, dim = q.shape
    kv_heads = cache.shape[3]
    group = heads // kv_heads
    out = torch.empty_like(q)
    k, v = cache[0], cache[1]
    paged_decode_kernel[(batch, kv_heads)](
        q, k, v, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, PAGE=cache.shape[2], TILE=64,
        num_warps=4, num_stages=2)
    return out


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, eps, H, stride, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """y = w · round(x / rms(x)); with ADD, first x = round(res + x), written back to res."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0)
    if ADD:
        x = (tl.load(res_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / H
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * stride + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, H) → normed (T, H); with `residual`, residual += x (in place) first and that is normed."""
    y = torch.empty_like(x)
    rows, hidden = x.shape
    _rmsnorm_kernel[(rows,)](x, x if residual is None else residual, weight, y, eps, hidden, x.stride(0),
                             ADD=residual is not None, BLOCK=triton.next_power_of_2(hidden), num_warps=4)
    return y


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, kc_ptr, vc_ptr,
                       q_stride, k_stride, v_stride, cs_stride,
                       HQ: tl.constexpr, HKV: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                       HALF: tl.constexpr):
    """One token: RoPE on its q heads (in place) and k heads, then k and v into the pool slot."""
    t = tl.program_id(0)
    j = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + t * cs_stride + j).to(tl.float32)
    c2 = tl.load(cos_ptr + t * cs_stride + HALF + j).to(tl.float32)
    s1 = tl.load(sin_ptr + t * cs_stride + j).to(tl.float32)
    s2 = tl.load(sin_ptr + t * cs_stride + HALF + j).to(tl.float32)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    hq = tl.arange(0, HQ_PAD)[:, None]
    qm = hq < HQ
    qa = q_ptr + t * q_stride + hq * (2 * HALF) + j[None, :]
    x1 = tl.load(qa, mask=qm, other=0.0)
    x2 = tl.load(qa + HALF, mask=qm, other=0.0)
    dt = x1.dtype
    # transformers: q·cos + rotate_half(q)·sin, each product rounded, then the sum
    y1 = ((x1.to(tl.float32) * c1).to(dt).to(tl.float32) + (-x2.to(tl.float32) * s1).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2.to(tl.float32) * c2).to(dt).to(tl.float32) + (x1.to(tl.float32) * s2).to(dt).to(tl.float32)).to(dt)
    tl.store(qa, y1, mask=qm)
    tl.store(qa + HALF, y2, mask=qm)
    hk = tl.arange(0, HKV_PAD)[:, None]
    km = hk < HKV
    ka = k_ptr + t * k_stride + hk * (2 * HALF) + j[None, :]
    x1 = tl.load(ka, mask=km, other=0.0)
    x2 = tl.load(ka + HALF, mask=km, other=0.0)
    y1 = ((x1.to(tl.float32) * c1).to(dt).to(tl.float32) + (-x2.to(tl.float32) * s1).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2.to(tl.float32) * c2).to(dt).to(tl.float32) + (x1.to(tl.float32) * s2).to(dt).to(tl.float32)).to(dt)
    dst = slot * (HKV * 2 * HALF) + hk * (2 * HALF) + j[None, :]
    tl.store(kc_ptr + dst, y1, mask=km)
    tl.store(kc_ptr + dst + HALF, y2, mask=km)
    va = v_ptr + t * v_stride + hk * (2 * HALF) + j[None, :]
    tl.store(vc_ptr + dst, tl.load(va, mask=km, other=0.0), mask=km)
    tl.store(vc_ptr + dst + HALF, tl.load(va + HALF, mask=km, other=0.0), mask=km)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: torch.Tensor, slots: torch.Tensor) -> None:
    """q (T, Hq·D) rotated in place; rotated k and v (T, Hkv·D) written to cache (2, blocks, page,
    Hkv, D) at slots (T,). cos, sin (T, D)."""
    heads_kv, dim = cache.shape[-2:]
    heads_q = q.shape[1] // dim
    _rope_write_kernel[(q.shape[0],)](q, k, v, cos, sin, slots, cache[0], cache[1],
                                      q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
                                      HQ=heads_q, HKV=heads_kv, HQ_PAD=triton.next_power_of_2(heads_q),
                                      HKV_PAD=triton.next_power_of_2(heads_kv), HALF=dim // 2, num_warps=4)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    g = tl.load(g_ptr + i, mask=mask, other=0.0)
    u = tl.load(u_ptr + i, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(y_ptr + i, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """round(round(silu(gate)) · up), as `act_fn(gate_proj(x)) * up_proj(x)` computes it."""
    y = torch.empty_like(gate)
    n = gate.numel()
    _silu_mul_kernel[(triton.cdiv(n, 2048),)](gate, up, y, n, BLOCK=2048, num_warps=8)
    return y
