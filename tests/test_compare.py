"""`tunelab compare` on run and eval folders fabricated the way training and eval write them."""

from __future__ import annotations

import json
import re

import pytest

from tests.run_folders import make_eval, make_run
from tunelab.errors import TunelabError
from tunelab.evals.stats import mean_interval
from tunelab.tracking import compare


def test_compare_two_runs_and_an_eval(tmp_path):
    a = make_run(tmp_path, "r8", r=8, right=4)
    b = make_run(tmp_path, "r16", r=16, right=10)
    ev = make_eval(tmp_path, "ev", right=9)
    result = compare.write([a, b, ev], tmp_path / "cmp")
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["pairs"] == json.loads(json.dumps(result["pairs"]))

    # The config keys that differ between the runs (the eval's keys are not a difference).
    assert list(result["config_diff"]) == ["run.name", "peft.r", "peft.alpha"]
    assert result["config_diff"]["peft.r"]["values"] == [8, 16, None]
    # r16 − r8 on the same 12 rows: 6 rows go 0 → 1 in exact match, none the other way.
    (pair,) = result["pairs"]
    assert (pair["a"], pair["b"], pair["task"], pair["n"]) == ("r8", "r16", "validation", 12)
    em = pair["metrics"]["exact_match"]
    assert em["diff"] == pytest.approx(0.5) and em["p_value"] == pytest.approx(2 / 2**6)
    assert em["ci95"] == mean_interval([0] * 4 + [1] * 6 + [0] * 2)
    assert pair["means"]["exact_match"] == pytest.approx([4 / 12, 10 / 12])
    assert [r["prompt"] for r in pair["rows"]] == [f"<|user|>Plan meetup {i} & tell me</s>" for i in range(4, 9)]
    # Each folder's own numbers get their intervals: the run's after-training exact match, the eval's target.
    assert result["results"]["r16"]["ci95"]["after"]["exact_match"][1] <= 1.0
    assert result["results"]["ev"]["comparison"]["rouge"]["exact_match"]["diff"] == pytest.approx(0.75)

    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html) and "<script" not in html and "<link" not in html
    assert html.count('src="data:image/png;base64,') == 3  # training loss, validation loss, validation rouge_l
    assert "&lt;home&gt;" in html and "&lt;|user|&gt;Plan meetup 4 &amp; tell me" in html  # outputs as text
    assert "<th>peft.r</th>" in html and "r16 − r8 · validation · 12 rows" in html
    assert "+0.5 [+0.25, +0.75] p=0.031 (better)" in html
    assert "+0.75 [" in html  # the eval's target − baseline

    table = compare.format_pairs(result).splitlines()
    assert [c.strip() for c in table[2].split("|")] == [
        "r16 − r8, validation (12)", "exact_match", "0.3333", "0.8333", "+0.5 [+0.25, +0.75] p=0.031 (better)"]


def test_compare_refuses_what_it_cannot_read(tmp_path):
    run = make_run(tmp_path, "r8", r=8, right=4)
    with pytest.raises(TunelabError, match="at least two"):
        compare.write([run], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="empty is neither a run folder"):
        compare.write([run, tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_a_run_still_training_has_curves_and_no_pairs(tmp_path):
    done = make_run(tmp_path / "a", "run", r=8, right=4)
    live = make_run(tmp_path / "b", "run", r=16, right=0, finished=False)
    result, figures = compare.build([done, live])
    assert [f["name"] for f in result["folders"]] == ["a/run", "b/run"]  # same folder names: told apart by path
    assert [f["status"] for f in result["folders"]] == ["finished", "interrupted"]  # no status.json, no summary
    assert result["pairs"] == [] and len(figures) == 3
    assert compare.format_pairs(result).startswith("no two folders answered the same rows")


def test_folders_written_with_the_old_metric_names_read_with_the_new(tmp_path):
    from tunelab.tracking.compare import read_run
    from tunelab.tracking.metrics import write_json

    run = make_run(tmp_path, "old", r=8, right=6)
    summary = json.loads((run / "summary.json").read_text())
    summary["eval"]["after"]["rouge1"] = summary["eval"]["after"]["rougeLsum"] = 0.5  # as tunelab wrote them before
    write_json(run / "summary.json", summary)
    folder = read_run(run, "old")
    assert folder.results["after"]["rouge_1"] == folder.results["after"]["rouge_lsum"] == 0.5
    assert "rouge1" not in folder.results["after"]
