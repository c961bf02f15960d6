"""Intervals and paired differences added to the result files that already exist: `tunelab eval`'s
results.json, a run's summary.json (before / after) and kfold.json. Existing keys keep their
float values; the statistics go under new keys, so older readers are unaffected.

Per-row values are recomputed from the rows each command writes (predictions.jsonl,
samples.jsonl) with `evals.metrics.per_row`, and a metric gets an interval only when its rows
reproduce the stored mean (to 1e-6): an interval never describes other rows than its number.
Rows that carry a per-row `loss` (mean over the row's label tokens) and its `tokens` give
`loss` a token-weighted interval and `perplexity` its exp; corpus BLEU and the harness
accuracies have no per-row value here and get none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from tunelab.evals.metrics import metric_of, per_row
from tunelab.evals.stats import mean_interval, paired_difference, paired_t, t_interval

log = logging.getLogger(__name__)

RowValues = dict[str, tuple[list[float], list[float] | None]]
"""metric key → (one value per row, row weights or None)."""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def row_values(rows: list[dict], keys: Iterable[str], prediction: str = "prediction") -> RowValues:
    """Per-row values of those `keys` that can be recomputed from `rows` (each with `reference`
    and the output under `prediction`, or with `loss` and `tokens`); other keys are left out."""
    keys = list(keys)
    out: RowValues = {}
    if rows and all(_number(r.get("loss")) and _number(r.get("tokens")) and r["tokens"] > 0 for r in rows):
        if "loss" in keys:
            out["loss"] = ([r["loss"] for r in rows], [r["tokens"] for r in rows])
    names = list(dict.fromkeys(m for k in keys if (m := metric_of(k))))
    if rows and names and all(isinstance(r.get(prediction), str) for r in rows):
        scored = per_row([r[prediction] for r in rows], [r["reference"] for r in rows], names)
        out.update({k: (scored[k], None) for k in keys if k in scored})
    return out


def _mean(values: list[float], weights: list[float] | None) -> float:
    weights = weights or [1.0] * len(values)
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def reproduced(values: RowValues, stored: dict, where: str) -> RowValues:
    """The keys whose rows give the stored mean; a mismatch is logged and left out."""
    kept = {}
    for key, (v, w) in values.items():
        if _number(stored.get(key)) and math.isclose(_mean(v, w), stored[key], rel_tol=1e-6, abs_tol=1e-9):
            kept[key] = (v, w)
        else:
            log.warning("%s: the rows do not reproduce %s=%s; no interval for it", where, key, stored.get(key))
    return kept


def intervals(values: RowValues) -> dict[str, list[float]]:
    """{metric: [low, high]} (95% bootstrap); perplexity as exp of the loss interval."""
    out = {key: mean_interval(v, w) for key, (v, w) in values.items()}
    if "loss" in out:
        out["perplexity"] = [math.exp(min(x, 50.0)) for x in out["loss"]]  # the cap evals.loss uses
    return out


def differences(a: RowValues, b: RowValues) -> dict[str, dict]:
    """{metric: {"diff", "ci95", "p_value", "n"}} for a − b, rows paired by position, for the
    metrics both sides have. A loss pairs only when both weigh the rows alike (the same tokens)."""
    out = {}
    for key in a.keys() & b.keys():
        (va, wa), (vb, wb) = a[key], b[key]
        if len(va) == len(vb) and wa == wb:
            out[key] = paired_difference(va, vb, wa)
    return {key: out[key] for key in a if key in out}  # a's order


# ---- the three result files ----


def add_eval_intervals(results: dict, predictions: list[dict]) -> dict:
    """Add `tasks.<task>.ci95.<metric> = [low, high]` (also under `baseline.tasks`) and
    `comparison.<task>.<metric> = {"diff", "ci95", "p_value", "n"}` (target − baseline) to
    results.json's content, from the rows of predictions.jsonl; returns `results`.

    Target and baseline rows pair by position within a task: both models answer the task's rows
    in the same order (their prompts may differ when their chat templates do), so a pair needs
    the same number of rows and the same references.
    """
    sides = {"target": results["tasks"], "baseline": (results.get("baseline") or {}).get("tasks", {})}
    found: dict[str, dict[str, tuple[list[dict], RowValues]]] = {}
    for side, tasks in sides.items():
        for task, metrics in tasks.items():
            rows = [r for r in predictions if r.get("task") == task and r.get("model") == side]
            values = reproduced(row_values(rows, metrics), metrics, f"{side} {task}")
            if values:
                metrics["ci95"] = intervals(values)
                found.setdefault(side, {})[task] = (rows, values)
    comparison = {}
    for task, (rows, values) in found.get("target", {}).items():
        base_rows, base_values = found.get("baseline", {}).get(task, ([], {}))
        if [r["reference"] for r in rows] == [r["reference"] for r in base_rows] and (diffs := differences(values, base_values)):
            comparison[task] = diffs
    results["comparison"] = comparison
    return results


def add_run_intervals(summary: dict, samples: list[dict]) -> dict:
    """Add `eval.ci95.before|after.<metric> = [low, high]` and `eval.comparison.<metric> =
    {"diff", "ci95", "p_value", "n"}` (after − before, the same rows) to summary.json's content,
    from samples.jsonl's rows ({prompt, reference, before, after}); returns `summary`.

    The before/after loss is the Trainer's, over all validation rows, with no per-row values:
    it gets no interval.
    """
    ev = summary.setdefault("eval", {})
    found = {}
    for side in ("before", "after"):
        stored = ev.get(side) or {}
        found[side] = reproduced(row_values(samples, stored, prediction=side), stored, f"eval.{side}")
    ev["ci95"] = {side: intervals(values) for side, values in found.items() if values}
    ev["comparison"] = differences(found["after"], found["before"])
    return summary


def add_kfold_intervals(result: dict) -> dict:
    """Add to kfold.json's content: for each grid point, `before|after.<metric>.ci95` (the fold
    t interval of the mean), `change.<metric>` (after − before, paired t over folds) and, for the
    grid points other than the best, `vs_best.<metric>` (this point − the best, paired t over
    folds: every grid point trains on the same folds). Returns `result`."""
    best = next((p for p in result["points"] if p["name"] == (result.get("best") or {}).get("name")), None)
    for point in result["points"]:
        for side in ("before", "after"):
            for agg in point[side].values():
                agg["ci95"] = t_interval(agg["folds"]) if _complete(agg["folds"]) else None
        point["change"] = _paired_folds(point["after"], point["before"])
        if best is not None and point is not best:
            point["vs_best"] = _paired_folds(point["after"], best["after"])
    return result


def _complete(folds: list) -> bool:
    return bool(folds) and all(_number(v) for v in folds)


def _paired_folds(a: dict, b: dict) -> dict[str, dict]:
    out = {}
    for metric, agg in a.items():
        other = b.get(metric, {}).get("folds", [])
        if _complete(agg["folds"]) and _complete(other) and len(other) == len(agg["folds"]):
            if (test := paired_t(agg["folds"], other)) is not None:
                out[metric] = test
    return out
