"""The overfitting flag: validation loss rising while train loss falls."""

import json

from tunelab.lifecycle import run_warnings
from tunelab.tracking.diagnostics import describe, overfitting
from tunelab.tracking.report import write_report


def _records(train, evals):
    return [{"step": s, "loss": v} for s, v in train] + [{"step": s, "eval_loss": v} for s, v in evals]


def test_rising_validation_with_falling_train_loss_is_flagged():
    train = [(s, 2.0 - 0.1 * s) for s in range(1, 13)]
    flag = overfitting(_records(train, [(3, 1.5), (6, 1.2), (9, 1.3), (12, 1.4)]))
    assert flag["best_step"] == 6 and abs(flag["eval_loss_rise_pct"] - 100 * (1.4 / 1.2 - 1)) < 1e-9
    assert flag["train_loss_after"] < flag["train_loss_before"]
    assert "after step 6" in describe(flag)


def test_no_flag_while_validation_improves_or_train_loss_rises_too():
    falling = [(s, 2.0 - 0.1 * s) for s in range(1, 13)]
    assert overfitting(_records(falling, [(3, 1.5), (6, 1.2), (9, 1.1), (12, 1.0)])) is None
    # One late uptick is not a trend.
    assert overfitting(_records(falling, [(3, 1.5), (6, 1.2), (9, 1.1), (12, 1.3)])) is None
    # Both rising: divergence, not overfitting.
    rising = [(s, 1.0 + 0.1 * s) for s in range(1, 13)]
    assert overfitting(_records(rising, [(3, 1.5), (6, 1.2), (9, 1.3), (12, 1.4)])) is None
    # A rise within noise.
    assert overfitting(_records(falling, [(3, 1.5), (6, 1.2), (9, 1.201), (12, 1.205)])) is None


def test_flag_reaches_the_run_summary_and_report(tmp_path):
    train = [(s, 2.0 - 0.1 * s) for s in range(1, 13)]
    warnings = run_warnings(_records(train, [(3, 1.5), (6, 1.2), (9, 1.3), (12, 1.4)]))
    assert len(warnings) == 1 and warnings[0].startswith("overfitting:")
    (tmp_path / "summary.json").write_text(json.dumps({"warnings": warnings}))
    assert 'class="warn">overfitting: validation loss rose 16.7% after step 6' in write_report(tmp_path).read_text()
