"""Agreement statistics against hand-computed and published values, outliers, export and report."""

from __future__ import annotations

import json
import math

import pytest

from tests.review_support import make_project
from tunelab.data.formats import FORMATS
from tunelab.review import agreement, assign
from tunelab.review.aggregate import load
from tunelab.review.export import export, pairs
from tunelab.review.report import summarise, write_report
from tunelab.review.store import Assignment
from tunelab.review.submit import submit

nan = None


def test_ordinal_alpha_hand_computed():
    # Units (1,1), (2,2), (1,2): n1 = n2 = 3, o12 = o21 = 1; ordinal delta^2_12 = (6 - 6/2)^2 = 9;
    # D_o = 18/6 = 3, D_e = 2*3*3*9/(6*5) = 5.4 -> alpha = 1 - 3/5.4 = 4/9. Unused scale points
    # (3..5) add nothing to the ordinal distances between 1 and 2.
    assert agreement.ordinal_alpha([[1, 2, 1], [1, 2, 2]], range(1, 6)) == pytest.approx(4 / 9)


def test_ordinal_alpha_krippendorff_2011_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x
    # 12 units with missing values; published ordinal alpha = 0.815.
    data = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    ]
    assert agreement.ordinal_alpha(data, range(1, 6)) == pytest.approx(0.815, abs=5e-4)


def test_ordinal_alpha_undefined_cases():
    assert agreement.ordinal_alpha([[3, 3], [3, 3]], range(1, 6)) is None  # no variation at all
    assert agreement.ordinal_alpha([[1, nan], [nan, 2]], range(1, 6)) is None  # nothing scored twice
    assert agreement.ordinal_alpha([[1, 2, 5]], range(1, 6)) is None  # one reviewer


def test_kendalls_w_and_pairwise_hand_computed():
    ranks = [[1, 2, 3], [1, 3, 2], [1, 2, 3]]
    # Rank sums 3, 7, 8 (mean 6): S = 9 + 1 + 4 = 14; W = 12 S / (m^2 (n^3 - n)) = 168 / 216.
    assert agreement.kendalls_w(ranks) == pytest.approx(7 / 9)
    # Output pairs AB and AC: all 3 reviewer pairs agree; BC: only reviewers 1 and 3 -> 7 of 9.
    assert agreement.pairwise_agreement(ranks) == pytest.approx(7 / 9)
    assert agreement.kendalls_w([[1, 2, 3], [3, 2, 1]]) == pytest.approx(0.0)
    assert agreement.kendalls_w([[2, 1], [2, 1], [2, 1]]) == pytest.approx(1.0)


def test_kendalls_w_with_ties_hand_computed():
    # Average ranks [1.5, 1.5, 3] and [1, 2, 3]: sums 2.5, 3.5, 6 (mean 4), S = 6.5; one tie of two:
    # T = 2^3 - 2 = 6; W = 12 * 6.5 / (2^2 * (27 - 3) - 2 * 6) = 78 / 84.
    assert agreement.kendalls_w([[1, 1, 3], [1, 2, 3]]) == pytest.approx(78 / 84)
    # AB: a tie against an order disagrees; AC and BC agree.
    assert agreement.pairwise_agreement([[1, 1, 3], [1, 2, 3]]) == pytest.approx(2 / 3)
    assert agreement.kendalls_w([[1, 1], [1, 1]]) is None  # everything tied: W undefined
    assert agreement.kendalls_w([[1, 2]]) is None


def test_outliers_flag_only_the_odd_reviewer():
    # median 0.115, scaled MAD 1.4826 * 0.01 -> threshold 0.115 + max(0.044, 0.15) = 0.265
    assert agreement.outliers({"a": 0.10, "b": 0.12, "c": 0.11, "d": 0.60}, floor=0.15) == ["d"]
    assert agreement.outliers({"a": 0.10, "b": 0.20, "c": 0.15}, floor=0.15) == []
    assert agreement.outliers({"a": 0.0, "b": 0.9}, floor=0.15) == []  # two reviewers: neither is odd


def _review(store, reviewer: int, by_model: dict[str, int | dict[str, int]], comment: str = ""):
    """Claim the reviewer's next item and submit ranks or rubric scores given per model name."""
    aid = assign.claim(store, reviewer)
    with store.read() as s:
        a = s.get(Assignment, aid)
        outputs, kind = list(a.item.outputs), a.item.kind
    if kind == "rank":
        form = {f"rank_{o.id}": str(by_model[o.model]) for o in outputs}
    else:
        form = {f"score_{o.id}_{c}": str(by_model[o.model][name]) for o in outputs
                for c, name in ((1, "accuracy"), (2, "coherence"), (3, "safety"))}
    submit(store, reviewer, aid, {**form, "comment": comment})


