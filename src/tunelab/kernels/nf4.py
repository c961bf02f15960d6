"""QLoRA's NF4 weights back to 16 bits, for the fused LoRA matmuls in `kernels.lora`.

bitsandbytes stores each frozen weight as 4-bit indices into the NF4 table (two per byte, the
first in the high nibble), one scale per 64 values ("absmax"), and with double quantization
those scales themselves as 8-bit indices into a 256-entry table with one fp32 scale per 256
of them plus an offset (Dettmers et al. 2023, QLoRA, §3). Its `dequantize_4bit` undoes that in
two kernels (scales, then weights) into a new tensor on every call; `dequantize` here does both
in one Triton kernel, into a buffer that every projection reuses, since training dequantizes
each weight three times a step (forward, recomputation, backward) and uses it at once.
`reference` is the same arithmetic in plain torch: the CPU path and what the tests compare.
Values are computed as bitsandbytes does (table value × fp32 scale, then cast), so they match
its output; `benchmarks/train_speed.py` times both.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 1024
"""Packed bytes per Triton program (2,048 weights)."""


def scales(quant_state) -> torch.Tensor:
    """The fp32 scale of each block of weights, undoing double quantization where it was used."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    inner = quant_state.state2
    q = quant_state.absmax.long()  # (blocks,) 8-bit indices into inner.code
    per_block = inner.code[q].view(-1)
    blocks = per_block.numel()
    full = blocks - blocks % inner.blocksize
    out = torch.empty_like(per_block)
    out[:full] = (per_block[:full].view(-1, inner.blocksize) * inner.absmax[: full // inner.blocksize, None]).view(-1)
    out[full:] = per_block[full:] * inner.absmax[full // inner.blocksize :]
    return out + quant_state.offset


def reference(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Plain-torch dequantization: (out_features, in_features) in quant_state.dtype."""
    nibbles = packed.view(torch.uint8).reshape(-1, 1)
    idx = torch.cat([nibbles >> 4, nibbles & 0xF], dim=1).view(-1).long()  # high nibble first
    n = quant_state.shape.numel()
    values = quant_state.code.to(packed.device)[idx][:n]
    scale = scales(quant_state).repeat_interleave(quant_state.blocksize)[:n]
    return (values * scale).view(quant_state.shape).to(quant_state.dtype)


def dequantize(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as (out_features, in_features) in quant_state.dtype, written into `out` when given
    (e.g. a slice of `buffer`). Triton on CUDA, `reference` elsewhere."""
    if not (packed.is_cuda and triton_available()):
        weight = reference(packed, quant_state)
        return out.view(weight.shape).copy_(weight) if out is not None else weight
    return _triton_dequantize(packed, quant_state, out)


def buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch tensor of at least `numel` elements, one per (dtype, device), grown as needed and
    shared by all projections: a dequantized weight lives only until its matmul has been queued, and
    kernels on one stream run in order, so the next projection may overwrite it."""
    key = (dtype, device)
    held = _buffers.get(key)
    if held is None or held.numel() < numel:
        _buffers.pop(key, None)
        held = _buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return held[:numel]


_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_dequantize(packed, quant_state, out):
    import triton

    n = quant_state.shape.numel()
    if out is None:
        out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=packed.device)
    nbytes = (n + 1) // 2
    nested, device = quant_state.nested, packed.device
    inner = quant_state.state2 if nested else quant_state  # unused operands when not nested
    offset = quant_state.offset if nested else quant_state.absmax
    _kernel()[(triton.cdiv(nbytes, BLOCK),)](
        packed.view(torch.uint8), quant_state.absmax, inner.absmax.to(device), inner.code.to(device),
        torch.as_tensor(offset, device=device), quant_state.code.to(device), out, nbytes, n,
        BLOCKSIZE=quant_state.blocksize, BLOCKSIZE2=inner.blocksize if nested else 1, NESTED=nested, BLOCK=BLOCK,
    )
    return out.view(quant_state.shape)


@functools.cache
def _kernel():
    """Compiled on first use, so importing this module never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, nbytes, n,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
        byte_idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) packed bytes
        mask = byte_idx < nbytes
        byte = tl.load(packed_ptr + byte_idx, mask=mask, other=0).to(tl.int32)
        block = byte_idx // (BLOCKSIZE // 2)  # both nibbles of a byte share a block (blocksize is even)
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // BLOCKSIZE2,
                                                                              mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        high = tl.load(code_ptr + (byte >> 4)) * scale
        low = tl.load(code_ptr + (byte & 0xF)) * scale
        values = tl.reshape(tl.join(high, low), (2 * BLOCK,))  # interleave: element 2i is byte i's high nibble
        out_idx = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_idx, values.to(out_ptr.dtype.element_ty), mask=out_idx < n)

    return nf4_dequantize
