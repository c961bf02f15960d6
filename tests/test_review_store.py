"""Review project setup, assignment and submission, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from tests.review_support import (  # noqa: F401
    db_url, import_rows, make_project, postgres_server, postgres_url, rank_form, write_jsonl,
)
from tunelab.errors import TunelabError
from tunelab.review import assign, project
from tunelab.review.store import Assignment, Item, Ranking, Reviewer, Score, Store, hash_token
from tunelab.review.submit import SubmissionError, labels_for, submit


def test_tokens_are_stored_hashed_only(tmp_path):
    store, tokens = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1)
    raw = (tmp_path / "r.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("r.db-*"))
    assert tokens["r0"].encode() not in raw
    with store.read() as s:
        assert s.scalar(select(func.count(Reviewer.id))) == 2
    with pytest.raises(TunelabError, match="already exists"):
        project.add_reviewer(store, "r0")


def test_import_names_file_line_and_field(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    project.init(store, project.DEFAULT_RUBRIC, 2)
    good = import_rows(1)[0]
    bad = dict(good, outputs=[{"model": "m", "text": "x" * 60_000}])
    with pytest.raises(TunelabError, match=r"bad.jsonl:2: field 'outputs.0.text'.*at most 50000"):
        project.import_files(store, [write_jsonl(tmp_path / "bad.jsonl", [good, bad])], ["rank"])
    both = dict(good, prompt="hi")
    with pytest.raises(TunelabError, match=r"both.jsonl:1: .*exactly one of `prompt`"):
        project.import_files(store, [write_jsonl(tmp_path / "both.jsonl", [both])], ["rank"])
    one = dict(good, outputs=good["outputs"][:1])
    with pytest.raises(TunelabError, match="rank items need at least 2 outputs"):
        project.import_files(store, [write_jsonl(tmp_path / "one.jsonl", [one])], ["rank"])
    with store.read() as s:
        assert s.scalar(select(func.count(Item.id))) == 0  # nothing half-imported


def test_import_prompt_text_and_skip_existing(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    project.init(store, project.DEFAULT_RUBRIC, 2)
    row = {"id": 7, "prompt": "Say hi", "reference": None, "outputs": [{"model": "a", "text": "hi"}, {"model": "b", "text": "yo"}]}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    assert project.import_files(store, [path], ["rank", "rubric"]) == (2, 0)
    assert project.import_files(store, [path], ["rank"]) == (0, 1)
    with store.read() as s:
        item = s.scalar(select(Item).where(Item.kind == "rank"))
        assert (item.external_id, item.prompt, item.needed) == ("7", [{"role": "user", "content": "Say hi"}], 2)
        assert [o.model for o in item.outputs] == ["a", "b"]


def test_rubric_file_is_validated(tmp_path):
    path = tmp_path / "rubric.yaml"
    path.write_text("criteria:\n  - name: helpful\n    scale: [0, 3]\n    levels: {5: great}\n")
    with pytest.raises(TunelabError, match=r"rubric.yaml: .*levels \[5\] are outside the scale \[0, 3\]"):
        project.load_rubric(path)
    path.write_text("criteria:\n  - name: helpful\n    weight: 2\n    scale: [0, 3]\n    levels: {0: useless, 3: great}\n")
    assert project.load_rubric(path).criteria[0].levels == {0: "useless", 3: "great"}


def test_each_item_goes_to_n_distinct_reviewers(db_url, tmp_path):
    store, _ = make_project(db_url, tmp_path, items=5, per_item=3, reviewers=4)
    with store.read() as s:
        ids = dict(s.execute(select(Reviewer.name, Reviewer.id)).all())
    rng = random.Random(0)
    seen = {rid: [] for rid in ids.values()}
    for _ in range(40):  # reviewers ask in turn until nothing is left for anybody
        progressed = False
        for rid in ids.values():
            aid = assign.claim(store, rid, rng)
            if aid is None:
                continue
            assert assign.claim(store, rid, rng) == aid  # the open one comes back until submitted
            submit(store, rid, aid, rank_form(store, aid))
            with store.read() as s:
                seen[rid].append(s.get(Assignment, aid).item_id)
            progressed = True
        if not progressed:
            break
    for items in seen.values():
        assert len(items) == len(set(items))  # never the same item twice to one reviewer
    with store.read() as s:
        per_item = s.execute(select(Assignment.item_id, func.count(func.distinct(Assignment.reviewer_id)))
                             .group_by(Assignment.item_id)).all()
    assert sorted(n for _, n in per_item) == [3] * 5
    assert sum(map(len, seen.values())) == 15


def test_fewer_reviewers_than_needed(tmp_path):
    store, tokens = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=2, per_item=3, reviewers=2)
    for rid in (1, 2):
        while (aid := assign.claim(store, rid)) is not None:
            submit(store, rid, aid, rank_form(store, aid))
    with store.read() as s:
        assert s.scalar(select(func.count(Assignment.id))) == 4  # each item got both, neither twice


def test_submission_is_validated_whole(db_url, tmp_path):
    store, _ = make_project(db_url, tmp_path, items=1, kinds=("rubric",))
    aid = assign.claim(store, 1)
    with store.read() as s:
        a = s.get(Assignment, aid)
        labels = labels_for(a)
        outputs = list(a.item.outputs)
    form = {f"score_{o.id}_{c}": "4" for o in outputs for c in (1, 2, 3)}
    bad = dict(form, **{f"score_{outputs[-1].id}_3": "9"})
    with pytest.raises(SubmissionError, match=f"safety of output {labels[outputs[-1].id]}: 9 is outside 1..5"):
        submit(store, 1, aid, bad)
    with pytest.raises(SubmissionError, match="missing"):
        submit(store, 1, aid, {k: v for k, v in form.items() if not k.endswith("_2")})
    with pytest.raises(SubmissionError, match="is not yours"):
        submit(store, 2, aid, form)
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Score)) == 0
    submit(store, 1, aid, dict(form, comment="fine"))
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Score)) == 3 * 3
        assert s.get(Assignment, aid).comment == "fine"


def _ranks(store, aid) -> dict[str, str]:
    """The stored ranking of an assignment, in the shape of its form."""
    with store.read() as s:
        return {f"rank_{r.output_id}": str(r.rank) for r in s.scalars(select(Ranking).where(Ranking.assignment_id == aid))}


def test_a_review_can_be_edited_until_its_item_closes(db_url, tmp_path):
    """An item closes when it has all its reviews (item.needed done); until then a reviewer's
    new submission replaces their old one, and the agreement statistics see only the new one."""
    from tunelab.review import aggregate, report

    store, _ = make_project(db_url, tmp_path, items=1, k=3, per_item=2, reviewers=2)
    first = assign.claim(store, 1)
    assert submit(store, 1, first, rank_form(store, first, [1, 2, 3])) is False
    second = assign.claim(store, 2)
    reversed_form = rank_form(store, first, [3, 2, 1])
    assert submit(store, 1, first, {**reversed_form, "comment": "reversed"}) is True
    assert _ranks(store, first) == reversed_form
    with store.read() as s:
        assert s.get(Assignment, first).comment == "reversed"
    submit(store, 2, second, rank_form(store, second, [3, 2, 1]))  # the item's last review: it closes
    assert report.summarise(aggregate.load(store))["items"][0]["agreement"] == 1.0  # W of the edited ranks
    with pytest.raises(SubmissionError, match="closed"):
        submit(store, 1, first, rank_form(store, first, [1, 2, 3]))
    assert _ranks(store, first) == reversed_form


def test_a_failure_mid_submission_saves_nothing(tmp_path, monkeypatch):
    """The rows are flushed before the assignment is marked done; a failure there rolls all
    back, for a first submission and for an edit (the old rows stay)."""
    from tunelab.review import submit as submit_module

    store, _ = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=2)
    aid, edited = assign.claim(store, 1), assign.claim(store, 2)
    kept = rank_form(store, edited, [1, 2, 3])
    submit(store, 2, edited, kept)

    def boom(*_):
        raise RuntimeError("crash after the rankings were written")

    monkeypatch.setattr(submit_module, "_mark_done", boom)
    with pytest.raises(RuntimeError):
        submit(store, 1, aid, rank_form(store, aid))
    with pytest.raises(RuntimeError):
        submit(store, 2, edited, rank_form(store, edited, [3, 2, 1]))
    with store.read() as s:
        assert not s.get(Assignment, aid).done
    assert _ranks(store, aid) == {} and _ranks(store, edited) == kept


def test_reissue_token_replaces_the_old_one(tmp_path):
    store, tokens = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1)
    new = project.reissue_token(store, "r1")
    with store.read() as s:
        hashes = dict(s.execute(select(Reviewer.name, Reviewer.token_hash)).all())
    assert hashes["r1"] == hash_token(new) and new != tokens["r1"]
    assert hash_token(tokens["r1"]) not in hashes.values() and hashes["r0"] == hash_token(tokens["r0"])
    with pytest.raises(TunelabError, match=r"no reviewer named 'r1x'; did you mean 'r1'"):
        project.reissue_token(store, "r1x")


def test_uninitialised_database_says_how_to_fix(tmp_path):
    with pytest.raises(TunelabError, match="no such file; run `tunelab review init"):
        Store(str(tmp_path / "none.db")).check()
    assert not (tmp_path / "none.db").exists()  # checking did not create it
    (tmp_path / "empty.db").touch()
    with pytest.raises(TunelabError, match="not a review project yet; run `tunelab review init"):
        Store(str(tmp_path / "empty.db")).check()


def test_sqlite_runs_in_wal_mode(tmp_path):
    store, _ = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1)
    with store.read() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_an_abandoned_claim_goes_back_to_the_pool(tmp_path):
    store, _ = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1, per_item=1)
    first = assign.claim(store, 1)
    assert assign.claim(store, 2) is None  # the only slot is taken

    def backdate(s):
        s.get(Assignment, first).created_at -= assign.ABANDONED_AFTER + timedelta(minutes=1)

    store.write(backdate)
    second = assign.claim(store, 2)
    assert second is not None
    with pytest.raises(SubmissionError, match="is not yours"):
        submit(store, 1, first, rank_form(store, first))
    submit(store, 2, second, rank_form(store, second))
