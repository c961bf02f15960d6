"""Activation checkpointing that keeps the checkpointed hidden states in pinned CPU memory
(`train.activation_offload: true`).

With checkpointing, what stays on the GPU between forward and backward is each decoder layer's
input: layers × tokens × hidden values (4 GiB for a 7B model at 8k tokens per step with the
fp32 residual stream QLoRA keeps). Here each layer's input is copied to pinned host memory on a
side stream as soon as the layer has run, and its GPU copy is freed; the backward brings it back
one layer ahead of need (while the layer after it recomputes and backpropagates), so in steady
state neither copy holds up the GPU. The recomputation is `torch.utils.checkpoint`'s: the same
RNG and autocast state as in the forward. It is the reentrant kind (an autograd Function whose
backward runs the layer again), which is what lets the input leave the GPU: non-reentrant
checkpointing keeps a reference to it.

Only the hidden states get a gradient through a checkpointed layer (as with transformers' own
`use_reentrant=True`), which is all a decoder layer has; its parameters get theirs directly.
"""

from __future__ import annotations

import functools
import logging
import weakref
from contextlib import ExitStack

import torch

log = logging.getLogger(__name__)


def enable(model) -> bool:
    """Route every checkpointed transformers layer of `model` through `checkpoint`; False (and a
    warning) when no layer is checkpointed, since only checkpointed inputs can be offloaded.
    Call after gradient checkpointing is enabled: `gradient_checkpointing_enable` resets it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        log.warning("train.activation_offload: gradient checkpointing is off, so nothing is offloaded "
                    "(set train.gradient_checkpointing=true)")
        return False
    for layer in layers:
        layer._gradient_checkpointing_func = checkpoint
    return True


def checkpoint(function, hidden_states, *args):
    """transformers' checkpointing-function signature: `function(hidden_states, *args)`, recomputed
    in the backward, with its input held on the host meanwhile."""
    if not torch.is_grad_enabled():
        return function(hidden_states, *args)
    return OffloadedCheckpoint.apply(function, hidden_states, *args)


class OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, hidden_states, *args):
        device = hidden_states.device
        ctx.function, ctx.args = function, args
        ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                        for kind in dict.fromkeys(("cpu", device.type))]
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        outputs = function(hidden_states, *args)  # inside a Function's forward autograd records nothing
        ctx.stash = Stash(hidden_states)
        _tape.add(ctx.stash)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        stash, ctx.stash = ctx.stash, None
        hidden = stash.get().detach().requires_grad_(True)
        _tape.prefetch_before(stash)
        on_cuda = hidden.device.type == "cuda"
        with torch.random.fork_rng(devices=[hidden.device] if on_cuda else []), ExitStack() as stack:
            torch.set_rng_state(ctx.rng[0])
            if on_cuda:
                torch.cuda.set_rng_state(ctx.rng[1], hidden.device)
            for kind, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            with torch.enable_grad():
                outputs = ctx.function(hidden, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        n_args = len(ctx.args)
        ctx.function = ctx.args = None
        return (None, hidden.grad, *([None] * n_args))


class Stash:
    """One hidden-states tensor held on the host: copied out on a side stream right away, copied back
    on another one when `fetch` (ahead of need) or `get` asks. On the CPU (tests) a plain copy."""

    def __init__(self, tensor: torch.Tensor):
        self.device, self.consumed, self.back = tensor.device, False, None
        if tensor.device.type != "cuda":
            self.host = tensor.detach().clone()
            return
        out_stream = _streams(tensor.device)[0]
        out_stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is ready
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(out_stream):
            self.host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(out_stream)  # its memory is not reused before the copy has read it
        self.copied_out = out_stream.record_event()

    def fetch(self) -> None:
        if self.back is not None or self.device.type != "cuda":
            return
        back_stream = _streams(self.device)[1]
        back_stream.wait_event(self.copied_out)
        with torch.cuda.stream(back_stream):
            self.back = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            self.back.copy_(self.host, non_blocking=True)
        self.copied_back = back_stream.record_event()

    def get(self) -> torch.Tensor:
        self.consumed = True
        if self.device.type != "cuda":
            return self.host
        self.fetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.copied_back)
        self.back.record_stream(current)  # allocated on the copy stream, used and freed on this one
        tensor, self.back, self.host = self.back, None, None  # the pinned block returns to torch's cache
        return tensor


class _Tape:
    """The stashes of the current forward pass in order, so the backward of layer i can start bringing
    back layer i−1's input. Weak references: a graph dropped without a backward frees its stashes."""

    def __init__(self):
        self.refs: list[weakref.ref] = []

    def add(self, stash: Stash) -> None:
        last = self.refs[-1]() if self.refs else None
        if last is None or last.consumed:  # the previous pass is over (or was dropped): start anew
            self.refs.clear()
        stash.index = len(self.refs)
        self.refs.append(weakref.ref(stash))

    def prefetch_before(self, stash: Stash) -> None:
        index = getattr(stash, "index", 0)
        if 0 < index <= len(self.refs):
            previous = self.refs[index - 1]()
            if previous is not None and not previous.consumed:
                previous.fetch()


_tape = _Tape()


@functools.cache
def _streams(device: torch.device) -> tuple:
    """(device→host stream, host→device stream): separate, so the two directions overlap."""
    return torch.cuda.Stream(device), torch.cuda.Stream(device)
