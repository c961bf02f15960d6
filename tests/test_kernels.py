"""The fast path's kernels against their references: on the CPU the dispatch and the reference
implementations (CI), on CUDA the real kernels (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model
from tunelab import kernels
from tunelab.data.batching import Collator, pack_batch
from tunelab.kernels import varlen

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_sample_boundaries_come_from_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])  # row 2 ends in 2 pad tokens (own segment)
    cu, longest = varlen.cu_seqlens(positions)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4
    # a row that does not start at position 0 still starts a new sample
    cu, _ = varlen.cu_seqlens(torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert cu.tolist() == [0, 3, 6]


def _packed_batch(tokenizer, lengths=(7, 12, 5, 9, 3, 11), seq=24):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]
    packed = pack_batch({"input_ids": rows, "labels": rows}, seq)
    items = [dict(zip(packed, values)) for values in zip(*packed.values())]
    return Collator(tokenizer.pad_token_id)(items)


def _loss_and_grads(model, batch):
    model.zero_grad()
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_varlen_dispatch_matches_the_masked_sdpa_path(tokenizer, monkeypatch):
    """A tiny GQA Llama on packed rows: logits' loss and every gradient equal transformers' own
    block-diagonal sdpa path when the varlen kernel is its per-sample reference."""
    batch = _packed_batch(tokenizer)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] > 1
    model = make_tiny_model(tokenizer, attn="sdpa")
    expected_loss, expected = _loss_and_grads(model, batch)

    monkeypatch.setattr(varlen, "kernel", varlen.reference_varlen)
    varlen.register()
    model.set_attn_implementation(varlen.NAME)
    loss, grads = _loss_and_grads(model, batch)
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    for name, grad in expected.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name

    # eval mode (generation, validation) is the stock sdpa path, untouched
    model.eval()
    calls = []
    monkeypatch.setattr(varlen, "kernel", lambda *a: calls.append(a))
    with torch.no_grad():
        model(**batch)
    assert not calls


def test_auto_leaves_the_model_alone_without_cuda_and_off_always(tokenizer):
    model = make_tiny_model(tokenizer)
    assert kernels.apply(model, "off") == []
    if not torch.cuda.is_available():
        assert kernels.apply(model, "auto") == []
        assert model.config._attn_implementation == "sdpa"


@cuda
def test_torch_varlen_kernel_matches_reference_in_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [300, 17, 1024, 5, 700]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), h, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for h in (32, 8, 8))
    outs = []
    for fn in (varlen.torch_varlen, varlen.reference_varlen):
        out = fn(q, k, v, cu, max(lengths), 128**-0.5)
        out.float().square().sum().backward()
        outs.append((out.detach().float(), q.grad.float().clone(), k.grad.float().clone()))
        q.grad = k.grad = v.grad = None
    for ours, ref in zip(*outs):
        assert (ours - ref).norm() / ref.norm() < 2e-2  # bf16: ~3 significant digits per op


@cuda
def test_fast_path_loss_matches_stock_on_cuda(tokenizer):
    """Under bf16 autocast, as training runs: varlen attention and liger's kernels against the stock modules."""
    pytest.importorskip("liger_kernel")
    batch = {k: v.cuda() for k, v in _packed_batch(tokenizer).items()}
    stock = make_tiny_model(tokenizer).cuda()
    fast = make_tiny_model(tokenizer).cuda()
    assert set(kernels.apply(fast, "auto")) >= {"varlen_attention", "liger:fused_linear_cross_entropy"}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (l1, g1), (l2, g2) = _loss_and_grads(stock, batch), _loss_and_grads(fast, batch)
    assert torch.allclose(l1, l2, rtol=1e-2)
    for name, grad in g1.items():
        assert (g2[name] - grad).norm() <= 5e-2 * grad.norm() + 1e-6, name
