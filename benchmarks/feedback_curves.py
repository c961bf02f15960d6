"""Learning from reviews on synthetic data with a known true order: listwise vs pairwise, active vs random.

The world (seeded): every item has k outputs with fixed features x ∈ R^d, and the true quality of an
output is u = w*·x. A simulated reviewer ranks an item's outputs by u·sharpness + Gumbel noise (so
their rankings follow Plackett–Luce around the true order) and ties two neighbours whose noisy
values differ by less than `tie_gap`, as a person calls a close pair a tie. The reward model is
cheap on purpose — linear on the fixed features, s = w·x, fitted to convergence (L-BFGS, small L2)
— so hundreds of fits take seconds; it learns from reviews exactly the way `tunelab reward` does
(the same losses: `tunelab.listwise.plackett_luce_loss` for listwise, the Bradley–Terry loss on the
pairs `tunelab review export` writes for pairwise). Metrics on held-out items against the *true*
order: pairwise accuracy over all output pairs and Kendall's τ-b (`tunelab.evals.ranking`).

- `learning_curves`: accuracy vs number of reviewed items for listwise (every reviewer's ranking,
  ties kept), pairwise (the export's consensus pairs: mean rank over reviewers, ties skipped) and,
  to show where the difference comes from, pairwise on every reviewer's own pairs ("rank breaking").
- `active_vs_random`: rounds of `batch` new items from a pool, chosen by `tunelab.review.select`
  (one model: Bradley–Terry uncertainty; a bootstrap committee of models: disagreement) or at
  random; reviews counted until the held-out accuracy reaches a target.

Run: `PYTHONPATH=src .venv/bin/python benchmarks/feedback_curves.py [--out FILE.json]` (about a
minute on 2 busy cores); tests/test_feedback_simulation.py checks the claims at small sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from tunelab.evals.ranking import kendall_tau_b
from tunelab.listwise import plackett_luce_loss
from tunelab.review.select import choose


@dataclass(frozen=True)
class World:
    d: int = 16  # feature dimensions
    kinds: int = 4  # kinds of items, each varying along d / kinds dimensions of its own
    common: float = 0.85  # share of the items of the first kind (the others share the rest)
    k: int = 4  # outputs per item
    reviewers: int = 2  # per item
    sharpness: float = 1.0  # reviewers' noise: P(i ranked above j) = σ(sharpness·(u_i − u_j)) for two outputs
    tie_gap: float = 0.3  # a reviewer ties neighbours closer than this (in noisy-utility units)
    l2: float = 1e-2


def make_items(world: World, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, k, d) features. An item is of one kind (a kind of prompt): its outputs vary along that kind's
    `d // kinds` dimensions (and by 0.1 along the others); the first kind is common (`common` of the
    items), the others share the rest, so a reward model fitted on a random sample has seen few
    items of the rare kinds."""
    width = world.d // world.kinds
    if world.kinds == 1:
        return rng.normal(size=(n, world.k, world.d))
    rare = (1 - world.common) / (world.kinds - 1)
    kind = rng.choice(world.kinds, size=n, p=[world.common] + [rare] * (world.kinds - 1))
    x = 0.1 * rng.normal(size=(n, world.k, world.d))
    for item, g in enumerate(kind):
        x[item, :, g * width : (g + 1) * width] = rng.normal(size=(world.k, width))
    return x


def true_weights(world: World, rng: np.random.Generator) -> np.ndarray:
    w = rng.normal(size=world.d)
    return 2.0 * w / np.linalg.norm(w)  # utilities of spread ~2 between outputs: some pairs are close


