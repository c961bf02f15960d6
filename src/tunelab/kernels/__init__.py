"""The fast training path on CUDA, and the only place that patches model internals.

- `varlen`: attention for packed rows through torch's variable-length flash kernel (ours);
- `liger`: fused linear cross-entropy, RMSNorm, SwiGLU and RoPE from liger-kernel;
- `lora`: fused LoRA/QLoRA projections, attention q/k/v and SwiGLU MLP blocks (ours), with
  `nf4`'s one-kernel NF4 dequantization;
- `offload`: activation checkpointing with the hidden states in pinned CPU memory.

`train.kernels: auto` turns on what this machine can run for Llama-architecture models on
CUDA and says in one line what it did; `off`, the CPU, or another architecture leave the model
exactly as transformers built it. Each kernel has a reference the tests compare it with.
`apply` runs on the transformers model, `apply_lora` after peft has wrapped it.
"""

from __future__ import annotations

import logging

import torch

from tunelab.kernels import liger, lora, offload, varlen

log = logging.getLogger(__name__)

SUPPORTED = tuple(liger.ENTRY_POINTS)


def apply(model, mode: str, sharded: bool = False) -> list[str]:
    """Switch `model` (a transformers model, before PEFT wraps it) to the fast path; returns what is on.

    sharded: FSDP will shard the model. liger's fused cross-entropy multiplies the output
    projection's weight outside that module's forward, where FSDP2 hands it over as a sharded
    DTensor (`aten.mm.out got mixed torch.Tensor and DTensor`, seen on 2 H200s), so it is left out.
    """
    if mode == "off":
        return []
    if not torch.cuda.is_available():
        log.info("train.kernels=auto: no CUDA here; training with the stock transformers modules")
        return []
    model_type = model.config.model_type
    if model_type not in SUPPORTED:
        log.warning("train.kernels=auto: no fused kernels for model_type '%s' (have: %s); using the stock modules",
                    model_type, ", ".join(SUPPORTED))
        return []
    enabled = []
    if model.config._attn_implementation == "sdpa" and varlen.available():
        varlen.register()
        model.set_attn_implementation(varlen.NAME)
        enabled.append("varlen_attention")
    if liger.available():
        enabled += liger.apply(model, fused_cross_entropy=not sharded)
    else:
        log.warning("train.kernels=auto: liger-kernel is not installed (pip install 'tunelab[gpu]'); "
                    "no fused norm/MLP/cross-entropy kernels")
    log.info("train.kernels=auto: %s", ", ".join(enabled) or "nothing applicable")
    return enabled


LORA_MODEL_TYPES = ("llama",)
"""Architectures whose attention and MLP blocks `lora.patch` knows (Llama 2/3, SmolLM2)."""


def apply_lora(model, mode: str, sharded: bool = False, activation_offload: bool = False) -> list[str]:
    """Fused LoRA/QLoRA forwards and backwards on `model` (peft-wrapped, after checkpointing is set up);
    returns what is on. The adapters stay peft's, so a run saves a plain peft adapter.

    sharded: FSDP shards the weights into DTensors, which the fused matmuls do not take; left as is.
    activation_offload: `train.activation_offload`, the checkpointed hidden states go to pinned CPU
    memory (`offload`); it works on the CPU too (a copy), so it is not tied to `mode`.
    """
    enabled = ["activation_offload"] if activation_offload and offload.enable(model) else []
    if mode == "off" or sharded:
        return enabled
    if not torch.cuda.is_available():
        return enabled
    model_type = model.config.model_type
    if model_type not in LORA_MODEL_TYPES:
        log.info("train.kernels=auto: no fused LoRA for model_type '%s' (have: %s)", model_type,
                 ", ".join(LORA_MODEL_TYPES))
        return enabled
    enabled += lora.patch(model)
    if lora.narrow_embeddings(model):
        enabled.append("bf16_embeddings")
    log.info("train.kernels=auto: %s", ", ".join(enabled) or "no LoRA layers to fuse")
    return enabled
