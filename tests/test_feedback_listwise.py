"""The listwise reward model: the Plackett–Luce loss against references, Kendall's τ-b against scipy,
and the whole loop on a tiny Llama — reviews in a review project → `review export --as rankings` →
`tunelab reward preference.loss=listwise` → `review report --reward-model` on the held-out items and
`review add-task --select uncertain`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tests.review_support import write_jsonl
from tunelab.cli import main
from tunelab.evals.ranking import kendall_tau_b, pair_counts, ranking_agreement
from tunelab.listwise import RankingCollator, plackett_luce_loss

WORDS = "apple river stone cloud paper green quick slow bright dark".split()
LEVELS = ["excellent", "good", "fair", "poor"]  # the true order of an output is its first word's


def _reference_loss(scores: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Plackett–Luce with Breslow ties, written out stage by stage: each tie group is chosen against
    every output not placed yet (the group included)."""
    total = scores.new_zeros(())
    for rank in sorted(set(ranks)):
        left = [j for j, r in enumerate(ranks) if r >= rank]
        for i in (j for j, r in enumerate(ranks) if r == rank):
            total = total + torch.logsumexp(scores[left], 0) - scores[i]
    return total


def test_plackett_luce_is_bradley_terry_for_two_outputs():
    s = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    ranks = torch.tensor([[1, 2], [2, 1]] * 3)[:, None]  # (6, 1, 2)
    loss = plackett_luce_loss(s, ranks, torch.ones(6, 1, dtype=torch.float64))
    chosen = torch.where(ranks[:, 0, 0] == 1, s[:, 0], s[:, 1])
    rejected = torch.where(ranks[:, 0, 0] == 1, s[:, 1], s[:, 0])
    bt = -torch.nn.functional.logsigmoid(chosen - rejected).mean()  # trl's RewardTrainer loss
    assert torch.allclose(loss, bt)
    assert torch.allclose(torch.autograd.grad(loss, s)[0], torch.autograd.grad(bt, s)[0])


def test_plackett_luce_against_the_stagewise_reference():
    """Random scores, rankings with ties, 1-3 rankings of 2-5 outputs per item, padding, weights: loss
    and every gradient equal the written-out reference (fp64)."""
    rng = random.Random(0)
    items = []
    for _ in range(5):
        k = rng.randint(2, 5)
        items.append((k, [[rng.randint(1, k) for _ in range(k)] for _ in range(rng.randint(1, 3))]))
    K, R = max(k for k, _ in items), max(len(r) for _, r in items)
    scores = torch.randn(len(items), K, dtype=torch.float64, requires_grad=True)
    ranks = torch.zeros(len(items), R, K, dtype=torch.long)
    weights = torch.zeros(len(items), R, dtype=torch.float64)
    expected, total = scores.new_zeros(()), 0.0
    for b, (k, rankings) in enumerate(items):
        for r, row in enumerate(rankings):
            w = 0.5 + b / 4
            ranks[b, r, :k] = torch.tensor(row)
            weights[b, r] = w
            expected = expected + w * _reference_loss(scores[b, :k], row)
            total += w
    expected = expected / total
    loss = plackett_luce_loss(scores, ranks, weights)
    assert torch.allclose(loss, expected)
    assert torch.allclose(torch.autograd.grad(loss, scores)[0], torch.autograd.grad(expected, scores)[0])


def test_ties_carry_no_order_and_pull_tied_outputs_together():
    s = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    ranks = torch.tensor([[[1, 2, 2]]])
    swapped = s.detach()[:, [0, 2, 1]]
    one = torch.ones(1, 1, dtype=torch.float64)
    assert torch.allclose(plackett_luce_loss(s, ranks, one), plackett_luce_loss(swapped, ranks, one))
    grad = torch.autograd.grad(plackett_luce_loss(s, ranks, one), s)[0][0]
    assert grad[1] < 0 < grad[2]  # descent raises the lower of the tied pair and lowers the higher one
    equal = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.grad(plackett_luce_loss(equal, torch.tensor([[[1, 1, 1]]]), one), equal)[0].abs().max() < 1e-12


