"""Inter-reviewer agreement and outlying reviewers.

- Rubric scores: Krippendorff's alpha at the ordinal level (Krippendorff 2011, "Computing
  Krippendorff's Alpha-Reliability"), through the `krippendorff` package; 1 = perfect
  agreement, 0 = what chance gives, below 0 = systematic disagreement.
- Rankings of one item: Kendall's W with the tie correction (Kendall & Babington Smith
  1939; Siegel & Castellan 1988, eq. 9.16), and pairwise agreement: the share of
  (reviewer pair, output pair) comparisons on which both reviewers order the outputs the same
  way (a tie counts as an order).
- Outliers: reviewers whose mean distance from the others is far above the median reviewer's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from statistics import median

import numpy as np
from scipy.stats import rankdata

Ranks = Sequence[Sequence[float]]  # one row per reviewer, one column per output (1 = best)


def ordinal_alpha(matrix: Sequence[Sequence[float | None]], domain: Sequence[int]) -> float | None:
    """Krippendorff's ordinal alpha of a reviewers x units matrix (None = not scored); None when
    it is undefined: no unit scored twice, or every pairable score the same value."""
    import krippendorff

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    if data.ndim != 2 or data.shape[0] < 2:
        return None
    pairable = data[:, (~np.isnan(data)).sum(axis=0) >= 2]
    if len(np.unique(pairable[~np.isnan(pairable)])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=data, value_domain=list(domain), level_of_measurement="ordinal"))


def kendalls_w(ranks: Ranks) -> float | None:
    """Kendall's coefficient of concordance W in [0, 1] for m reviewers ranking the same n outputs,
    corrected for ties; None with fewer than 2 reviewers or outputs, or when all tie everything."""
    m, n = len(ranks), len(ranks[0]) if ranks else 0
    if m < 2 or n < 2:
        return None
    r = np.array([rankdata(row) for row in ranks])  # ties -> average ranks
    totals = r.sum(axis=0)
    s = float(((totals - totals.mean()) ** 2).sum())
    ties = sum(float((c**3 - c).sum()) for c in (np.unique(row, return_counts=True)[1] for row in r))
    denominator = m**2 * (n**3 - n) - m * ties
    return None if denominator <= 0 else 12 * s / denominator


def _order(a: float, b: float) -> int:
    return (a > b) - (a < b)


def pairwise_counts(ranks: Ranks) -> tuple[int, int]:
    """(agreeing, total) over reviewer pairs x output pairs."""
    agree = total = 0
    for x, y in combinations(ranks, 2):
        for i, j in combinations(range(len(x)), 2):
            total += 1
            agree += _order(x[i], x[j]) == _order(y[i], y[j])
    return agree, total


def pairwise_agreement(ranks: Ranks) -> float | None:
    agree, total = pairwise_counts(ranks)
    return agree / total if total else None


def rank_disagreement(ranks: Ranks) -> list[tuple[int, int]]:
    """Per reviewer (row): (comparisons disagreeing with another reviewer, comparisons made)."""
    out = []
    for k, mine in enumerate(ranks):
        others = [row for i, row in enumerate(ranks) if i != k]
        counts = [pairwise_counts([mine, other]) for other in others]
        out.append((sum(t - a for a, t in counts), sum(t for _, t in counts)))
    return out


def score_deviation(scores: Sequence[float]) -> list[float]:
    """Per score: its distance from the mean of the other reviewers' scores of the same thing."""
    if len(scores) < 2:
        return []
    total = sum(scores)
    return [abs(x - (total - x) / (len(scores) - 1)) for x in scores]


def outliers(distance: dict[str, float], floor: float) -> list[str]:
    """Reviewers whose distance from the others exceeds the median by more than 3 scaled MADs
    (a robust z-score above 3) and by more than `floor`, so that small, uniform noise among
    well-agreeing reviewers never flags anybody. Needs 3 reviewers: with 2, neither is odd."""
    values = [v for v in distance.values() if v is not None and math.isfinite(v)]
    if len(values) < 3:
        return []
    mid = median(values)
    mad = 1.4826 * median(abs(v - mid) for v in values)
    return sorted(name for name, v in distance.items() if v is not None and v - mid > max(3 * mad, floor))
