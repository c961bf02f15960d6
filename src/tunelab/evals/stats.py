"""95% intervals and paired tests for evaluation numbers, so a difference can be told from noise.

- Per-row metrics (ROUGE, exact match, field accuracy, per-row loss): the percentile bootstrap
  over rows (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, §13.3), seeded, so the
  same rows always give the same interval.
- Two models on the same rows: the mean paired difference with its bootstrap interval, and a
  two-sided paired permutation (sign-flip) p-value: under "no difference" the two outputs of a
  row are exchangeable, so each row's difference is as likely negated (Good 2005, *Permutation,
  Parametric and Bootstrap Tests of Hypotheses*, §3.3). Exact over all 2^n sign patterns for
  few rows; Monte Carlo otherwise, counted as (1 + hits) / (1 + draws) so it is never 0
  (Phipson & Smyth 2010).
- k-fold: Student's t interval over the fold values, and a paired t test between grid points
  (each fold is one pair). Folds share most of their training rows, so the fold values are not
  independent and the t interval is somewhat narrow; no unbiased estimate of that variance
  exists (Bengio & Grandvalet 2004).

numpy only: scipy is not a dependency of the package (the tests check these against it).
Weighted means take row weights: a token-weighted loss is sum(row loss sums) / sum(row tokens),
which is the mean of per-row mean losses weighted by their token counts.
"""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4000
"""Bootstrap resamples: the Monte Carlo error of a 95% percentile endpoint is then a few
hundredths of a standard error."""
PERMUTATIONS = 10000
"""Sign flips drawn for the p-value (resolution 1e-4); with 2^n ≤ this the test is exact."""
SEED = 0
_CHUNK = 1 << 22  # elements per (draws, rows) matrix: ~32 MB of float64


def _as_rows(values, weights=None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    if x.ndim != 1 or not len(x):
        raise ValueError("need a non-empty list of per-row values")
    if w.shape != x.shape or (w <= 0).any():
        raise ValueError(f"need one positive weight per row: {w.shape[0]} weights for {x.shape[0]} rows")
    if not np.isfinite(x).all():
        raise ValueError("per-row values must be finite numbers")
    return x, w


def _chunks(total: int, n: int):
    """Sizes of the draw batches, so a (batch, n) matrix stays near _CHUNK elements."""
    step = max(1, _CHUNK // n)
    for start in range(0, total, step):
        yield min(step, total - start)


def _bootstrap_means(x: np.ndarray, w: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples,) weighted means of rows drawn with replacement."""
    rng = np.random.default_rng(seed)
    out = []
    for size in _chunks(resamples, len(x)):
        idx = rng.integers(0, len(x), (size, len(x)))  # (size, n)
        out.append((w[idx] * x[idx]).sum(1) / w[idx].sum(1))
    return np.concatenate(out)


def _percentile_interval(draws: np.ndarray) -> list[float]:
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return [float(low), float(high)]


def mean_interval(values, weights=None, *, resamples: int = RESAMPLES, seed: int = SEED) -> list[float]:
    """[low, high]: the 95% percentile-bootstrap interval of the (weighted) mean of per-row values."""
    x, w = _as_rows(values, weights)
    return _percentile_interval(_bootstrap_means(x, w, resamples, seed))


def sign_flip_p_value(differences, weights=None, *, permutations: int = PERMUTATIONS, seed: int = SEED) -> float:
    """Two-sided p-value that the (weighted) mean paired difference is 0 (see the module docstring)."""
    d, w = _as_rows(differences, weights)
    wd = w * d  # the weights' sum is the same under every flip, so the sums decide
    observed = abs(wd.sum())
    tolerance = 1e-9 * np.abs(wd).sum()  # sums of the same numbers in another order differ by rounding
    n = len(d)
    if 2**n <= permutations:  # every sign pattern once: bit j of pattern i flips row j
        patterns = np.arange(2**n)[:, None] >> np.arange(n)[None, :] & 1
        flipped = np.abs(((1 - 2 * patterns) * wd).sum(1))  # (2^n,)
        return float((flipped >= observed - tolerance).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for size in _chunks(permutations, n):
        signs = rng.integers(0, 2, (size, n)) * 2 - 1  # (size, n) of ±1
        hits += int((np.abs((signs * wd).sum(1)) >= observed - tolerance).sum())
    return (1 + hits) / (1 + permutations)


def paired_difference(a, b, weights=None, *, resamples: int = RESAMPLES, permutations: int = PERMUTATIONS,
                      seed: int = SEED) -> dict:
    """{"diff", "ci95", "p_value", "n"} for model a − model b scored on the same rows (row i of
    `a` and of `b` is the same prompt): the (weighted) mean difference, its bootstrap interval
    and the sign-flip p-value."""
    x, w = _as_rows(a, weights)
    y, _ = _as_rows(b, weights)
    if x.shape != y.shape:
        raise ValueError(f"paired rows: {len(x)} values for one model, {len(y)} for the other")
    d = x - y
    return {
        "diff": float((w * d).sum() / w.sum()),
        "ci95": _percentile_interval(_bootstrap_means(d, w, resamples, seed)),
        "p_value": sign_flip_p_value(d, w, permutations=permutations, seed=seed),
        "n": len(d),
    }


# ---- Student's t, for k-fold (few values, so no bootstrap) ----


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with an integer number of degrees of freedom, in closed form
    (Abramowitz & Stegun 1964, 26.7.3 and 26.7.4: a finite series in θ = atan(t / √df))."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    term, series = 1.0, 1.0
    if df % 2:  # odd: A = (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + …)), df−1 terms in all
        for k in range(2, df - 1, 2):
            term *= k / (k + 1) * c * c
            series += term
        inside = (2 / math.pi) * (theta + (s * c * series if df > 1 else 0.0))
    else:  # even: A = sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + …), df/2 terms
        for k in range(1, df - 1, 2):
            term *= k / (k + 1) * c * c
            series += term
        inside = s * series
    # inside = P(|T| < |t|)
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T ≤ t) = p (bisection on `t_cdf`, to 1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2
    while t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-12 * max(1.0, abs(high)):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_interval(values) -> list[float] | None:
    """[low, high]: the 95% t interval of the mean of fold values (None for fewer than 2)."""
    x, _ = _as_rows(values)
    if len(x) < 2:
        return None
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return [float(x.mean() - half), float(x.mean() + half)]


def paired_t(a, b) -> dict | None:
    """{"diff", "ci95", "p_value", "n"} for a − b over the same folds: the paired t test
    (None for fewer than 2 folds)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    interval = t_interval(d)
    if interval is None:
        return None
    se = d.std(ddof=1) / math.sqrt(len(d))
    if se == 0:
        p = 1.0 if d.mean() == 0 else 0.0
    else:
        p = 2 * (1 - t_cdf(abs(d.mean()) / se, len(d) - 1))
    return {"diff": float(d.mean()), "ci95": interval, "p_value": float(p), "n": len(d)}