def review(world: World, items: np.ndarray, w_true: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, reviewers, k) ranks, 1 = best, equal ranks tie (competition ranking: 1, 2, 2, 4)."""
    utility = items @ w_true  # (n, k)
    noisy = world.sharpness * utility[:, None, :] + rng.gumbel(size=(len(items), world.reviewers, world.k))
    ranks = np.zeros(noisy.shape, dtype=np.int64)
    for n, r in np.ndindex(noisy.shape[:2]):
        order = np.argsort(-noisy[n, r])
        rank = 1
        for pos, j in enumerate(order):
            if pos and noisy[n, r, order[pos - 1]] - noisy[n, r, j] >= world.tie_gap:
                rank = pos + 1
            ranks[n, r, j] = rank
    return ranks


def consensus_pairs(ranks: np.ndarray) -> list[tuple[int, int, int]]:
    """(item, better, worse) as `tunelab review export --pairs all` writes them: by mean rank, ties skipped."""
    pairs = []
    for n, item in enumerate(ranks):
        mean = item.mean(axis=0)
        pairs += [(n, i, j) if mean[i] < mean[j] else (n, j, i) for i, j in combinations(range(item.shape[1]), 2)
                  if mean[i] != mean[j]]
    return pairs


def reviewer_pairs(ranks: np.ndarray) -> list[tuple[int, int, int]]:
    """(item, better, worse) for every pair each reviewer ordered (their ties skipped)."""
    return [(n, i, j) if r[i] < r[j] else (n, j, i) for n, item in enumerate(ranks) for r in item
            for i, j in combinations(range(len(r)), 2) if r[i] != r[j]]


def _fit(world: World, loss_of, d: int) -> np.ndarray:
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of(w) + world.l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy()


def fit_listwise(world: World, items: np.ndarray, ranks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    x = torch.tensor(items)
    r = torch.tensor(ranks)
    wt = torch.ones(r.shape[:2], dtype=torch.float64) if weights is None else torch.tensor(weights)
    return _fit(world, lambda w: plackett_luce_loss(x @ w, r, wt), items.shape[-1])


def fit_pairwise(world: World, items: np.ndarray, pairs: list[tuple[int, int, int]]) -> np.ndarray:
    if not pairs:
        return np.zeros(items.shape[-1])
    n, i, j = (torch.tensor(v) for v in zip(*pairs))
    diff = torch.tensor(items)[n, i] - torch.tensor(items)[n, j]  # (pairs, d)
    return _fit(world, lambda w: -torch.nn.functional.logsigmoid(diff @ w).mean(), items.shape[-1])


def held_out(items: np.ndarray, w_true: np.ndarray, w: np.ndarray) -> dict:
    """Pairwise accuracy over all output pairs and mean Kendall τ-b, against the true order."""
    true, score = items @ w_true, items @ w
    i, j = np.triu_indices(items.shape[1], k=1)
    agree = np.sign(true[:, i] - true[:, j]) * np.sign(score[:, i] - score[:, j])
    accuracy = float(((agree > 0) + 0.5 * (agree == 0)).mean())
    taus = [kendall_tau_b(s, t) for s, t in zip(score, true)]
    return {"accuracy": accuracy, "kendall_tau": float(np.mean([t for t in taus if t is not None] or [0.0]))}


METHODS = ("listwise", "pairwise", "pairwise_every_reviewer")


def fit(world: World, method: str, items: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    if method == "listwise":
        return fit_listwise(world, items, ranks)
    return fit_pairwise(world, items, consensus_pairs(ranks) if method == "pairwise" else reviewer_pairs(ranks))


def learning_curves(world: World, sizes: list[int], seeds: int, test_items: int = 400) -> dict:
    """Per method and size: mean (over seeds) held-out accuracy and τ, every method on the same reviews."""
    out = {m: {"accuracy": [], "kendall_tau": []} for m in METHODS}
    for size in sizes:
        runs = {m: [] for m in METHODS}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            w_true = true_weights(world, rng)
            items, test = make_items(world, size, rng), make_items(world, test_items, rng)
            ranks = review(world, items, w_true, rng)
            for m in METHODS:
                runs[m].append(held_out(test, w_true, fit(world, m, items, ranks)))
        for m in METHODS:
            for key in ("accuracy", "kendall_tau"):
                out[m][key].append(float(np.mean([r[key] for r in runs[m]])))
    return {"sizes": sizes, "seeds": seeds, **out}


def items_needed(sizes: list[int], curve: list[float], target: float) -> float | None:
    """Items at which a (rising) curve first reaches `target`, linearly interpolated in log(items)."""
    for (n0, a0), (n1, a1) in zip(zip(sizes, curve), zip(sizes[1:], curve[1:])):
        if a0 >= target:
            return float(n0)
        if a1 >= target:
            t = (target - a0) / (a1 - a0)
            return float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))
    return float(sizes[0]) if curve and curve[0] >= target else None


def _committee(world: World, items: np.ndarray, ranks: np.ndarray, members: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Listwise models fitted on bootstrap resamples of the reviewed items."""
    return [fit_listwise(world, items[idx], ranks[idx]) for idx in
            (rng.integers(0, len(items), len(items)) for _ in range(members))]


