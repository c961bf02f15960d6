"""Table cells for a number with its 95% interval (`0.3124 [0.2950, 0.3301]`) and a paired
difference with its p-value (`+0.0312 [+0.0101, +0.0520] p=0.004`), and the terminal tables of
`tunelab eval`, a run's before/after and `tunelab kfold` built from them.

The tables read the keys `evals.intervals` adds; a number without them prints alone.
"""

from __future__ import annotations

import math

from tunelab.tracking.tables import fmt_value, lower_is_better, text_table

SIGNIFICANCE = 0.05
"""The p-value below which a difference is called better/worse (not just noise)."""
_SKIP = ("n", "tokens", "ci95")


def fmt_interval(value, ci: list[float] | None = None) -> str:
    """`value [low, high]`, or the value alone without an interval."""
    shown = fmt_value(value)
    return f"{shown} [{fmt_value(ci[0])}, {fmt_value(ci[1])}]" if ci else shown


def fmt_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def fmt_difference(test: dict | None) -> str:
    """`+diff [+low, +high] p=…` of a paired test, "n/a" without one."""
    if not test:
        return "n/a"
    low, high = test["ci95"]
    return f"{test['diff']:+.4g} [{low:+.4g}, {high:+.4g}] {fmt_p(test['p_value'])}"


def verdict(metric: str, test: dict | None) -> str:
    """"better" / "worse" for a difference (first − second) with p < 0.05, by the metric's
    direction; "" when there is no test or the difference may be noise."""
    if not test or test["p_value"] >= SIGNIFICANCE or test["diff"] == 0:
        return ""
    return "better" if (test["diff"] < 0) == lower_is_better(metric) else "worse"


def scores(metrics: dict | None) -> dict:
    """A task's or side's metrics without counts, standard errors and intervals."""
    return {k: v for k, v in (metrics or {}).items() if k not in _SKIP and not k.endswith("_stderr")}


def _with_verdict(metric: str, test: dict | None) -> str:
    shown = fmt_difference(test)
    return f"{shown} ({v})" if (v := verdict(metric, test)) else shown


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def change(metric: str, first, second, test: dict | None) -> str:
    """second − first: with its paired test where the rows allow one (`+d [lo, hi] p=…`, better or
    worse only when p < 0.05); else the plain difference and its direction (loss, perplexity,
    corpus-level metrics have no per-row values to test); "n/a" unless both are numbers."""
    if test:
        return _with_verdict(metric, test)
    a, b = _number(first), _number(second)
    if a is None or b is None:
        return "n/a"
    if a == b:
        return f"{b - a:+.4g}"
    return f"{b - a:+.4g} ({'better' if (b < a) == lower_is_better(metric) else 'worse'})"


def eval_rows(results: dict) -> list[tuple[str, ...]]:
    """Header, then task (n) | metric | target [ci] | baseline [ci] | target − baseline [ci] p."""
    baseline = (results.get("baseline") or {}).get("tasks", {})
    comparison = results.get("comparison") or {}
    rows = [("task", "metric", "target [95% CI]", "baseline [95% CI]", "target − baseline [95% CI]")]
    for task, metrics in results["tasks"].items():
        base = baseline.get(task) or {}
        for metric in dict.fromkeys([*scores(metrics), *scores(base)]):
            rows.append((
                f"{task} (n={metrics.get('n', '?')})", metric,
                fmt_interval(metrics.get(metric), (metrics.get("ci95") or {}).get(metric)),
                fmt_interval(base.get(metric), (base.get("ci95") or {}).get(metric)) if base else "n/a",
                change(metric, base.get(metric), metrics.get(metric), (comparison.get(task) or {}).get(metric))
                if base else "n/a",
            ))
    return rows


def before_after_rows(ev: dict | None) -> list[tuple[str, ...]]:
    """Header, then metric | before [ci] | after [ci] | after − before [ci] p, from summary["eval"]."""
    ev = ev or {}
    before, after = ev.get("before") or {}, ev.get("after") or {}
    ci, comparison = ev.get("ci95") or {}, ev.get("comparison") or {}
    rows = [("metric", "before [95% CI]", "after [95% CI]", "after − before [95% CI]")]
    for metric in dict.fromkeys([*scores(before), *scores(after)]):
        rows.append((
            metric,
            fmt_interval(before.get(metric), (ci.get("before") or {}).get(metric)),
            fmt_interval(after.get(metric), (ci.get("after") or {}).get(metric)),
            change(metric, before.get(metric), after.get(metric), comparison.get(metric)),
        ))
    return rows


def kfold_rows(point: dict, best: str | None) -> list[tuple[str, ...]]:
    """Header, then metric | before mean [t ci] | after mean [t ci] | after − before | this − best,
    for one grid point of kfold.json (`best`: the best point's name)."""
    rows = [("metric", "before, mean [95% CI]", "after, mean [95% CI]", "after − before", "this − best")]
    for metric, agg in point["after"].items():
        before = point["before"].get(metric) or {}
        rows.append((
            metric,
            fmt_interval(before.get("mean"), before.get("ci95")),
            fmt_interval(agg.get("mean"), agg.get("ci95")),
            _with_verdict(metric, (point.get("change") or {}).get(metric)),
            "(best)" if point["name"] == best else _with_verdict(metric, (point.get("vs_best") or {}).get(metric)),
        ))
    return rows


def format_eval(results: dict) -> str:
    return text_table(eval_rows(results), labels=2)


def format_before_after(ev: dict | None) -> str:
    return text_table(before_after_rows(ev))


def format_kfold_point(point: dict, best: str | None) -> str:
    return text_table(kfold_rows(point, best))
