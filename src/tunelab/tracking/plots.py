"""Loss, perplexity and learning-rate curves from metrics.jsonl records, as PNGs for the run folder.

Figures are built with matplotlib's object API (`Figure`), not pyplot: it renders with the
Agg canvas, never opens a window, keeps no global figure registry to leak, and leaves the
process-wide backend alone (the toolkit may run inside a notebook).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure

# (records key, legend label, line style)
_LOSS_SERIES = (("loss", "train", "-"), ("eval_loss", "validation", "o-"))
_SOURCE_LOSS = "eval_loss_"  # + a mixture source's name: its validation loss (TunelabTrainer.evaluate)
_PPL_SERIES = (("train_perplexity", "train", "-"), ("perplexity", "validation", "o-"))
_LR_SERIES = (("learning_rate", "learning rate", "-"),)
# Generation metrics that train.eval_generation may log at mid-run validations.
_GENERATION_SERIES = tuple((f"eval_{m}", m, "o-") for m in ("rouge_l", "rouge_1", "rouge_2", "exact_match", "field_accuracy"))
# Above this max/min ratio a linear axis flattens the interesting end of the curve.
_LOG_SCALE_RATIO = 20.0


def _points(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry a finite `key` value."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and r.get("step") is not None:
            steps.append(r["step"])
            values.append(v)
    return steps, values


def _plot(records: list[dict], series, title: str, ylabel: str, path: Path, min_points: int = 1) -> Path | None:
    """Draw the series that have at least `min_points` points; write nothing and return None if none has."""
    curves = [(label, style, *_points(records, key)) for key, label, style in series]
    curves = [c for c in curves if len(c[2]) >= min_points]
    if not curves:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for label, style, steps, values in curves:
        ax.plot(steps, values, style, label=label, markersize=3)
    values = [v for c in curves for v in c[3]]
    if min(values) > 0 and max(values) / min(values) > _LOG_SCALE_RATIO:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_metrics(records: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Write loss.png, perplexity.png, generation.png and learning_rate.png into `out_dir`; a plot
    with no points is skipped (the learning rate needs two: one logged step is no schedule).

    Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_source = sorted({k for r in records for k in r if k.startswith(_SOURCE_LOSS)})  # a mixture's sources
    loss_series = (*_LOSS_SERIES, *((k, f"validation: {k[len(_SOURCE_LOSS):]}", "o--") for k in per_source))
    written = [
        _plot(records, loss_series, "Loss", "cross-entropy loss", out_dir / "loss.png"),
        _plot(records, _PPL_SERIES, "Perplexity", "perplexity", out_dir / "perplexity.png"),
        _plot(records, _GENERATION_SERIES, "Generation metrics (validation)", "score", out_dir / "generation.png"),
        _plot(records, _LR_SERIES, "Learning rate", "learning rate", out_dir / "learning_rate.png", min_points=2),
    ]
    return [p for p in written if p is not None]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_comparison(results: dict, path: str | os.PathLike) -> Path | None:
    """Baseline vs target bars for an eval's results.json, one panel per task metric (each on its
    own scale: perplexity and accuracy do not share an axis), ± standard error where known.

    Writes nothing and returns None when no metric has a number.
    """
    from tunelab.tracking.stat_tables import scores

    baseline = (results.get("baseline") or {}).get("tasks", {})
    panels = [
        (task, metric, [(name, side[metric], side.get(f"{metric}_stderr")) for name, side in
                        (("baseline", baseline.get(task, {})), ("target", metrics)) if _finite(side.get(metric))])
        for task, metrics in results["tasks"].items()
        for metric in scores(metrics)
    ]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    cols = min(4, len(panels))
    fig = Figure(figsize=(3 * cols, 2.6 * math.ceil(len(panels) / cols)), dpi=100)
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for ax, (task, metric, bars) in zip(axes, panels):
        names, values, errors = zip(*bars)
        errors = [e if _finite(e) else 0 for e in errors]
        drawn = ax.bar(names, values, yerr=errors if any(errors) else None, capsize=3,
                       color=["#9e9e9e" if n == "baseline" else "#1f77b4" for n in names])
        ax.bar_label(drawn, fmt="%.4g", fontsize=8)
        ax.set_title(f"{task}: {metric}", fontsize=9)
        ax.margins(y=0.2)
        if min(values) >= 0:
            ax.set_ylim(bottom=0)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_curves(records: list[dict], keys: dict[str, str], title: str, path: str | os.PathLike) -> Path | None:
    """One figure of the given metrics.jsonl keys (key → legend label), such as a preference stage's
    reward and accuracy; validation keys (`eval_*`) are drawn with dots. None when no key has points."""
    series = tuple((key, label, "o-" if key.startswith("eval_") else "-") for key, label in keys.items())
    return _plot(records, series, title, title.lower(), Path(path))
