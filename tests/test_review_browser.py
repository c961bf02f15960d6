"""The review app in a real browser (Debian's Chromium, headless, driven by Playwright): sign in,
rank and score a rubric with the keyboard shortcuts, watch the admin progress view change, and
forms from another port of the same host change nothing; give thumbs up/down with the keyboard."""

from __future__ import annotations

import html
import os
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from tests.review_support import live_server, make_project
from tunelab.review.store import Ranking, Rating, Score

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: run scripts/system-deps.sh as root")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Debian's Chromium: Playwright's own browser download needs a host this project cannot reach.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _sign_in(browser, url: str, token: str):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{url}/")
    assert page.url.endswith("/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")
    return page, errors


def _admin_done(admin, url: str) -> tuple[str, list[str]]:
    admin.goto(f"{url}/admin")
    return (admin.inner_text('tr[data-reviewer="r1"] td.done'),
            [admin.inner_text(f"tr[data-item] td.done >> nth={i}") for i in range(2)])


def _rank_with_keys(page) -> dict[str, str]:
    """C best, then A tied with B, typed as C, A, =, B; returns label -> rank as the form holds it."""
    for key in ("c", "a", "=", "b"):
        page.keyboard.press(key)
    assert page.inner_text("#order").startswith("Order: C > A = B")
    ranks = {s.get_attribute("data-label"): s.input_value() for s in page.query_selector_all("select[data-label]")}
    assert ranks == {"A": "2", "B": "2", "C": "1"}
    with page.expect_navigation():
        page.keyboard.press("Enter")
    return {s: r for s, r in ranks.items()}


def _score_rubric(page) -> None:
    """Score every output with the keyboard: accuracy 5, coherence 4, safety 3 (a digit scores the
    highlighted row and moves on), then Enter."""
    outputs = len(page.query_selector_all(".card"))
    for key in "543" * outputs:
        page.keyboard.press(key)
    checked = [r.get_attribute("value") for r in page.query_selector_all("input[type=radio]:checked")]
    assert checked == list("543" * outputs)
    with page.expect_navigation():
        page.keyboard.press("Enter")


def test_sign_in_rank_score_and_admin_progress(browser, tmp_path):
    store, tokens = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1, k=3, per_item=1,
                                 reviewers=2, kinds=("rank", "rubric"))
    with live_server(store) as url:
        admin, admin_errors = _sign_in(browser, url, tokens["r0"])
        assert _admin_done(admin, url) == ("0", ["0/1", "0/1"])

        page, errors = _sign_in(browser, url, tokens["r1"])
        page.click("#next")
        page.wait_for_url("**/assignments/*")
        labels = {}
        for step in (1, 2):
            if page.query_selector('form[data-kind="rank"]'):
                labels = {s.get_attribute("data-label"): int(s.get_attribute("name")[5:])
                          for s in page.query_selector_all("select[data-label]")}
                _rank_with_keys(page)
            else:
                _score_rubric(page)
            assert _admin_done(admin, url)[0] == str(step)
        assert "Nothing left for you" in page.inner_text("#notice")
        assert _admin_done(admin, url) == ("2", ["1/1", "1/1"])
        assert not errors and not admin_errors

    with store.read() as s:
        ranks = {r.output_id: r.rank for r in s.scalars(select(Ranking))}
        scores = {(sc.output_id, sc.criterion_id): sc.score for sc in s.scalars(select(Score))}
    assert ranks == {labels["A"]: 2, labels["B"]: 2, labels["C"]: 1}
    assert len(scores) == 3 * 3 and {v for (_, c), v in scores.items() if c == 1} == {5}


@contextmanager
def _attacker_site(pages: dict[str, str]):
    """Another origin of the same site: a plain HTTP server on another port of 127.0.0.1."""

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def _auto_submit(action: str, fields: dict[str, str]) -> str:
    inputs = "".join(f'<input name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in fields.items())
    return f'<form method="post" action="{action}">{inputs}</form><script>document.forms[0].submit()</script>'


def open_attacks(page, url: str, attacks: dict[str, str]) -> None:
    """Open each attacker page (path → HTML, served on another port) in the signed-in tab, and wait
    until its form has posted to the app at `url` and the answer has loaded."""
    with _attacker_site(attacks) as evil:
        for path in attacks:
            page.goto(evil + path, wait_until="commit")
            page.wait_for_url(f"{url}/**")
            page.wait_for_load_state()


def test_forms_from_another_port_change_nothing(browser, tmp_path):
    """The probe's attacks: a page on another port of 127.0.0.1 auto-submits a review into the
    signed-in reviewer's session, then signs the browser in as another reviewer (login CSRF)."""
    store, tokens = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1, k=3, per_item=1, reviewers=3)
    with live_server(store) as url:
        page, errors = _sign_in(browser, url, tokens["r1"])
        page.click("#next")
        page.wait_for_url("**/assignments/*")
        target = page.url
        forged = {s.get_attribute("name"): "1" for s in page.query_selector_all("select[data-label]")}
        attacks = {"/review": _auto_submit(target, forged), "/login": _auto_submit(f"{url}/login", {"token": tokens["r2"]})}
        open_attacks(page, url, attacks)
        with store.read() as s:
            assert s.scalars(select(Ranking)).all() == []
        page.goto(target)
        assert "signed in as r1" in page.inner_text("header")
        _rank_with_keys(page)  # the reviewer's own form still goes through
        assert not errors
    with store.read() as s:
        assert len(s.scalars(select(Ranking)).all()) == 3


def test_thumbs_with_the_keyboard(browser, tmp_path):
    """A rate item: Y / N mark the highlighted answer and move on, ↑ goes back to change one, Enter saves."""
    store, tokens = make_project(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, items=1, k=3, per_item=1,
                                 reviewers=2, kinds=("rate",))
    with live_server(store) as url:
        page, errors = _sign_in(browser, url, tokens["r1"])
        page.click("#next")
        page.wait_for_url("**/assignments/*")
        for key in ("y", "n", "-", "ArrowUp", "+"):  # A up, B down, C down (the cursor stays on the last), ↑ to B: up
            page.keyboard.press(key)
        by_label = {c.get_attribute("data-label"): c.query_selector("input:checked").get_attribute("value")
                    for c in page.query_selector_all(".rate-card")}
        assert by_label == {"A": "up", "B": "up", "C": "down"}
        names = {c.get_attribute("data-label"): int(c.query_selector("input").get_attribute("name")[5:])
                 for c in page.query_selector_all(".rate-card")}
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert "Nothing left for you" in page.inner_text("#notice") and not errors
    with store.read() as s:
        saved = {r.output_id: r.up for r in s.scalars(select(Rating))}
    assert saved == {names["A"]: True, names["B"]: True, names["C"]: False}
