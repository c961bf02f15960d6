"""Mix several sources by weight: each source's share of the training *tokens* follows its weight.

Tokens, not samples: a source of long conversations mixed 1:1 with one of short summaries by
sample count would get most of the gradient signal, which is not what a weight says. The
mixture is drawn once per run (seeded) and every epoch goes over the same draw, so packing
(which needs the whole split) and the data cache work as for one source.

`subsample` (default): the source with the fewest tokens for its weight is used whole and the
others are drawn without replacement to their share; no sample repeats. `repeat`: the source
with the most tokens for its weight is used whole and the others are repeated (whole passes of
a seeded shuffle, then a part of one more) up to their share. Either way a source's share is
off by at most one sample's tokens.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random


def budgets(tokens: list[int], weights: list[float], rule: str) -> list[float]:
    """Tokens each source contributes: shares = weights / sum, scaled so that the scarcest
    (`subsample`) or the most abundant (`repeat`) source, relative to its share, is used whole."""
    shares = [w / sum(weights) for w in weights]
    pick = min if rule == "subsample" else max
    total = pick(t / s for t, s in zip(tokens, shares))
    return [s * total for s in shares]


def draw(lengths: list[int], budget: float, rng: random.Random) -> list[int]:
    """Sample indices whose lengths sum to `budget` within half a sample: whole seeded shuffles
    while the budget holds one, then the prefix of one more that comes closest."""
    total = sum(lengths)
    passes = math.floor(budget / total + 1e-9) if total else 0
    picked = []
    for _ in range(passes):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        picked += order
    rest = budget - passes * total
    if rest <= 0.5:
        return picked
    order = list(range(len(lengths)))
    rng.shuffle(order)
    sums = list(itertools.accumulate(lengths[i] for i in order))
    k = bisect.bisect_left(sums, rest)  # sums[k] >= rest > sums[k-1]: keep the closer of the two prefixes
    if k == len(sums) or rest - (sums[k - 1] if k else 0) <= sums[k] - rest:
        k -= 1
    return picked + order[: k + 1]


def mix(lengths: list[list[int]], weights: list[float], rule: str, seed: int) -> list[list[int]]:
    """The sample indices drawn from each source (in draw order; a source used whole keeps its order)."""
    if len(lengths) == 1:
        return [list(range(len(lengths[0])))]
    rng = random.Random(seed)
    drawn = []
    for source_lengths, budget in zip(lengths, budgets([sum(ls) for ls in lengths], weights, rule)):
        whole = abs(budget - sum(source_lengths)) <= 1e-6 * max(budget, 1)
        drawn.append(list(range(len(source_lengths))) if whole else draw(source_lengths, budget, rng))
    return drawn