def test_export_pairs_consensus_ties_and_agreement(tmp_path):
    store, _ = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1, k=3, reviewers=2)
    _review(store, 1, {"m0": 1, "m1": 2, "m2": 3}, comment="<b>m1 vs m2</b> was close")
    _review(store, 2, {"m0": 1, "m1": 3, "m2": 2})
    # Mean ranks 1, 2.5, 2.5: m0 beats both; m1 vs m2 is a tie and skipped.
    rows, _ = pairs(load(store), "all")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("answer 0 to question 0", "answer 1 to question 0"),
                                                             ("answer 0 to question 0", "answer 2 to question 0")]
    # Rank sums 2, 5, 5 (mean 4): S = 6, W = 12 * 6 / (4 * 24) = 0.75.
    assert {r["agreement"] for r in rows} == {0.75} and {r["n_reviewers"] for r in rows} == {2}
    assert rows[0]["prompt"] == [{"role": "user", "content": "Question 0?"}]
    assert len(pairs(load(store), "best-worst")[0]) == 2  # the best against both tied worst
    assert pairs(load(store), "all", min_reviewers=3) == ([], 0)
    n, _ = export(store, tmp_path / "prefs.jsonl", "all")
    lines = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert n == 2 and set(lines[0]) == {"id", "prompt", "chosen", "rejected", "agreement", "n_reviewers"}
    adapter = FORMATS["preferences"]  # what `tunelab dpo|reward data.format=preferences` reads
    assert all(adapter.problems(row) == [] for row in lines)
    assert adapter.convert(lines[0])["agreement"] == 0.75
    html, summary = write_report(store, tmp_path / "report")
    assert summary["items"][0]["comments"] == ["r0: <b>m1 vs m2</b> was close"]
    assert "r0: &lt;b&gt;m1 vs m2&lt;/b&gt; was close" in html.read_text()


def test_export_single_reviewer_and_all_tied(tmp_path):
    store, _ = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=2, k=2, per_item=1, reviewers=1)
    _review(store, 1, {"m0": 2, "m1": 1})
    _review(store, 1, {"m0": 1, "m1": 1})
    rows, _ = pairs(load(store), "best-worst")
    assert len(rows) == 1 and rows[0]["chosen"].startswith("answer 1") and rows[0]["agreement"] is None


def test_export_skips_empty_and_identical_answers(tmp_path):
    texts = {0: "same", 1: " same ", 2: ""}
    store, _ = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1, k=4, per_item=1, reviewers=1,
                            text=lambda i, j: texts.get(j, "a real answer"))
    _review(store, 1, {"m0": 1, "m1": 2, "m2": 3, "m3": 4})
    rows, skipped = pairs(load(store), "all")
    # 6 ordered pairs: m0>m1 identical, m0>m2 and m1>m2 and m2>m3 have an empty side.
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("same", "a real answer"), (" same ", "a real answer")]
    assert skipped == 4


def test_report_weighted_scores_win_rates_and_outlier(tmp_path):
    store, _ = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=4, k=2, per_item=4,
                            reviewers=4, kinds=("rubric", "rank"))
    good, bad = {"accuracy": 5, "coherence": 3, "safety": 1}, {"accuracy": 1, "coherence": 1, "safety": 1}
    for reviewer in (1, 2, 3):  # three reviewers agree: m0 is better everywhere
        for _ in range(8):
            kind = _kind_of_next(store, reviewer)
            _review(store, reviewer, {"m0": 1, "m1": 2} if kind == "rank" else {"m0": good, "m1": bad})
    for _ in range(8):  # the fourth says the opposite every time
        kind = _kind_of_next(store, 4)
        _review(store, 4, {"m0": 2, "m1": 1} if kind == "rank" else {"m0": bad, "m1": good})
    summary = summarise(load(store))
    m0, m1 = summary["models"]["m0"], summary["models"]["m1"]
    # m0 (3 of 4 reviewers): accuracy mean (5+5+5+1)/4 = 4, coherence 2.5, safety 1 -> normalised
    # 0.75, 0.375, 0 with weights 2, 1, 1 -> (1.5 + 0.375) / 4 = 0.46875.
    assert m0["weighted_score"] == pytest.approx(46.875)
    assert m0["criteria"]["accuracy"] == pytest.approx(4.0)
    assert m0["win_rate"] == pytest.approx(0.75) and m1["win_rate"] == pytest.approx(0.25)
    assert [r["name"] for r in summary["reviewers"] if r["flagged"]] == ["r3"]
    assert set(summary["reviewers"][3]["flagged"]) == {"rubric", "rank"}
    # Each rank item: rank sums 5 and 7 (mean 6), S = 2, W = 12 * 2 / (4^2 * (2^3 - 2)) = 0.25.
    assert summary["agreement"]["kendall_w"] == pytest.approx(0.25)
    html, _ = write_report(store, tmp_path / "report")
    text = html.read_text()
    assert "Krippendorff" in text and "data:image/png;base64," in text and "outlier: rubric, rank" in text
    assert math.isfinite(summary["agreement"]["rubric_alpha"]["accuracy"])


def _kind_of_next(store, reviewer: int) -> str:
    aid = assign.claim(store, reviewer)
    with store.read() as s:
        return s.get(Assignment, aid).item.kind
