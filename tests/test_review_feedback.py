"""The review app's feedback beyond pairs: `rate` items (thumbs up/down) saved, edited and reported;
`review export --as ratings` (majority thumbs, rubric scores against a threshold) and the uncertainty
that `add-task --select` ranks candidates by."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from tests.review_support import csrf_of, import_rows, make_project, write_jsonl
from tests.test_review_app import SAME, _app_client
from tunelab.cli import main
from tunelab.review import aggregate, assign, report
from tunelab.review.select import choose, uncertainty
from tunelab.review.store import Assignment, Rating, Store
from tunelab.review.submit import SubmissionError, form_values, submit


def _thumbs(store, aid: int, ups: list[bool]) -> dict:
    with store.read() as s:
        outputs = s.get(Assignment, aid).item.outputs
    return {f"rate_{o.id}": "up" if up else "down" for o, up in zip(outputs, ups)}


def test_thumbs_are_saved_whole_and_can_be_changed(tmp_path):
    store, _ = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1, k=3, per_item=2, kinds=("rate",))
    aid = assign.claim(store, 1)
    form = _thumbs(store, aid, [True, False, True])
    with pytest.raises(SubmissionError, match="missing; give every output a thumbs up or down"):
        submit(store, 1, aid, {k: v for k, v in list(form.items())[:2]})
    with pytest.raises(SubmissionError, match="'sideways' is not up or down"):
        submit(store, 1, aid, {**form, next(iter(form)): "sideways"})
    with store.read() as s:
        assert s.scalars(select(Rating)).all() == []  # nothing of a refused form is kept
    assert submit(store, 1, aid, form) is False
    with store.read() as s:
        assert form_values(s, s.get(Assignment, aid)) == {**form, "comment": ""}
    assert submit(store, 1, aid, _thumbs(store, aid, [False, False, True])) is True  # an edit, item still open
    with store.read() as s:
        assert sorted(r.up for r in s.scalars(select(Rating))) == [False, False, True]


def test_rate_page_posts_thumbs(tmp_path):
    store, tokens = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1, k=2, per_item=1, kinds=("rate",))
    with _app_client(store, tokens["r1"]) as c:
        location = c.post("/next", data={"csrf": csrf_of(c.get("/").text)}, headers=SAME).headers["location"]
        page = c.get(location).text
        assert 'data-kind="rate"' in page and page.count('value="up"') == 2
        aid = int(location.rsplit("/", 1)[1])
        saved = c.post(location, data={**_thumbs(store, aid, [True, False]), "csrf": csrf_of(page)}, headers=SAME)
        assert saved.status_code == 303
    with store.read() as s:
        assert len(s.scalars(select(Rating)).all()) == 2


def test_ratings_export_and_report(tmp_path, capsys):
    """Rate items by majority (an even split skipped), rubric items by their weighted score against
    --threshold; the report's thumbs-up share per model."""
    db = f"sqlite:///{tmp_path / 'r.db'}"
    store, _ = make_project(db, tmp_path, items=2, k=2, per_item=2, kinds=("rate", "rubric"), reviewers=3)
    votes = {1: [True, True], 2: [True, False]}  # reviewer -> thumbs for outputs m0, m1 (item order)
    for reviewer in (1, 2):
        while (aid := assign.claim(store, reviewer)) is not None:
            with store.read() as s:
                a = s.get(Assignment, aid)
                kind, outputs = a.item.kind, a.item.outputs
            if kind == "rate":
                form = {f"rate_{o.id}": "up" if votes[reviewer][o.position] else "down" for o in outputs}
            else:  # rubric: m0 scores 5 everywhere (100/100), m1 scores 2 (25/100)
                form = {f"score_{o.id}_{c}": "5" if o.position == 0 else "2" for o in outputs for c in (1, 2, 3)}
            submit(store, reviewer, aid, form)
    out = tmp_path / "ratings.jsonl"
    assert main(["review", "export", "--db", db, "--as", "ratings", "--to", str(out), "--threshold", "50"]) == 0
    assert "wrote 6 rated answers" in (printed := capsys.readouterr().out) and "2 skipped: an even split" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rate = [r for r in rows if r["source"] == "rate"]
    rubric = [r for r in rows if r["source"] == "rubric"]
    assert [(r["model"], r["label"], r["agreement"]) for r in rate] == [("m0", True, 1.0), ("m0", True, 1.0)]  # m1 split 1:1
    assert sorted((r["model"], r["label"]) for r in rubric) == [("m0", True), ("m0", True), ("m1", False), ("m1", False)]
    assert rate[0]["completion"] == "answer 0 to question 0" and rate[0]["prompt"][0]["role"] == "user"
    summary = report.summarise(aggregate.load(store))
    assert summary["models"]["m0"]["thumbs_up"] == 1.0 and summary["models"]["m1"]["thumbs_up"] == 0.5
    rate_item = next(i for i in summary["items"] if i["kind"] == "rate")
    assert [o["score"] for o in rate_item["outputs"]] == [1.0, 0.5]
    assert summary["agreement"]["thumbs_alpha"] is not None


