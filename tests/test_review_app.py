"""The review web app over HTTP against a live uvicorn server on 127.0.0.1: tokens, escaping,
size limits, and 50 concurrent reviewers losing no submission (SQLite and PostgreSQL)."""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import func, select

from tests.review_support import db_url, live_server, make_project, postgres_server, postgres_url  # noqa: F401
from tunelab.review.store import MAX_BODY, Assignment, Ranking

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    store, tokens = make_project(f"sqlite:///{tmp / 'r.db'}", tmp, items=3, k=2, per_item=2, reviewers=3,
                                 text=lambda i, j: XSS if j == 0 else f"plain answer {i}")
    with live_server(store) as url:
        yield url, store, tokens


@contextmanager
def _client(url: str, token: str | None = None) -> Iterator[httpx.Client]:
    """An HTTP client, signed in when given a token."""
    with httpx.Client(base_url=url, timeout=60) as client:
        if token:
            assert client.post("/login", data={"token": token}).status_code == 303
        yield client


def test_writes_need_a_valid_token(server):
    url, store, _ = server
    with _client(url) as anon:
        assert anon.post("/next").status_code == 401
        assert anon.post("/assignments/1", data={"comment": "x"}).status_code == 401
        assert anon.post("/login", data={"token": "not-a-token"}).status_code == 401
        assert anon.get("/").headers["location"] == "/login"
        anon.cookies.set("tunelab_review", "forged")
        assert anon.post("/next").status_code == 401
    with store.read() as s:
        assert s.scalar(select(func.count(Assignment.id))) == 0


def test_output_text_is_escaped(server):
    url, _, tokens = server
    with _client(url, tokens["r1"]) as c:
        page = c.get(c.post("/next").headers["location"])
        assert page.status_code == 200
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page.text
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self': no inline script runs


def test_size_limits_and_ownership(server):
    url, _, tokens = server
    with _client(url, tokens["r2"]) as c, _client(url, tokens["r1"]) as other:
        location = c.post("/next").headers["location"]
        assert c.post(location, content=b"comment=" + b"x" * (MAX_BODY + 1),
                      headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413
        page = c.get(location).text
        ranks = {name: str(i + 1) for i, name in enumerate(re.findall(r'name="(rank_\d+)"', page))}
        long_comment = c.post(location, data={**ranks, "comment": "y" * 2001})
        assert long_comment.status_code == 400 and "Not saved: comment: at most 2000 characters" in long_comment.text
        assert 'value="1" selected' in long_comment.text  # the reviewer's choices are kept
        assert other.get(location).status_code == 404
        assert other.post(location, data=ranks).status_code == 404
        assert c.post(location, data=ranks).status_code == 303


def test_admin_view_is_for_admins(server):
    url, _, tokens = server
    with _client(url, tokens["r1"]) as c:
        assert c.get("/admin").status_code == 403
    with _client(url, tokens["r0"]) as admin:
        page = admin.get("/admin")
        assert page.status_code == 200 and 'data-reviewer="r2"' in page.text


def _reviewer(url: str, token: str, sent: dict, errors: list, rng: random.Random) -> None:
    """Review until the server has nothing left for this reviewer (at most 50 items)."""
    try:
        with _client(url, token) as c:
            location = c.post("/next").headers["location"]
            for _ in range(50):
                if not location.startswith("/assignments/"):
                    return
                ids = re.findall(r'name="rank_(\d+)"', c.get(location).text)
                ranks = {int(i): rng.randint(1, len(ids)) for i in ids}
                response = c.post(location, data={f"rank_{i}": str(r) for i, r in ranks.items()})
                assert response.status_code == 303, response.text[:300]
                sent[int(location.rsplit("/", 1)[1])] = ranks
                location = response.headers["location"]
            errors.append(f"{token[:4]}: did not finish")
    except Exception as err:  # reported by the test, not lost in the thread
        errors.append(repr(err))


def test_fifty_concurrent_reviewers_lose_nothing(db_url, tmp_path):
    reviewers, items, per_item = 50, 30, 4
    store, tokens = make_project(db_url, tmp_path, items=items, k=3, per_item=per_item, reviewers=reviewers)
    sent: dict[int, dict[int, int]] = {}
    errors: list[str] = []
    with live_server(store) as url:
        threads = [threading.Thread(target=_reviewer, args=(url, t, sent, errors, random.Random(i)))
                   for i, t in enumerate(tokens.values())]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(sent) == items * per_item
    with store.read() as s:
        done = s.scalars(select(Assignment).where(Assignment.done.is_(True))).all()
        saved = {}
        for r in s.scalars(select(Ranking)):
            saved.setdefault(r.assignment_id, {})[r.output_id] = r.rank
        pending = s.scalar(select(func.count(Assignment.id)).where(Assignment.done.is_(False)))
    assert saved == sent  # every accepted submission is stored exactly as sent
    assert len(done) == items * per_item and pending == 0
    assert Counter(a.item_id for a in done) == {i: per_item for i in range(1, items + 1)}
    assert len({(a.item_id, a.reviewer_id) for a in done}) == len(done)
