"""The review web app over HTTP: against a live uvicorn server on 127.0.0.1 — tokens, escaping,
size limits, 50 concurrent reviewers losing no submission (SQLite and PostgreSQL) — and in
process (TestClient) — CSRF defences, id paths, progress, past reviews and edits, token reissue."""

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

from tests.review_support import (  # noqa: F401
    csrf_of, db_url, live_server, make_project, postgres_server, postgres_url,
)
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
def _client(url: str, token: str | None = None) -> Iterator[tuple[httpx.Client, str]]:
    """An HTTP client that sends the Origin a browser sends from the app's pages, signed in when
    given a token; yields it with its session's CSRF token ("" when not signed in)."""
    with httpx.Client(base_url=url, timeout=60, headers={"Origin": url}) as client:
        if not token:
            yield client, ""
            return
        login = csrf_of(client.get("/login").text)
        assert client.post("/login", data={"token": token, "csrf": login}).status_code == 303
        yield client, csrf_of(client.get("/").text)


def test_writes_need_a_valid_token(server):
    url, store, _ = server
    with _client(url) as (anon, _):
        assert anon.post("/next").status_code == 401
        assert anon.post("/assignments/1", data={"comment": "x"}).status_code == 401
        login = csrf_of(anon.get("/login").text)
        assert anon.post("/login", data={"token": "not-a-token", "csrf": login}).status_code == 401
        assert anon.get("/").headers["location"] == "/login"
        anon.cookies.set("tunelab_review", "forged")
        assert anon.post("/next").status_code == 401
    with store.read() as s:
        assert s.scalar(select(func.count(Assignment.id))) == 0


def test_output_text_is_escaped(server):
    url, _, tokens = server
    with _client(url, tokens["r1"]) as (c, csrf):
        page = c.get(c.post("/next", data={"csrf": csrf}).headers["location"])
        assert page.status_code == 200
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page.text
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self': no inline script runs


def test_size_limits_and_ownership(server):
    url, _, tokens = server
    with _client(url, tokens["r2"]) as (c, csrf), _client(url, tokens["r1"]) as (other, other_csrf):
        location = c.post("/next", data={"csrf": csrf}).headers["location"]
        assert c.post(location, content=b"comment=" + b"x" * (MAX_BODY + 1),
                      headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413
        page = c.get(location).text
        ranks = {name: str(i + 1) for i, name in enumerate(re.findall(r'name="(rank_\d+)"', page))}
        long_comment = c.post(location, data={**ranks, "comment": "y" * 2001, "csrf": csrf})
        assert long_comment.status_code == 400 and "Not saved: comment: at most 2000 characters" in long_comment.text
        assert 'value="1" selected' in long_comment.text  # the reviewer's choices are kept
        assert other.get(location).status_code == 404
        assert other.post(location, data={**ranks, "csrf": other_csrf}).status_code == 404
        assert c.post(location, data={**ranks, "csrf": csrf}).status_code == 303


def test_admin_view_is_for_admins(server):
    url, _, tokens = server
    with _client(url, tokens["r1"]) as (c, _):
        assert c.get("/admin").status_code == 403
    with _client(url, tokens["r0"]) as (admin, _):
        page = admin.get("/admin")
        assert page.status_code == 200 and 'data-reviewer="r2"' in page.text


def _reviewer(url: str, token: str, sent: dict, errors: list, rng: random.Random) -> None:
    """Review until the server has nothing left for this reviewer (at most 50 items)."""
    try:
        with _client(url, token) as (c, csrf):
            location = c.post("/next", data={"csrf": csrf}).headers["location"]
            for _ in range(50):
                if not location.startswith("/assignments/"):
                    return
                ids = re.findall(r'name="rank_(\d+)"', c.get(location).text)
                ranks = {int(i): rng.randint(1, len(ids)) for i in ids}
                response = c.post(location, data={**{f"rank_{i}": str(r) for i, r in ranks.items()}, "csrf": csrf})
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


# In-process tests (TestClient, no server): CSRF defences, id paths, the reviewer's own pages.
SAME = {"Origin": "http://testserver"}  # what a browser sends with a form from the app's own pages


def _app_client(store, token: str | None = None):
    """A TestClient that behaves like a browser on the app's own pages; signed in when given a token."""
    from fastapi.testclient import TestClient

    from tunelab.review.app import create_app

    client = TestClient(create_app(store), follow_redirects=False, raise_server_exceptions=False)
    if token:
        form = client.get("/login")
        assert client.post("/login", data={"token": token, "csrf": csrf_of(form.text)}, headers=SAME).status_code == 303
    return client


@pytest.fixture
def project(tmp_path):
    """2 items of 2 outputs, 2 reviewers each; reviewers r0 (admin), r1, r2."""
    return make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=2, k=2, per_item=2, reviewers=3)