def test_collator_flattens_outputs_and_pads_rankings():
    rows = [{"input_ids": [[5, 6, 7], [5, 8]], "rankings": [[1, 2]], "weight": 0.5},
            {"input_ids": [[9], [9, 1], [9, 2, 3, 4]], "rankings": [[2, 1, 3], [1, 1, 2]], "weight": 1.0}]
    batch = RankingCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (5, 4) and batch["attention_mask"].sum().item() == 3 + 2 + 1 + 2 + 4
    assert batch["index"].tolist() == [[0, 1, -1], [2, 3, 4]]
    assert batch["ranks"].tolist() == [[[1, 2, 0], [0, 0, 0]], [[2, 1, 3], [1, 1, 2]]]
    assert batch["weights"].tolist() == [[0.5, 0.0], [1.0, 1.0]]


def test_kendall_tau_b_matches_scipy_and_pairs_count_ties_half():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 7))
        x, y = rng.integers(0, 3, n), rng.integers(0, 3, n)
        ours, theirs = kendall_tau_b(x, y), kendalltau(x, y).statistic
        assert (ours is None and np.isnan(theirs)) or abs(ours - theirs) < 1e-12
    assert pair_counts([3.0, 2.0, 1.0], [1, 2, 3]) == (3.0, 3)  # scores order the outputs as the reviewer
    assert pair_counts([1.0, 1.0, 0.0], [1, 2, 3]) == (2.5, 3)  # a score tie counts half
    assert pair_counts([0.0, 1.0], [1, 1]) == (0.0, 0)  # the reviewer's tie is not a comparison
    found = ranking_agreement([[2.0, 1.0, 0.0]], [[[1, 2, 3], [3, 2, 1]]])
    assert found["accuracy"] == 0.5 and found["kendall_tau"] == 0.0 and found["rankings"] == 2


# ---- the loop on a tiny Llama ----------------------------------------------------------------------------


def _items(n: int, seed: int = 0) -> list[dict]:
    """Review items whose outputs start with a quality word (excellent > good > fair > poor), shuffled."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        outputs = [{"model": level, "text": f"{level} {' '.join(rng.choice(WORDS) for _ in range(3))}"} for level in LEVELS]
        rng.shuffle(outputs)
        rows.append({"id": f"q{i}", "prompt": " ".join(rng.choice(WORDS) for _ in range(4)), "outputs": outputs})
    return rows


def _review_everything(store, rng: random.Random) -> None:
    """Two stand-in reviewers rank each item by the true order plus noise (a close call is a tie)."""
    from tunelab.review import assign
    from tunelab.review.store import Assignment
    from tunelab.review.submit import submit

    for reviewer in (1, 2):
        while (aid := assign.claim(store, reviewer)) is not None:
            with store.read() as s:
                outputs = s.get(Assignment, aid).item.outputs
            noisy = {o.id: -LEVELS.index(o.text.split()[0]) + rng.gauss(0, 0.7) for o in outputs}
            ranked, ranks, rank = sorted(noisy, key=noisy.get, reverse=True), {}, 1
            for pos, oid in enumerate(ranked):
                if pos and noisy[ranked[pos - 1]] - noisy[oid] >= 0.2:
                    rank = pos + 1
                ranks[oid] = rank
            submit(store, reviewer, aid, {f"rank_{o}": str(r) for o, r in ranks.items()})


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A review project of 48 ranked items (4 outputs each, 2 reviewers), exported both ways."""
    from tunelab.review import project
    from tunelab.review.store import Store

    tmp = tmp_path_factory.mktemp("listwise")
    db = f"sqlite:///{tmp / 'review.db'}"
    assert main(["review", "init", "--db", db, "--per-item", "2"]) == 0
    rows = [{"id": r["id"], "prompt": r["prompt"], "outputs": r["outputs"]} for r in _items(48)]
    assert main(["review", "add-task", "--import", str(write_jsonl(tmp / "items.jsonl", rows)), "--db", db]) == 0
    store = Store(db)
    for name in ("ann", "bob"):
        project.add_reviewer(store, name)
    _review_everything(store, random.Random(1))
    assert main(["review", "export", "--db", db, "--as", "rankings", "--to", str(tmp / "rankings.jsonl")]) == 0
    return tmp, db