def active_run(world: World, how: str, seed: int, pool: int, start: int, batch: int, rounds: int,
               test_items: int = 400, members: int = 5) -> list[dict]:
    """One run of rounds: held-out accuracy after each round and the reviews spent so far."""
    rng = np.random.default_rng(seed)
    w_true = true_weights(world, rng)
    candidates, test = make_items(world, pool, rng), make_items(world, test_items, rng)
    answers = review(world, candidates, w_true, rng)  # what the reviewers would say about each candidate
    pick = np.random.default_rng(seed + 1)
    chosen = list(pick.choice(pool, start, replace=False))
    curve = []
    for round_ in range(rounds + 1):
        w = fit_listwise(world, candidates[chosen], answers[chosen])
        curve.append({"reviews": len(chosen) * world.reviewers, **held_out(test, w_true, w)})
        if round_ == rounds:
            break
        left = [n for n in range(pool) if n not in set(chosen)]
        if how == "random":
            new = choose([None] * len(left), batch, "random", seed=seed * 1000 + round_)
        else:
            models = [w] if how == "uncertain" else _committee(world, candidates[chosen], answers[chosen], members, pick)
            scores = [np.stack([candidates[n] @ m for m in models]) for n in left]  # each (models, k)
            new = choose(scores, batch, "uncertain")
        chosen += [left[n] for n in new]
    return curve


def reviews_to_reach(curve: list[dict], target: float) -> int | None:
    return next((point["reviews"] for point in curve if point["accuracy"] >= target), None)


def active_vs_random(world: World, seeds: int, target: float, pool: int = 400, start: int = 10, batch: int = 10,
                     rounds: int = 12) -> dict:
    """Per selection rule: the seed-averaged accuracy after each round, the reviews each seed needed to
    reach `target` (None: not within the rounds), their median (a None counts as more than any), and the
    reviews at which the averaged curve reaches it."""
    out = {}
    for how in ("random", "uncertain", "committee"):
        curves = [active_run(world, how, seed, pool, start, batch, rounds) for seed in range(seeds)]
        reached = [reviews_to_reach(c, target) for c in curves]
        mean_curve = [{"reviews": curves[0][r]["reviews"], "accuracy": float(np.mean([c[r]["accuracy"] for c in curves]))}
                      for r in range(rounds + 1)]
        ordered = sorted(reached, key=lambda r: math.inf if r is None else r)
        out[how] = {
            "accuracy_by_round": [point["accuracy"] for point in mean_curve],
            "reviews_by_round": [point["reviews"] for point in mean_curve],
            "reviews_to_target": reached,
            "median_reviews_to_target": ordered[len(ordered) // 2],
            "mean_curve_reaches_target_at": reviews_to_reach(mean_curve, target),
        }
    return {"target_accuracy": target, "seeds": seeds, "pool": pool, "start_items": start, "batch_items": batch, **out}


PLAIN = World(d=8, kinds=1)
"""For the learning curves: every item alike (outputs vary along all 8 dimensions)."""
KINDS = World()
"""For active selection: 85% of the items of one kind, three rare kinds sharing the rest."""


def fewer_items(curves: dict, at: tuple[int, ...]) -> dict:
    """For listwise's accuracy at each of `at` items: how many items pairwise needs to reach it."""
    sizes = curves["sizes"]
    listwise = dict(zip(sizes, curves["listwise"]["accuracy"]))
    return {n: {"listwise_accuracy": listwise[n],
                "pairwise_items_for_it": items_needed(sizes, curves["pairwise"]["accuracy"], listwise[n]),
                "every_reviewer_pairs_items_for_it": items_needed(sizes, curves["pairwise_every_reviewer"]["accuracy"],
                                                                  listwise[n])}
            for n in at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the numbers as JSON here")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    start = time.time()
    sizes = [4, 8, 16, 32, 64, 128]
    result = {"plain_world": PLAIN.__dict__, "kinds_world": KINDS.__dict__}
    result["learning_curves"] = learning_curves(PLAIN, sizes, args.seeds)
    result["items_for_listwise_accuracy"] = fewer_items(result["learning_curves"], (8, 16, 32))
    result["learning_curves_kinds_world"] = learning_curves(KINDS, sizes, args.seeds)
    result["active_vs_random"] = active_vs_random(KINDS, seeds=max(4, args.seeds // 2), target=0.9, pool=300,
                                                  start=4, batch=4, rounds=20)
    result["runtime_s"] = time.time() - start
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
