"""Packing never splits or cross-contaminates samples; padding is on the right with a real pad token."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import make_tiny_model
from tunelab.data.batching import Collator, best_fit_decreasing, pack_batch
from tunelab.data.templates import IGNORE_INDEX
from tunelab.evals.loss import token_losses


def test_best_fit_decreasing_keeps_every_sample_whole_and_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))  # each sample exactly once, never split
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # best-fit decreasing is within 11/9 OPT + 1 bins (Johnson 1973); OPT >= ceil(sum / capacity)
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // 128) + 1


def test_best_fit_rejects_overlong_sample():
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing([5, 300], 128)


def _samples(n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length = rng.randint(5, 40)
        row = [rng.randint(10, 1000) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        ids.append(row)
        labels.append([IGNORE_INDEX] * prompt + row[prompt:])
    return {"input_ids": ids, "labels": labels}


def test_pack_batch_restarts_positions_per_sample():
    batch = _samples(30)
    packed = pack_batch(batch, max_length=96)
    assert sum(packed["num_samples"]) == 30
    for ids, pos in zip(packed["input_ids"], packed["position_ids"]):
        assert len(ids) <= 96 and len(ids) == len(pos)
        starts = [i for i, p in enumerate(pos) if p == 0]
        # each segment starting at a 0 position is one whole original sample
        segments = [ids[a:b] for a, b in zip(starts, starts[1:] + [len(ids)])]
        for seg in segments:
            assert seg in batch["input_ids"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_loss_equals_samples_run_one_by_one(tokenizer, attn):
    """The defining property of packing: no sample sees another (CPU attention backends)."""
    model = make_tiny_model(tokenizer, attn=attn).eval()
    batch = _samples(12, seed=1)
    packed = pack_batch(batch, max_length=80)
    assert max(packed["num_samples"]) > 1  # the test must really pack
    collate = Collator(tokenizer.pad_token_id)
    rows = [dict(zip(packed, vals)) for vals in zip(*packed.values())]
    packed_batch = collate(rows[:4])
    assert "attention_mask" not in packed_batch
    with torch.no_grad():
        loss, mask = token_losses(model, packed_batch)
    # Per-sample losses from the packed batch, cut at the restarting positions.
    packed_losses = []
    for r in range(loss.shape[0]):
        pos = packed_batch["position_ids"][r].tolist()
        n_real = len(rows[r]["input_ids"])
        starts = [i for i, p in enumerate(pos[:n_real]) if p == 0] + [n_real]
        for a, b in zip(starts, starts[1:]):
            # token_losses predicts token t+1 from t: sample [a, b) owns loss positions [a, b-1)
            packed_losses.append((loss[r, a : b - 1].sum().item(), int(mask[r, a : b - 1].sum())))
    # The same samples, padded one by one.
    samples = [
        {"input_ids": ids, "labels": lab}
        for r in rows[:4]
        for ids, lab in _split_row(r)
    ]
    single = []
    for s in samples:
        b = collate([s])
        with torch.no_grad():
            l1, m1 = token_losses(model, b)
        single.append((l1.sum().item(), int(m1.sum())))
    assert len(single) == len(packed_losses)
    for (lp, np_), (ls, ns) in zip(packed_losses, single):
        assert np_ == ns
        assert lp == pytest.approx(ls, rel=1e-4, abs=1e-4)


def _split_row(row: dict):
    pos = row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    for a, b in zip(starts, starts[1:]):
        yield row["input_ids"][a:b], row["labels"][a:b]


def test_padding_collator_pads_right_with_pad_token(tokenizer):
    collate = Collator(tokenizer.pad_token_id)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert collate.pad_fraction == pytest.approx(2 / 6)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
