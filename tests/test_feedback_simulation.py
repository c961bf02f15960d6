"""The claims of benchmarks/feedback_curves.py at small sizes (seconds): on synthetic items with a known
true order, reviewed by noisy simulated reviewers, a linear reward model fitted with our losses —

- listwise (Plackett–Luce over every reviewer's ranking) orders held-out items at least as well as
  pairwise (Bradley–Terry on the pairs `review export` writes) from the same reviews, and pairwise
  needs more items to match it;
- choosing what to review by committee disagreement (`review.select`) reaches a target accuracy
  with fewer reviews than choosing at random.
"""

from __future__ import annotations

import numpy as np

from benchmarks.feedback_curves import (
    KINDS, PLAIN, World, active_run, consensus_pairs, items_needed, learning_curves, review, reviews_to_reach,
)


def test_simulated_reviewers_rank_around_the_true_order_with_ties():
    world = World(d=4, kinds=1, reviewers=3)
    rng = np.random.default_rng(0)
    items = rng.normal(size=(200, world.k, world.d))
    w = np.array([2.0, 0.0, 0.0, 0.0])
    ranks = review(world, items, w, rng)
    assert ranks.shape == (200, 3, 4) and ranks.min() == 1
    best = (items @ w).argmax(1)
    assert (ranks[np.arange(200), :, best] == 1).mean() > 0.5  # the truly best is usually ranked first ...
    assert (ranks[np.arange(200), :, best] > 1).any()  # ... but not always
    assert any(len(set(r)) < 4 for r in ranks.reshape(-1, 4))  # and close calls are ties
    pairs = consensus_pairs(ranks[:1])
    assert all(ranks[0, :, i].mean() < ranks[0, :, j].mean() for _, i, j in pairs)


def test_listwise_orders_at_least_as_well_as_pairwise_from_the_same_reviews():
    sizes = [4, 8, 16]
    curves = learning_curves(PLAIN, sizes, seeds=6, test_items=200)
    for key in ("accuracy", "kendall_tau"):
        assert all(lw >= pw for lw, pw in zip(curves["listwise"][key], curves["pairwise"][key])), key
    needed = items_needed(sizes, curves["pairwise"]["accuracy"], curves["listwise"]["accuracy"][1])
    assert needed is None or needed > 8  # pairwise needs more than listwise's 8 items for that accuracy


def test_committee_selection_needs_fewer_reviews_than_random():
    target, rounds = 0.88, 10
    reviews = {}
    for how in ("random", "committee"):
        curves = [active_run(KINDS, how, seed, pool=200, start=4, batch=4, rounds=rounds, test_items=200, members=4)
                  for seed in range(4)]
        cap = curves[0][-1]["reviews"] + 8  # not reached within the rounds: counted as one round more
        reviews[how] = sum(reviews_to_reach(c, target) or cap for c in curves)
        reviews[how + "_final"] = float(np.mean([c[-1]["accuracy"] for c in curves]))
    assert reviews["committee"] < reviews["random"]
    assert reviews["committee_final"] > reviews["random_final"]
