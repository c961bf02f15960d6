"""How well scores order outputs the way people ranked them: pairwise accuracy and Kendall's τ-b.

A *ranking* is one reviewer's ranks of one item's outputs (1 = best, equal ranks are ties); the
scores are a model's, higher = better. Pairwise accuracy counts, over the output pairs a reviewer
put in an order (their ties are skipped), the share the scores order the same way (a score tie
counts half, so a model that cannot tell outputs apart scores 0.5). Kendall's τ-b (Kendall 1945,
"The treatment of ties in ranking problems") compares the two whole orders, ties in either
corrected for: 1 = the same order, 0 = unrelated, −1 = reversed. numpy only (the review report
and the reward stage use it; tests check τ-b against scipy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _signs(values: Sequence[float]) -> np.ndarray:
    """(n, n) sign of values[i] − values[j], upper triangle only (each pair once)."""
    v = np.asarray(values, dtype=np.float64)
    return np.triu(np.sign(v[:, None] - v[None, :]), k=1)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """τ-b = (concordant − discordant) / √((pairs not tied in x) · (pairs not tied in y)); None when
    x or y ties everything (or has fewer than 2 values)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: {len(x)} values against {len(y)}")
    sx, sy = _signs(x), _signs(y)
    n0 = len(x) * (len(x) - 1) / 2
    untied_x, untied_y = np.abs(sx).sum(), np.abs(sy).sum()
    if n0 == 0 or untied_x == 0 or untied_y == 0:
        return None
    return float((sx * sy).sum() / np.sqrt(untied_x * untied_y))


def pair_counts(scores: Sequence[float], ranks: Sequence[int]) -> tuple[float, int]:
    """(pairs the scores order as the ranking does, pairs the ranking orders); a score tie counts ½."""
    human = -_signs(ranks)  # a lower rank is better: +1 where output i was ranked above output j
    model = _signs(scores)
    ordered = human != 0
    right = (model[ordered] == human[ordered]).sum() + 0.5 * (model[ordered] == 0).sum()
    return float(right), int(ordered.sum())


def ranking_agreement(scores: Sequence[Sequence[float]], rankings: Sequence[Sequence[Sequence[int]]]) -> dict:
    """Scores of each item's outputs against its reviewers' rankings.

    Returns {"accuracy": pooled over every ordered pair, "kendall_tau": mean over the rankings with a
    defined τ, "pairs", "rankings", "items": [{"right", "pairs", "taus"}]} — the per-item parts are
    what a bootstrap over items resamples."""
    items, right, pairs, taus = [], 0.0, 0, []
    for item_scores, item_rankings in zip(scores, rankings, strict=True):
        item = {"right": 0.0, "pairs": 0, "taus": []}
        for ranks in item_rankings:
            r, n = pair_counts(item_scores, ranks)
            item["right"] += r
            item["pairs"] += n
            tau = kendall_tau_b(item_scores, [-rank for rank in ranks])
            if tau is not None:
                item["taus"].append(tau)
        right, pairs, taus = right + item["right"], pairs + item["pairs"], taus + item["taus"]
        items.append(item)
    return {
        "accuracy": right / pairs if pairs else None,
        "kendall_tau": float(np.mean(taus)) if taus else None,
        "pairs": pairs,
        "rankings": sum(len(r) for r in rankings),
        "items": items,
    }
