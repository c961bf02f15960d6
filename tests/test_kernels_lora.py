"""Fused LoRA/QLoRA kernels (`kernels.lora`, `kernels.nf4`) and offloaded checkpointing
(`kernels.offload`) against peft's modules, bitsandbytes and torch's checkpointing: on the CPU
in fp32 (loss and every gradient), the Triton kernels under TRITON_INTERPRET, and on CUDA in
bf16 (skipped without a GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import make_tiny_model
from tunelab.kernels import lora, nf4, offload

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture
def interpret_triton(monkeypatch):
    """Run the Triton kernels on the CPU through Triton's interpreter (a fresh compile of each)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nf4._kernel.cache_clear()
    lora._swiglu_kernels.cache_clear()
    yield
    nf4._kernel.cache_clear()
    lora._swiglu_kernels.cache_clear()


class _Vocab:
    """What make_tiny_model reads of a tokenizer: these tests need no real one (nor the embedded model)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 512


@pytest.fixture
def tokenizer():
    return _Vocab()


def _quantized(shape=(96, 320), nested=True, dtype=torch.bfloat16, seed=0):
    """(weight, packed, quant_state). Rows are whole blocks of 64, as in every real projection (bitsandbytes'
    CPU kernel restarts blocks at each row and disagrees with its own quantizer otherwise)."""
    import bitsandbytes.functional as bnbf

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return weight, *bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=64)


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_reference_is_bitsandbytes_dequantize(nested):
    import bitsandbytes.functional as bnbf

    _, packed, state = _quantized(nested=nested)
    assert torch.equal(nf4.reference(packed, state), bnbf.dequantize_4bit(packed, state))
    out = torch.empty(state.shape.numel() + 7, dtype=state.dtype)
    assert torch.equal(nf4.dequantize(packed, state, out=out[: state.shape.numel()]), nf4.reference(packed, state))


@needs_triton
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_triton_kernel_matches_reference(interpret_triton, nested):
    """fp32 output: the interpreter truncates fp32→bf16 where the GPU rounds to nearest, so the cast is torch's."""
    _, packed, state = _quantized(nested=nested)
    out = nf4._triton_dequantize(packed, state, torch.empty(state.shape.numel(), dtype=torch.float32))
    assert torch.equal(out.to(state.dtype), nf4.reference(packed, state))


@needs_triton
def test_swiglu_triton_kernels_match_torch(interpret_triton, monkeypatch):
    g = torch.Generator().manual_seed(0)
    e, up, dh = (torch.randn(5, 333, generator=g) for _ in range(3))
    expected_h = torch.nn.functional.silu(e) * up
    expected = lora.swiglu_backward(e, up, dh)  # the torch path (CPU tensors)
    h = torch.empty_like(e)
    lora._launch(lora._swiglu_kernels()[0], e, up, h)
    torch.testing.assert_close(h, expected_h)
    e2, up2, dh2 = e.clone(), up.clone(), dh.clone()
    lora._launch(lora._swiglu_kernels()[1], e2, up2, dh2)  # in place: h, de, dg over dh, e, up
    for got, want in zip((dh2, e2, up2), expected):
        torch.testing.assert_close(got, want)
    # and the torch backward is autograd's
    e_, up_ = e.clone().requires_grad_(), up.clone().requires_grad_()
    (torch.nn.functional.silu(e_) * up_).backward(dh)
    torch.testing.assert_close(expected[1], e_.grad)
    torch.testing.assert_close(expected[2], up_.grad)


# --- whole tiny models: fused vs peft -------------------------------------------------------------

def _quantize_linears(model, compute_dtype=torch.float32):
    """Swap the decoder layers' Linears for bitsandbytes NF4 (double-quant) Linear4bit, as QLoRA loads them."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                                          quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    setattr(parent, name, q.to(child.weight.device))
    return model


def _peft_model(tokenizer, quantized=False, dropout=0.0, seed=0, device="cpu", dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(tokenizer, seed=seed).to(device, dtype)
    if quantized:
        _quantize_linears(model, compute_dtype=dtype)
    torch.manual_seed(seed + 1)
    # init_lora_weights=False: B is random too, so that A's gradients are not all zero
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # peft's default: fp32 adapters on a 16-bit base
    model.train()
    return model


def _batch(tokenizer, device="cpu", rows=2, seq=12):
    ids = torch.randint(10, len(tokenizer) - 10, (rows, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def _loss_and_grads(model, batch, autocast_dtype=None):
    """Loss, the gradients of every trainable parameter and of the input embeddings (the x of layer 0)."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    device = embeds.device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = model(inputs_embeds=embeds, labels=batch["labels"]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), embeds.grad.clone(), grads


