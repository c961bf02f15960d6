"""Fused LoRA (and QLoRA) projections for training, patched onto a peft-wrapped Llama model.

A LoRA projection computes y = x Wᵀ + s·(x Aᵀ) Bᵀ (Hu et al. 2021, eq. 3; s = alpha / r) with W
frozen. peft runs it as separate modules: the base matmul, A, B, a scaling multiply and an add,
each a kernel with its own saved activations. Here each is one autograd Function with a manual
backward, written after unsloth's `fast_lora.py` (read, not copied):

- the low-rank term is computed first and the base matmul accumulates onto it (cuBLAS
  beta = 1), so the scaled update costs no pass of its own over the (tokens × out) output;
- projections that share an input run as a group: q, k and v (and gate and up) read x once
  for their stacked A matrices, and their input gradients accumulate into one dx;
- the MLP (gate, up, SwiGLU, down) is one Function that keeps only x, the gate and up outputs
  and the rank-r intermediates; SwiGLU and its gradient are recomputed in one fused pass
  (Triton on CUDA) that writes in place over buffers the backward no longer needs;
- QLoRA weights are dequantized (`kernels.nf4`) into one reused buffer right before each
  matmul, in the forward and again in the backward, and never saved.

Only the active adapter's plain LoRA is fused: dropout in training, DoRA, several active
adapters, merged or disabled adapters, biases and anything unexpected run peft's own forward,
checked on every call. The adapters stay peft's parameters, so what is saved is a plain peft
adapter. `patch(model)` installs it; `kernels.apply_lora` decides when.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tunelab.kernels import nf4


class Parts(NamedTuple):
    """One LoRA projection's tensors, as the Functions take them."""

    weight: torch.Tensor  # (out, in) 16/32-bit, or NF4 bytes with quant_state
    quant_state: object | None
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float


# --- the maths, shared by the Functions --------------------------------------------------------