def test_export_says_what_it_skipped(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    store, _ = make_project(db, tmp_path, items=1, k=2, per_item=2, kinds=("rate",), reviewers=3)
    for reviewer, ups in ((1, [True, True]), (2, [True, False])):
        submit(store, reviewer, assign.claim(store, reviewer), _thumbs(store, assign.claim(store, reviewer), ups))
    assert main(["review", "export", "--db", db, "--as", "ratings", "--to", str(tmp_path / "x.jsonl")]) == 0
    assert "wrote 1 rated answers" in (out := capsys.readouterr().out) and "1 skipped: an even split of thumbs" in out
    assert main(["review", "export", "--db", db, "--as", "ratings", "--to", str(tmp_path / "x.jsonl"),
                 "--threshold", "101"]) == 2


def test_uncertainty_and_committee_disagreement():
    assert uncertainty([[0.0, 0.0, 0.0]]) == pytest.approx(1.0)  # one model, every output alike: unsure
    assert uncertainty([[10.0, 0.0, -10.0]]) < 0.01  # far apart: sure of the order
    assert uncertainty([[1.0, 0.0], [1.0, 0.0]]) == pytest.approx(0.0)  # a committee that agrees
    assert uncertainty([[20.0, 0.0], [0.0, 20.0]]) == pytest.approx(1.0)  # confident, opposite camps
    scores = [[[5.0, 0.0]], [[0.1, 0.0]], [[2.0, 0.0]], [[0.0, 0.0]]]
    assert choose(scores, 2) == [3, 1]  # most uncertain first
    assert choose(scores, 2, "random", seed=1) == choose(scores, 2, "random", seed=1)
    assert len(choose(scores, 10, "random")) == 4


def test_random_selection_queues_a_budget_of_new_items(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["review", "init", "--db", db]) == 0
    path = write_jsonl(tmp_path / "import.jsonl", import_rows(6, k=2))
    assert main(["review", "add-task", "--import", str(path), "--db", db, "--select", "random", "--budget", "4",
                 "--kind", "all"]) == 0
    assert "4 of 6 new candidates chosen (random)" in capsys.readouterr().out
    assert main(["review", "add-task", "--import", str(path), "--db", db, "--select", "random", "--budget", "4",
                 "--kind", "all"]) == 0
    assert "2 of 2 new candidates chosen" in capsys.readouterr().out  # those already queued are not candidates
    with Store(db).read() as s:
        assert {a.item.kind for a in s.scalars(select(Assignment))} <= {"rank", "rubric", "rate"}
    assert main(["review", "add-task", "--import", str(path), "--db", db, "--budget", "4"]) == 2
    assert "--select and --budget go together" in capsys.readouterr().err
