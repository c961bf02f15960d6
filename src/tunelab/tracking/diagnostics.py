"""Warnings read off a run's metrics.jsonl, for the summary, the report and the terminal."""

from __future__ import annotations

from statistics import fmean

MIN_RISE = 0.01
"""Relative rise of validation loss over its minimum that counts (below it is noise)."""


def overfitting(records: list[dict], min_rise: float = MIN_RISE) -> dict | None:
    """The overfitting signal: validation loss rising while train loss still falls.

    Flagged when the validation loss bottomed out before the last two validations, the last one
    is more than `min_rise` above that minimum, and the mean train loss logged after the minimum
    is below the mean over an equally long stretch just before it. Returns the evidence (the step
    to stop at, both losses) or None.
    """
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and r.get("step")]
    if len(evals) < 3:
        return None
    best_step, best = min(evals, key=lambda point: point[1])
    last_step, last = evals[-1]
    after_best = [loss for step, loss in evals if step > best_step]
    if len(after_best) < 2 or last <= best * (1 + min_rise):
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    after = [loss for step, loss in train if best_step < step <= last_step]
    before = [loss for step, loss in train if step <= best_step][-len(after):]
    if not after or not before or fmean(after) >= fmean(before):
        return None
    return {
        "best_step": best_step,
        "best_eval_loss": best,
        "last_eval_loss": last,
        "eval_loss_rise_pct": 100 * (last / best - 1),
        "train_loss_before": fmean(before),
        "train_loss_after": fmean(after),
    }


def describe(flag: dict) -> str:
    """One line for the terminal and the report."""
    return (
        f"overfitting: validation loss rose {flag['eval_loss_rise_pct']:.1f}% after step {flag['best_step']} "
        f"({flag['best_eval_loss']:.4g} → {flag['last_eval_loss']:.4g}) while train loss fell "
        f"({flag['train_loss_before']:.4g} → {flag['train_loss_after']:.4g}); stop near step {flag['best_step']} "
        "(train.early_stopping, train.load_best) or add data / regularisation"
    )
