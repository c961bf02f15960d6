"""What to review next: of the candidate items, queue the `budget` the reward model is least sure about.

Each candidate's outputs are scored by one reward model or several (`tunelab reward` runs). For a
pair of outputs, a Bradley–Terry reward model's own probability that i beats j is
p = σ(s_i − s_j) (its training loss is −log of it):

- one model — *uncertainty sampling* (Lewis & Gale 1994): the mean over the item's output pairs of
  4·p(1 − p), 1 when the model scores the outputs alike and toward 0 when it is sure of the order;
- several — *query by committee* (Seung, Opper & Sompolinsky 1992): the mean over pairs of
  4·Var_models(p), 0 when the models agree and 1 when they split into confident opposite camps.

Items already in the project are never candidates, so re-running `add-task --select uncertain`
after training a new reward model on the new reviews queues the next batch. `random` draws the
same number of items uniformly (the baseline to compare with).
"""

from __future__ import annotations

import random

import numpy as np

from tunelab.errors import TunelabError

HOW = ("uncertain", "random")


def _pair_probabilities(scores: np.ndarray) -> np.ndarray:
    """scores (M, k) → (M, k(k−1)/2): σ(s_i − s_j) for each output pair i < j, per model."""
    i, j = np.triu_indices(scores.shape[1], k=1)
    return 1 / (1 + np.exp(-(scores[:, i] - scores[:, j])))


def uncertainty(scores) -> float:
    """0..1 for one item's scores (M models, k outputs); see the module docstring."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] < 2:
        raise ValueError("uncertainty needs at least 2 outputs per item")
    p = _pair_probabilities(scores)
    if scores.shape[0] == 1:
        return float((4 * p * (1 - p)).mean())
    return float((4 * p.var(axis=0)).mean())


def choose(item_scores: list, budget: int, how: str = "uncertain", seed: int = 0) -> list[int]:
    """Indices of the `budget` items to review first (most uncertain first, ties in order; or at random)."""
    if how not in HOW:
        raise TunelabError(f"--select {how}: use one of {', '.join(HOW)}")
    budget = min(budget, len(item_scores))
    if how == "random":
        return sorted(random.Random(seed).sample(range(len(item_scores)), budget))
    values = [uncertainty(s) for s in item_scores]
    return sorted(range(len(values)), key=lambda n: -values[n])[:budget]


def select_rows(rows: list[tuple], reward_models: list[str], budget: int, how: str = "uncertain",
                seed: int = 0, batch_size: int = 8) -> tuple[list[tuple], list[float]]:
    """The `budget` (id, prompt, reference, outputs) rows to queue, and each one's uncertainty
    (None for random picks), scored by `reward_models` (`tunelab reward` run folders)."""
    if budget < 1:
        raise TunelabError(f"--budget {budget}: queue at least 1 item")
    if how == "uncertain" and not reward_models:
        raise TunelabError("--select uncertain: name the reward model(s) that score the outputs: --reward-model "
                           "runs/<reward run> (repeat it for a committee)")
    short = [rid for rid, _, _, outputs in rows if len(outputs) < 2]
    if how == "uncertain" and short:
        raise TunelabError(f"--select uncertain compares outputs: item {short[0]!r} has fewer than 2")
    if how == "random":
        picked = choose([None] * len(rows), budget, how, seed)
        return [rows[n] for n in picked], [None] * len(picked)
    from tunelab.evals.reward_scores import score_outputs
    from tunelab.models.reward_model import load_reward_model

    items = [(prompt, [o["text"] for o in outputs]) for _, prompt, _, outputs in rows]
    per_model = []
    for run in reward_models:
        model, tokenizer = load_reward_model(run)
        per_model.append(score_outputs(model, tokenizer, items, batch_size))
    item_scores = [np.array([model_scores[n] for model_scores in per_model]) for n in range(len(rows))]
    picked = choose(item_scores, budget, how, seed)
    return [rows[n] for n in picked], [uncertainty(item_scores[n]) for n in picked]
