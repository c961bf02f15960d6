"""Intervals and paired tests (`evals.stats`) against scipy, and the keys `evals.intervals` adds to
results.json, summary.json and kfold.json."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tunelab.evals import stats
from tunelab.evals.intervals import add_eval_intervals, add_kfold_intervals, add_run_intervals
from tunelab.evals.metrics import metric_of, per_row, score
from tunelab.tracking.stat_tables import fmt_difference, fmt_interval, format_before_after, format_eval


def _scipy_percentile(data, statistic, **kw):
    ci = scipy_stats.bootstrap(data, statistic, method="percentile", n_resamples=20000, rng=1, **kw)
    return ci.confidence_interval, ci.standard_error


def test_mean_interval_matches_scipy_bootstrap():
    x = np.random.default_rng(0).beta(2, 5, 150)  # skewed, in [0, 1] like ROUGE
    (low, high), se = _scipy_percentile((x,), np.mean)
    ours = stats.mean_interval(x, resamples=20000)
    # Both are Monte Carlo estimates of the same percentiles: each endpoint is off by ~0.02 SE.
    assert ours == pytest.approx([low, high], abs=0.15 * se)
    assert stats.mean_interval(x) == stats.mean_interval(x)  # seeded
    assert stats.mean_interval([0.25] * 7) == [0.25, 0.25]


def test_weighted_mean_interval_matches_scipy_paired_bootstrap():
    rng = np.random.default_rng(1)
    loss, tokens = rng.gamma(4, 0.5, 80), rng.integers(5, 200, 80)  # per-row mean loss, label tokens

    def ratio(x, w, axis=-1):
        return (x * w).sum(axis) / w.sum(axis)

    (low, high), se = _scipy_percentile((loss, tokens), ratio, paired=True, vectorized=True)
    assert stats.mean_interval(loss, tokens, resamples=20000) == pytest.approx([low, high], abs=0.15 * se)


def test_sign_flip_p_value_exact_and_against_scipy():
    # Five rows, all improved: only "all +" and "all −" are as extreme, p = 2 / 2^5 exactly.
    assert stats.sign_flip_p_value([1, 2, 1, 3, 1]) == pytest.approx(2 / 32)
    assert stats.sign_flip_p_value([0.0] * 6) == 1.0
    a, b = np.random.default_rng(2).normal(size=(2, 11))
    exact = scipy_stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                         n_resamples=10**6).pvalue
    assert stats.sign_flip_p_value(a - b) == pytest.approx(exact)
    # Many rows: Monte Carlo, within a few of its standard errors (sqrt(p(1-p)/10^4) ≈ 0.005).
    a, b = np.random.default_rng(3).normal(size=(2, 60))
    b += 0.3
    mc = scipy_stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                      n_resamples=200000, rng=0).pvalue
    assert 0.005 < mc < 0.5
    assert stats.sign_flip_p_value(a - b) == pytest.approx(mc, abs=0.02)


def test_paired_difference():
    rng = np.random.default_rng(4)
    a = rng.random(40)
    b = a - 0.05 + rng.normal(0, 0.02, 40)  # a is better on almost every row
    result = stats.paired_difference(a, b)
    assert result["n"] == 40 and result["diff"] == pytest.approx(float(np.mean(a - b)))
    assert result["ci95"] == stats.mean_interval(a - b)
    assert result["ci95"][0] > 0 and result["p_value"] < 1e-3
    with pytest.raises(ValueError, match="paired rows"):
        stats.paired_difference(a, b[:-1])


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 13])
def test_t_distribution_matches_scipy(df):
    for t in (-7.5, -2.0, -0.3, 0.0, 0.9, 2.6, 40.0):
        assert stats.t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-12)
    assert stats.t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-10)


def test_fold_t_interval_and_paired_t_match_scipy():
    folds = [0.31, 0.35, 0.29, 0.33, 0.36]
    low, high = scipy_stats.t.interval(0.95, 4, loc=np.mean(folds), scale=scipy_stats.sem(folds))
    assert stats.t_interval(folds) == pytest.approx([low, high], rel=1e-9)
    assert stats.t_interval([0.3]) is None
    other = [0.30, 0.31, 0.30, 0.31, 0.33]
    test = stats.paired_t(folds, other)
    assert test["p_value"] == pytest.approx(scipy_stats.ttest_rel(folds, other).pvalue, rel=1e-9)
    assert test["diff"] == pytest.approx(np.mean(folds) - np.mean(other))


# ---- per-row metrics and the keys added to the result files ----

PREDICTIONS = ["NAME: Ann | DAY: Mon", "NAME: Bob | DAY: Tue", "NAME: Cy | DAY: Sun", "nothing", "NAME: Dee | DAY: Fri"]
REFERENCES = ["NAME: Ann | DAY: Mon", "NAME: Bob | DAY: Wed", "NAME: Cy | DAY: Sun", "NAME: Eve | DAY: Thu",
              "NAME: Dee | DAY: Fri"]


def test_per_row_keeps_scores_mean_api():
    names = ["exact_match", "field_accuracy", "rouge"]
    values = per_row(PREDICTIONS, REFERENCES, names)
    assert values["exact_match"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert values["field_accuracy"] == [1.0, 0.5, 1.0, 0.0, 1.0]
    assert {k: float(np.mean(v)) for k, v in values.items()} == pytest.approx(score(PREDICTIONS, REFERENCES, names))
    assert [metric_of(k) for k in ("rouge2", "rouge_l", "exact_match", "bleu", "loss")] == [
        "rouge", "rouge_l", "exact_match", None, None]


def _eval_results() -> tuple[dict, list[dict]]:
    baseline = ["x"] * 5  # the baseline gets nothing right
    rows = [{"task": "rouge", "model": model, "prompt": f"p{i}", "reference": r, "prediction": y}
            for model, outputs in (("target", PREDICTIONS), ("baseline", baseline))
            for i, (r, y) in enumerate(zip(REFERENCES, outputs))]
    rows += [{"task": "ppl", "model": "target", "prompt": f"p{i}", "reference": "r", "loss": loss, "tokens": t}
             for i, (loss, t) in enumerate([(1.0, 10), (2.0, 30), (1.5, 20)])]
    results = {
        "target": "runs/x", "baseline": {"model": "base", "tasks": {
            "rouge": {**score(baseline, REFERENCES, ["exact_match"]), "bleu": 0.0, "n": 5}}},
        "tasks": {
            "rouge": {**score(PREDICTIONS, REFERENCES, ["exact_match", "field_accuracy"]), "bleu": 41.0, "n": 5},
            "ppl": {"loss": 100 / 60, "perplexity": math.exp(100 / 60), "tokens": 60, "n": 3},
        },
    }
    return results, rows


def test_eval_results_get_intervals_and_paired_comparison():
    results, rows = _eval_results()
    add_eval_intervals(results, rows)
    target = results["tasks"]["rouge"]
    assert target["exact_match"] == 0.6 and isinstance(target["exact_match"], float)  # unchanged
    assert set(target["ci95"]) == {"exact_match", "field_accuracy"}  # corpus BLEU has no per-row value
    assert target["ci95"]["exact_match"] == stats.mean_interval([1, 0, 1, 0, 1])
    assert results["baseline"]["tasks"]["rouge"]["ci95"]["exact_match"] == [0.0, 0.0]
    comparison = results["comparison"]["rouge"]
    assert list(comparison) == ["exact_match"]  # the baseline has no field_accuracy
    assert comparison["exact_match"]["diff"] == pytest.approx(0.6) and comparison["exact_match"]["n"] == 5
    assert comparison["exact_match"]["p_value"] == pytest.approx(2 / 8)  # three rows differ, all the same way
    # Token-weighted loss: (1*10 + 2*30 + 1.5*20) / 60; perplexity's interval is exp of the loss's.
    ppl = results["tasks"]["ppl"]["ci95"]
    assert ppl["loss"] == stats.mean_interval([1.0, 2.0, 1.5], [10, 30, 20])
    assert ppl["perplexity"] == pytest.approx([math.exp(x) for x in ppl["loss"]])

    table = format_eval(results)
    assert f"0.6 [{target['ci95']['exact_match'][0]:.4g}, {target['ci95']['exact_match'][1]:.4g}]" in table
    assert "+0.6 [" in table and "p=0.25" in table and "41" in table


def test_rows_that_do_not_reproduce_the_number_get_no_interval(caplog):
    results, rows = _eval_results()
    results["tasks"]["rouge"]["exact_match"] = 0.8  # not what the rows give
    add_eval_intervals(results, rows)
    assert "exact_match" not in results["tasks"]["rouge"]["ci95"]
    assert "exact_match" not in results["comparison"].get("rouge", {})
    assert "do not reproduce exact_match" in caplog.text


def test_run_before_after_intervals():
    samples = [{"prompt": f"p{i}", "reference": r, "before": "x", "after": y}
               for i, (r, y) in enumerate(zip(REFERENCES, PREDICTIONS))]
    summary = {"eval": {"before": {"loss": 2.0, "exact_match": 0.0}, "after": {"loss": 1.0, "exact_match": 0.6}}}
    ev = add_run_intervals(summary, samples)["eval"]
    assert ev["before"] == {"loss": 2.0, "exact_match": 0.0}
    assert ev["ci95"]["after"] == {"exact_match": stats.mean_interval([1, 0, 1, 0, 1])}
    assert ev["comparison"]["exact_match"]["diff"] == pytest.approx(0.6)
    table = format_before_after(ev)
    # no per-row loss, so no test: the plain difference and its direction (as the table always showed)
    assert [c.strip() for c in table.splitlines()[2].split("|")] == ["loss", "2", "1", "-1 (better)"]
    assert fmt_difference(ev["comparison"]["exact_match"]) in table


def test_kfold_intervals_and_paired_folds():
    def agg(folds):
        return {"folds": folds, "mean": float(np.mean(folds)), "std": float(np.std(folds, ddof=1))}

    result = {"best": {"name": "a"}, "points": [
        {"name": "a", "before": {"loss": agg([3.0, 3.1, 2.9])}, "after": {"loss": agg([1.0, 1.2, 1.1])}},
        {"name": "b", "before": {"loss": agg([3.0, 3.1, 2.9])}, "after": {"loss": agg([1.3, 1.4, 1.6])}},
    ]}
    add_kfold_intervals(result)
    a, b = result["points"]
    assert a["after"]["loss"]["ci95"] == stats.t_interval([1.0, 1.2, 1.1])
    assert a["change"]["loss"]["diff"] == pytest.approx(-1.9)
    assert "vs_best" not in a and b["vs_best"]["loss"]["diff"] == pytest.approx(0.3333333)
    assert b["vs_best"]["loss"]["p_value"] == pytest.approx(
        scipy_stats.ttest_rel([1.3, 1.4, 1.6], [1.0, 1.2, 1.1]).pvalue)


def test_cells():
    assert fmt_interval(0.31234, [0.29, 0.3301]) == "0.3123 [0.29, 0.3301]"
    assert fmt_interval(2.0) == "2"
    assert fmt_difference({"diff": 0.03, "ci95": [0.01, 0.05], "p_value": 0.0004, "n": 9}) == \
        "+0.03 [+0.01, +0.05] p<0.001"