def dense(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The base weight (out, in) in `dtype`; an NF4 weight is dequantized into the shared buffer."""
    if quant_state is None:
        return weight
    out = nf4.dequantize(weight, quant_state, out=nf4.buffer(quant_state.shape.numel(), quant_state.dtype,
                                                                  weight.device))
    return out.to(dtype)


def project(x, xa, weights, quant_states, Bs, scales) -> list[torch.Tensor]:
    """y_i = s_i·(x A_iᵀ) B_iᵀ + x W_iᵀ for each projection i. x: (T, in); xa: (T, Σr) = x [A_0; A_1; …]ᵀ."""
    outs, start = [], 0
    for weight, qs, B, s in zip(weights, quant_states, Bs, scales):
        r = B.shape[1]
        y = xa[:, start : start + r] @ (B * s).t()  # (T, out): the low-rank term
        outs.append(y.addmm_(x, dense(weight, qs, x.dtype).t()))  # + x Wᵀ, accumulated by the GEMM
        start += r
    return outs


def grad_input(grads, weights, quant_states, As, Bs, scales, need_dx: bool):
    """dx = Σ_i dy_i W_i + s_i (dy_i B_i) A_i, and dyB = [s_i dy_i B_i]_i (T, Σr), which dA also needs."""
    dyB = torch.cat([dy @ (B * s) for dy, B, s in zip(grads, Bs, scales)], dim=1)
    if not need_dx:
        return None, dyB
    dx = dyB @ torch.cat(As)  # (T, in)
    for dy, weight, qs in zip(grads, weights, quant_states):
        dx.addmm_(dy, dense(weight, qs, dy.dtype))
    return dx, dyB


def grad_lora(x, xa, grads, dyB, Bs, scales) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """dA_i = (s_i dy_i B_i)ᵀ x and dB_i = s_i dy_iᵀ (x A_iᵀ), for the stacked A's in one GEMM."""
    ranks = [B.shape[1] for B in Bs]
    dA = (dyB.t() @ x).split(ranks)  # (Σr, in) → (r_i, in)
    dB = [dy.t() @ (xa_i * s) for dy, xa_i, s in zip(grads, xa.split(ranks, dim=1), scales)]
    return list(dA), dB


class LoRAProjections(torch.autograd.Function):
    """Projections of one input: y_i = x W_iᵀ + s_i (x A_iᵀ) B_iᵀ. Saves x and the (T, Σr) x Aᵀ."""

    @staticmethod
    def forward(ctx, x, quant_states, scales, *params):  # params: W_0, A_0, B_0, W_1, A_1, B_1, …
        weights, As, Bs = params[0::3], params[1::3], params[2::3]
        xa = x @ torch.cat(As).t()  # (T, Σr)
        outs = project(x, xa, weights, quant_states, Bs, scales)
        ctx.save_for_backward(x, xa, *params)
        ctx.quant_states, ctx.scales = quant_states, scales
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, xa, *params = ctx.saved_tensors
        weights, As, Bs = params[0::3], params[1::3], params[2::3]
        dx, dyB = grad_input(grads, weights, ctx.quant_states, As, Bs, ctx.scales, ctx.needs_input_grad[0])
        dA, dB = grad_lora(x, xa, grads, dyB, Bs, ctx.scales)
        return (dx, None, None, *_interleave(dA, dB))


class LoRASwiGLUMLP(torch.autograd.Function):
    """down(silu(gate(x)) · up(x)) with LoRA on all three (Shazeer 2020, SwiGLU). Saves x, the gate
    and up outputs e, g (T, ff) and the rank-r intermediates; h = silu(e)·g is recomputed."""

    @staticmethod
    def forward(ctx, x, quant_states, scales, *params):  # params: gate, up, down as (W, A, B) each
        weights, As, Bs = params[0::3], params[1::3], params[2::3]
        xa = x @ torch.cat(As[:2]).t()  # (T, 2r)
        e, g = project(x, xa, weights[:2], quant_states[:2], Bs[:2], scales[:2])
        h = swiglu(e, g)
        ha = h @ As[2].t()  # (T, r)
        (out,) = project(h, ha, weights[2:], quant_states[2:], Bs[2:], scales[2:])
        ctx.save_for_backward(x, xa, e, g, ha, *params)
        ctx.quant_states, ctx.scales = quant_states, scales
        return out

    @staticmethod
    def backward(ctx, dout):
        x, xa, e, g, ha, *params = ctx.saved_tensors
        weights, As, Bs = params[0::3], params[1::3], params[2::3]
        qs, scales = ctx.quant_states, ctx.scales
        dh, dyB_down = grad_input((dout,), weights[2:], qs[2:], As[2:], Bs[2:], scales[2:], True)
        h, de, dg = swiglu_backward(e, g, dh)  # (T, ff) each; on CUDA in place over dh, e, g
        dA_down, dB_down = grad_lora(h, ha, (dout,), dyB_down, Bs[2:], scales[2:])
        dx, dyB = grad_input((de, dg), weights[:2], qs[:2], As[:2], Bs[:2], scales[:2], ctx.needs_input_grad[0])
        dA, dB = grad_lora(x, xa, (de, dg), dyB, Bs[:2], scales[:2])
        return (dx, None, None, *_interleave(dA + dA_down, dB + dB_down))


def _interleave(dA, dB):
    """Gradients in the Functions' parameter order: None for each frozen W, then dA_i, dB_i."""
    return [g for a, b in zip(dA, dB) for g in (None, a, b)]


# --- SwiGLU: one pass forward, one pass backward -----------------------------------------------

def swiglu(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """h = silu(e) · g, computed in fp32 and stored in e's dtype."""
    if e.is_cuda and nf4.triton_available():
        h = torch.empty_like(e)
        _launch(_swiglu_kernels()[0], e, g, h)
        return h
    return F.silu(e) * g


def swiglu_backward(e, g, dh):
    """(h, de, dg) for h = silu(e)·g: dg = dh·silu(e), de = dh·g·σ(e)(1 + e(1 − σ(e))). The Triton
    version writes h over dh, de over e and dg over g: the backward needs none of them afterwards."""
    if e.is_cuda and nf4.triton_available():
        _launch(_swiglu_kernels()[1], e, g, dh)
        return dh, e, g
    sig = torch.sigmoid(e)
    silu = e * sig
    return silu * g, dh * g * sig * (1 + e * (1 - sig)), dh * silu


SWIGLU_BLOCK = 1024


def _launch(kernel, *tensors):
    import triton

    assert all(t.is_contiguous() for t in tensors)
    n = tensors[0].numel()
    kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](*tensors, n, BLOCK=SWIGLU_BLOCK)


@functools.cache
def _swiglu_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        e = tl.load(e_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        h = e / (1.0 + tl.exp(-e)) * g
        tl.store(h_ptr + idx, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def backward(e_ptr, g_ptr, dh_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        e = tl.load(e_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-e))  # tl.sigmoid is a nested jit function, which the interpreter refuses
        silu = e * sig
        tl.store(dh_ptr + idx, (silu * g).to(dh_ptr.dtype.element_ty), mask=mask)  # h
        tl.store(e_ptr + idx, (dh * g * sig * (1.0 + e * (1.0 - sig))).to(e_ptr.dtype.element_ty), mask=mask)  # de
        tl.store(g_ptr + idx, (dh * silu).to(g_ptr.dtype.element_ty), mask=mask)  # dg

    return forward, backward


# --- reading peft's layers ---------------------------------------------------------------------

def lora_parts(layer, x: torch.Tensor) -> Parts | None:
    """The active adapter of a peft LoRA Linear (or bitsandbytes Linear4bit) as Parts, or None where
    only peft's own forward is right: merged/disabled/several adapters, DoRA or another variant,
    dropout in training, a bias, a trainable or unusual base weight."""
    if layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name):
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
        return None
    base = layer.get_base_layer()
    weight = base.weight
    if getattr(base, "bias", None) is not None or weight.requires_grad or getattr(layer, "fan_in_fan_out", False):
        return None
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        if quant_state.quant_type != "nf4" or weight.dtype not in (torch.uint8, *_FLOATS):
            return None
    elif weight.dtype not in _FLOATS or weight.dim() != 2:
        return None
    if weight.device != x.device:
        return None
    return Parts(weight, quant_state, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(x: torch.Tensor, parts: Sequence[Parts]) -> torch.dtype | None:
    """autocast's dtype, else the input's when every base weight has it; None: let peft run."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if all(p.quant_state is not None or p.weight.dtype == dtype for p in parts):
            return dtype
        return None
    if all((p.quant_state.dtype if p.quant_state is not None else p.weight.dtype) == x.dtype for p in parts):
        return x.dtype
    return None


def _flat(parts: Sequence[Parts], dtype: torch.dtype):
    """Function arguments: quant states, scales, then W_i, A_i, B_i in the compute dtype (the casts
    of fp32 adapters are autograd ops, so their gradients come back in fp32)."""
    params = [t for p in parts for t in (p.weight, p.A.to(dtype), p.B.to(dtype))]
    return tuple(p.quant_state for p in parts), tuple(float(p.scale) for p in parts), params


def fused_projections(x: torch.Tensor, layers: Sequence) -> list[torch.Tensor] | None:
    """The outputs of these LoRA layers on the shared input x (…, in), or None where peft must run."""
    parts = [lora_parts(layer, x) for layer in layers]
    if any(p is None for p in parts):
        return None
    dtype = compute_dtype(x, parts)
    if dtype is None:
        return None
    quant_states, scales, params = _flat(parts, dtype)
    with torch.autocast(x.device.type, enabled=False):
        outs = LoRAProjections.apply(x.reshape(-1, x.shape[-1]).to(dtype), quant_states, scales, *params)
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]


# --- the patched forwards ----------------------------------------------------------------------

def _linear_forward(self, x, *args, **kwargs):
    """A LoRA Linear's forward: fused where possible, else peft's own."""
    if not args and not kwargs:
        outs = fused_projections(x, [self])
        if outs is not None:
            return outs[0]
    return self._tunelab_stock_forward(x, *args, **kwargs)


def _mlp_forward(self, x):
    """LlamaMLP's forward (down(act(gate(x)) · up(x))) as one Function."""
    layers = (self.gate_proj, self.up_proj, self.down_proj)
    parts = [lora_parts(layer, x) for layer in layers]
    dtype = None if any(p is None for p in parts) else compute_dtype(x, parts)
    if dtype is None:
        return self._tunelab_stock_forward(x)
    quant_states, scales, params = _flat(parts, dtype)
    with torch.autocast(x.device.type, enabled=False):
        out = LoRASwiGLUMLP.apply(x.reshape(-1, x.shape[-1]).to(dtype), quant_states, scales, *params)
    return out.view(*x.shape[:-1], out.shape[-1])


def _attention_forward(self, hidden_states, *args, **kwargs):
    """LlamaAttention's own forward, with q, k and v computed by one grouped Function beforehand and
    handed to it in place of the three projections (rotary embedding, cache and attention stay
    transformers', so every attention implementation keeps working)."""
    layers = (self.q_proj, self.k_proj, self.v_proj)
    outs = fused_projections(hidden_states, layers)
    if outs is None:
        return self._tunelab_stock_forward(hidden_states, *args, **kwargs)
    with _serving(layers, outs, hidden_states):
        return self._tunelab_stock_forward(hidden_states, *args, **kwargs)


@contextmanager
def _serving(layers, outputs, x):
    """Make each layer return its precomputed output when called on x (and compute as usual otherwise)."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer, out in zip(layers, outputs):
        layer.forward = functools.partial(_served, layer, out, x)
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _served(layer, out, x, inp, *args, **kwargs):
    if inp is x and not args and not kwargs:
        return out
    return layer._tunelab_stock_forward(inp, *args, **kwargs)


def _bind(module, forward) -> None:
    module._tunelab_stock_forward = module.forward  # liger's or the class's, whichever is in place
    module.forward = types.MethodType(forward, module)


def _is_lora_linear(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) \
        and hasattr(module.get_base_layer(), "in_features")


def patch(model) -> list[str]:
    """Install the fused forwards on a peft-wrapped Llama model's attention blocks, MLPs and every
    other LoRA Linear; idempotent. Returns what was patched, e.g. ['lora:qkv', 'lora:mlp', 'lora:linear']."""
    done = set()
    for module in model.modules():
        if hasattr(module, "_tunelab_stock_forward"):
            continue
        names = set(dict(module.named_children()))
        if {"q_proj", "k_proj", "v_proj", "o_proj"} <= names and all(
                _is_lora_linear(getattr(module, n)) for n in ("q_proj", "k_proj", "v_proj")):
            _bind(module, _attention_forward)
            done.add("lora:qkv")
        elif {"gate_proj", "up_proj", "down_proj"} <= names and all(
                _is_lora_linear(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")) \
                and getattr(getattr(module, "config", None), "hidden_act", "silu") in ("silu", "swish"):
            _bind(module, _mlp_forward)
            done.add("lora:mlp")
    for module in model.modules():
        if _is_lora_linear(module) and not hasattr(module, "_tunelab_stock_forward"):
            _bind(module, _linear_forward)
            done.add("lora:linear")
    if any(getattr(m.get_base_layer().weight, "quant_state", None) is not None
           for m in model.modules() if _is_lora_linear(m)):
        done.add("nf4:triton" if torch.cuda.is_available() and nf4.triton_available() else "nf4:torch")
    order = ["lora:qkv", "lora:mlp", "lora:linear", "nf4:triton", "nf4:torch"]
    return [name for name in order if name in done]


def narrow_embeddings(model) -> bool:
    """peft's prepare_model_for_kbit_training upcasts the frozen input embeddings to fp32 (0.5 GB at
    7B). When each value is a bf16 value (a 16-bit checkpoint), store them in bf16 again and upcast
    the lookup's output instead: the same fp32 activations for half the memory. Not for embeddings
    tied to the output layer, whose matmul would then change."""
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight
    output = model.get_output_embeddings()
    if weight.dtype != torch.float32 or weight.requires_grad or (output is not None and output.weight is weight):
        return False
    narrow = weight.detach().to(torch.bfloat16)
    if not torch.equal(narrow.float(), weight):
        return False
    weight.data = narrow
    embeddings.register_forward_hook(lambda module, args, out: out.float())
    return True


def unpatch(model) -> None:
    """Back to the forwards that were there before `patch` (e.g. to compare with peft's)."""
    for module in model.modules():
        stock = module.__dict__.pop("_tunelab_stock_forward", None)
        if stock is not None:
            module.forward = stock
            if getattr(stock, "__func__", None) is type(module).forward:
                del module.forward  # it was the class's own