def _reward_cfg(run_dir, model_dir, source, *overrides):
    from tunelab.config import load_config

    return load_config(None, [
        f"model.name={model_dir}", f"data.source={source}", f"run.dir={run_dir}", "data.max_length=64",
        "data.validation_fraction=0.25", "train.batch_size=4", "train.lr=1e-2", "train.warmup_ratio=0",
        "train.max_steps=8", "eval.batch_size=8", *overrides,
    ])


@pytest.fixture(scope="module")
def listwise_run(reviewed, tiny_model_dir):
    from tunelab.stages import reward

    tmp, _ = reviewed
    cfg = _reward_cfg(tmp / "rm", tiny_model_dir, tmp / "rankings.jsonl", "data.format=rankings",
                      "preference.loss=listwise", "preference.weight_by_agreement=true")
    return reward.run(cfg)


def test_rankings_export_keeps_every_reviewer_and_the_ties(reviewed):
    tmp, _ = reviewed
    rows = [json.loads(line) for line in (tmp / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and all(len(r["rankings"]) == 2 and r["n_reviewers"] == 2 for r in rows)
    assert all(sorted(r["reviewers"]) == ["ann", "bob"] and len(r["outputs"]) == 4 for r in rows)
    assert any(len(set(ranks)) < 4 for r in rows for ranks in r["rankings"])  # ties survive the export
    assert any(r["rankings"][0] != r["rankings"][1] for r in rows)  # so do disagreements


def test_listwise_reward_model_learns_the_order(listwise_run, reviewed):
    before, after = listwise_run.summary["eval"]["before"], listwise_run.summary["eval"]["after"]
    assert set(after) == {"loss", "accuracy", "kendall_tau"}
    assert after["loss"] < before["loss"]
    assert after["kendall_tau"] > before["kendall_tau"] + 0.3 and after["accuracy"] > 0.8
    data = listwise_run.summary["data"]
    assert data["train_items"] == 36 and data["eval_items"] == 12 and data["train_rankings"] == 72
    assert 0 < data["mean_agreement"] < 1
    trained = json.loads((listwise_run.run_dir / "train_prompts.json").read_text())
    assert len(trained) == 36


def test_report_checks_the_reward_model_on_held_out_items_only(listwise_run, reviewed, capsys):
    tmp, db = reviewed
    assert main(["review", "report", "--db", db, "--output", str(tmp / "report"),
                 "--reward-model", str(listwise_run.run_dir)]) == 0
    summary = json.loads((tmp / "report" / "summary.json").read_text())["reward_model"]
    assert summary["items"] == 12 and summary["trained_items_skipped"] == 36 and summary["held_out_known"]
    low, high = summary["accuracy_ci95"]
    assert low <= summary["accuracy"] <= high and summary["accuracy"] > 0.8
    assert summary["kendall_tau_ci95"][0] <= summary["kendall_tau"] <= summary["kendall_tau_ci95"][1]
    assert "reward model" in capsys.readouterr().out
    assert 'id="reward-model"' in (tmp / "report" / "report.html").read_text()


def test_add_task_queues_the_items_the_reward_model_is_least_sure_of(listwise_run, reviewed, capsys):
    from tunelab.review.store import Item, Store
    from sqlalchemy import select

    tmp, db = reviewed
    candidates = _items(10, seed=7)
    clear = candidates[:5]  # the usual four levels: the reward model is sure of their order
    for row in candidates[5:]:  # four outputs of one level: the model cannot tell them apart
        row["outputs"] = [{"model": "m", "text": f"fair {' '.join(random.Random(i).choice(WORDS) for _ in range(3))}"}
                          for i in range(4)]
    rows = [{"id": f"new-{r['id']}", "prompt": r["prompt"], "outputs": r["outputs"]} for r in candidates]
    path = write_jsonl(tmp / "candidates.jsonl", rows)
    assert main(["review", "add-task", "--import", str(path), "--db", db, "--select", "uncertain", "--budget", "5",
                 "--reward-model", str(listwise_run.run_dir)]) == 0
    assert "5 of 10 new candidates chosen" in capsys.readouterr().out
    with Store(db).read() as s:
        added = set(s.scalars(select(Item.external_id).where(Item.external_id.like("new-%"))))
    assert added == {f"new-q{i}" for i in range(5, 10)}
    assert main(["review", "add-task", "--import", str(path), "--db", db, "--select", "uncertain", "--budget", "5"]) == 2
    assert "--reward-model" in capsys.readouterr().err