def _assert_same(a, b, rtol=1e-4, atol=1e-6):
    (loss_a, dx_a, grads_a), (loss_b, dx_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx_a, dx_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def _counting(monkeypatch):
    """How often each fused Function ran."""
    calls = {"proj": 0, "mlp": 0}
    for key, fn in (("proj", lora.LoRAProjections), ("mlp", lora.LoRASwiGLUMLP)):
        def apply(*args, _key=key, _orig=fn.apply):
            calls[_key] += 1
            return _orig(*args)
        monkeypatch.setattr(fn, "apply", apply)
    return calls


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fused_model_matches_peft(tokenizer, monkeypatch, quantized):
    """A tiny Llama with LoRA on every linear: the loss, dx and every adapter gradient of the fused
    model equal peft's modules (fp32). QLoRA: the same model with NF4 double-quant bases."""
    model = _peft_model(tokenizer, quantized=quantized)
    batch = _batch(tokenizer)
    expected = _loss_and_grads(model, batch)
    assert lora.patch(model) == ["lora:qkv", "lora:mlp", "lora:linear"] + (["nf4:torch"] if quantized else [])
    calls = _counting(monkeypatch)
    got = _loss_and_grads(model, batch)
    assert calls == {"proj": 2 * 2, "mlp": 2}  # per layer: q/k/v and o; gate/up/down
    _assert_same(got, expected)
    lora.unpatch(model)
    _assert_same(_loss_and_grads(model, batch), expected)


def test_peft_runs_where_fusing_does_not_apply(tokenizer, monkeypatch):
    """Dropout in training, a disabled adapter and a merged one take peft's path, with peft's results."""
    model = _peft_model(tokenizer, dropout=0.1)
    batch = _batch(tokenizer)
    lora.patch(model)
    calls = _counting(monkeypatch)
    torch.manual_seed(0)
    loss = _loss_and_grads(model, batch)[0]
    assert calls == {"proj": 0, "mlp": 0}
    lora.unpatch(model)
    torch.manual_seed(0)
    assert torch.equal(loss, _loss_and_grads(model, batch)[0])

    model = _peft_model(tokenizer)
    lora.patch(model)
    with torch.no_grad(), model.disable_adapter():
        disabled = model(**batch).logits
    model.merge_adapter()
    with torch.no_grad():
        merged = model(**batch).logits
    assert calls == {"proj": 0, "mlp": 0}
    model.unmerge_adapter()
    with torch.no_grad():
        fused = model(**batch).logits
        base = model.get_base_model()
        lora.unpatch(model)
        with model.disable_adapter():
            torch.testing.assert_close(disabled, base(**batch).logits)
        torch.testing.assert_close(fused, model(**batch).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged, fused, rtol=1e-4, atol=1e-4)
    assert calls["proj"] > 0


def test_adapter_trained_fused_is_a_plain_peft_adapter(tokenizer, tmp_path):
    """Train a few steps on the fused path, save, load into a fresh base with PeftModel.from_pretrained:
    the same logits."""
    from peft import PeftModel

    model = _peft_model(tokenizer)
    lora.patch(model)
    batch = _batch(tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model(tokenizer, seed=0), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_offloaded_checkpointing_matches_torch_checkpointing(tokenizer):
    """Same loss and gradients as transformers' checkpointing; a second step reuses the tape."""
    model = _peft_model(tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    batch = _batch(tokenizer)
    expected = _loss_and_grads(model, batch)
    assert offload.enable(model)
    calls = []
    stash_init = offload.Stash.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offload.Stash, "__init__", lambda self, t: (calls.append(t.shape), stash_init(self, t))[1])
        for _ in range(2):
            _assert_same(_loss_and_grads(model, batch), expected)
    assert len(calls) == 2 * 2  # one stash per layer per step
    lora.patch(model)  # and with the fused kernels inside the checkpointed layers
    _assert_same(_loss_and_grads(model, batch), expected)


def test_offload_needs_checkpointing(tokenizer):
    model = _peft_model(tokenizer)
    assert not offload.enable(model)


def test_embeddings_upcast_by_qlora_prep_are_stored_in_bf16_with_the_same_output(tokenizer):
    from peft import prepare_model_for_kbit_training

    model = make_tiny_model(tokenizer).to(torch.bfloat16)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.is_loaded_in_4bit = True  # what prepare_model_for_kbit_training looks for
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    ids = _batch(tokenizer)["input_ids"]
    expected = model.get_input_embeddings()(ids)
    assert expected.dtype == torch.float32
    assert lora.narrow_embeddings(model)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.equal(model.get_input_embeddings()(ids), expected)
    assert not lora.narrow_embeddings(make_tiny_model(tokenizer))  # tied, and fp32 values


# --- CUDA, bf16 ---------------------------------------------------------------------------------

def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_triton_on_cuda_is_bitsandbytes(nested):
    import bitsandbytes.functional as bnbf

    weight = (torch.randn(1024, 1536, device="cuda") * 0.02).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=64)
    expected = bnbf.dequantize_4bit(packed, state)
    got = nf4.dequantize(packed, state)
    # one fused multiply-add in the scales may move a value by one bf16 step
    assert (got.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-7
    assert (got != expected).float().mean() < 1e-3


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fused_model_matches_peft_on_cuda_bf16(tokenizer, quantized):
    """bf16 weights, bf16 autocast as Trainer runs it: loss and gradients within bf16 rounding of peft's."""
    model = _peft_model(tokenizer, quantized=quantized, device="cuda", dtype=torch.bfloat16)
    batch = _batch(tokenizer, device="cuda", rows=4, seq=64)
    expected = _loss_and_grads(model, batch, torch.bfloat16)
    assert "lora:mlp" in lora.patch(model)
    got = _loss_and_grads(model, batch, torch.bfloat16)
    assert abs(got[0].item() - expected[0].item()) / expected[0].item() < 1e-3
    assert _rel(got[1], expected[1]) < 0.03
    for name, grad in expected[2].items():
        assert _rel(got[2][name], grad) < 0.05, name


@cuda
@pytest.mark.gpu
def test_offload_on_cuda_matches_checkpointing(tokenizer):
    model = _peft_model(tokenizer, device="cuda")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    batch = _batch(tokenizer, device="cuda")
    expected = _loss_and_grads(model, batch)
    offload.enable(model)
    _assert_same(_loss_and_grads(model, batch), expected)