def test_writes_need_this_sites_origin_and_the_forms_token(project):
    store, tokens = project
    victim, other = _app_client(store, tokens["r1"]), _app_client(store, tokens["r2"])
    good = csrf_of(victim.get("/").text)
    refused = [
        ({"Origin": "http://127.0.0.1:9999"}, good),  # a page on another port of the same host
        ({"Origin": "null"}, good),  # a sandboxed or no-referrer page
        ({"Referer": "http://127.0.0.1:9999/attack"}, good),
        ({}, good),  # neither header
        (SAME, ""),
        (SAME, "x" * 43),
        (SAME, csrf_of(other.get("/").text)),  # another reviewer's token
    ]
    for headers, token in refused:
        assert victim.post("/next", data={"csrf": token} if token else {}, headers=headers).status_code == 403, headers
        assert victim.post("/logout", data={"csrf": token}, headers=headers).status_code == 403
    with store.read() as s:
        assert s.scalar(select(func.count(Assignment.id))) == 0
    assert victim.post("/next", data={"csrf": good}, headers={"Referer": "http://testserver/"}).status_code == 303

    # Login CSRF: a form from elsewhere must not sign the browser in as someone else.
    anon = _app_client(store)
    login = csrf_of(anon.get("/login").text)
    for headers, token in [({"Origin": "http://127.0.0.1:9999"}, login), (SAME, ""), (SAME, good)]:
        assert anon.post("/login", data={"token": tokens["r2"], "csrf": token}, headers=headers).status_code == 403
        assert victim.post("/login", data={"token": tokens["r2"], "csrf": token}, headers=headers).status_code == 403
    assert "tunelab_review" not in anon.cookies
    assert "signed in as <b>r1</b>" in victim.get("/").text


def test_ids_out_of_range_or_not_numbers_are_not_found(project):
    store, tokens = project
    client = _app_client(store, tokens["r0"])
    token = csrf_of(client.get("/").text)
    for aid in ("99999999999999999999999", str(2 ** 63), "-1", "abc", "1e3"):
        assert client.get(f"/assignments/{aid}").status_code == 404, aid
        assert client.post(f"/assignments/{aid}", data={"csrf": token}, headers=SAME).status_code == 404, aid


def _submit(client, location: str, ranks: dict, **extra):
    page = client.get(location)
    return client.post(location, data={**ranks, **extra, "csrf": csrf_of(page.text)}, headers=SAME)


def test_progress_past_reviews_and_editing_until_the_item_closes(project):
    store, tokens = project
    r1 = _app_client(store, tokens["r1"])
    first = r1.post("/next", data={"csrf": csrf_of(r1.get("/").text)}, headers=SAME).headers["location"]
    page = r1.get(first).text
    assert "item 1 of 2" in page
    names = re.findall(r'name="(rank_\d+)"', page)
    mine = {names[0]: "1", names[1]: "2"}
    second = _submit(r1, first, mine).headers["location"]
    assert "item 2 of 2" in r1.get(second).text

    listed = r1.get("/reviews")
    assert listed.status_code == 200 and f'href="{first}"' in listed.text and f'href="{second}"' not in listed.text
    edit = r1.get(first).text
    assert f'name="{names[0]}"' in edit and re.search(r'value="1" selected', edit) and "Save changes" in edit
    changed = {names[0]: "2", names[1]: "1"}
    saved = _submit(r1, first, changed, comment="changed my mind")
    assert saved.status_code == 303 and saved.headers["location"].startswith("/reviews")
    aid = int(first.rsplit("/", 1)[1])
    with store.read() as s:
        assert {f"rank_{r.output_id}": str(r.rank) for r in s.scalars(select(Ranking).where(Ranking.assignment_id == aid))} == changed
        assert s.get(Assignment, aid).comment == "changed my mind"

    r2 = _app_client(store, tokens["r2"])  # r2 reviews both items: the first one now has its 2 reviews
    location = r2.post("/next", data={"csrf": csrf_of(r2.get("/").text)}, headers=SAME).headers["location"]
    while location.startswith("/assignments/"):
        location = _submit(r2, location, dict(zip(re.findall(r'name="(rank_\d+)"', r2.get(location).text), "12"))).headers["location"]
    assert r1.get(first).status_code == 409 and "closed" in r1.get(first).text
    assert _submit(r1, first, mine).status_code == 409
    listed = r1.get("/reviews").text
    assert f'href="{first}"' not in listed and re.search(rf'data-assignment="{aid}">.*?>closed<', listed, re.S)


def test_an_admin_reissues_a_lost_token(project):
    store, tokens = project
    admin, r1 = _app_client(store, tokens["r0"]), _app_client(store, tokens["r1"])
    refused = r1.post("/admin/token", data={"reviewer": "r2", "csrf": csrf_of(r1.get("/").text)}, headers=SAME)
    assert refused.status_code == 403
    form = admin.get("/admin").text
    assert 'action="/admin/token"' in form and 'name="reviewer" value="r1"' in form
    shown = admin.post("/admin/token", data={"reviewer": "r1", "csrf": csrf_of(form)}, headers=SAME)
    assert shown.status_code == 200 and shown.headers["cache-control"] == "no-store"
    new = re.search(r'<code id="new-token">([^<]+)</code>', shown.text).group(1)
    assert new != tokens["r1"]
    assert r1.get("/").status_code == 303  # the old token's session ended
    assert _app_client(store, new).get("/").status_code == 200
    stale = _app_client(store)
    login = csrf_of(stale.get("/login").text)
    assert stale.post("/login", data={"token": tokens["r1"], "csrf": login}, headers=SAME).status_code == 401
    assert _app_client(store, tokens["r2"]).get("/").status_code == 200  # nobody else's
