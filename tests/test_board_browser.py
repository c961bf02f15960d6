"""The board in a real browser (Debian's Chromium, headless, via Playwright): the runs list, a run page
whose curve gains a point when the run appends to metrics.jsonl, and the compare view of two runs."""

from __future__ import annotations

import os

import pytest

from tests.review_support import live_server
from tests.run_folders import make_run
from tests.test_review_browser import CHROMIUM, browser  # noqa: F401  (the module-scoped browser fixture)
from tunelab.board import app as board_app
from tunelab.tracking.metrics import append_jsonl
from tunelab.tracking.status import write_status

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: run scripts/system-deps.sh as root")


@pytest.fixture
def board_url(tmp_path, monkeypatch):
    make_run(tmp_path, "r8", r=8, right=4)
    make_run(tmp_path, "r16", r=16, right=10)
    write_status(make_run(tmp_path, "live", r=4, right=0, finished=False), "running", step=6)
    monkeypatch.setattr(board_app, "POLL_MS", 200)
    # live_server serves tunelab.review.app.create_app(store); hand it the board instead.
    monkeypatch.setattr("tunelab.review.app.create_app", lambda _store: board_app.create_app(tmp_path))
    with live_server(None) as url:
        yield url, tmp_path


def test_runs_list_live_curve_and_compare(browser, board_url):  # noqa: F811
    url, root = board_url
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)  # CSP refusals

    page.goto(f"{url}/")
    assert page.inner_text('tr[data-run="live"] td.state') == "running"
    assert page.inner_text('tr[data-run="r16"] td.state') == "finished"

    page.click('tr[data-run="live"] a')
    page.wait_for_url(f"{url}/runs/live")
    loss = '.chart[data-key="loss"] svg'
    page.wait_for_selector(loss)
    assert page.get_attribute(loss, "data-points") == "6"
    append_jsonl(root / "live" / "metrics.jsonl", {"step": 7, "loss": 0.2})
    page.wait_for_selector(f'{loss}[data-points="7"]', timeout=10000)  # polled every 0.2 s
    assert page.inner_text("#step") == "7" and page.inner_text("#state") == "running"

    page.goto(f"{url}/")
    page.check('input[value="r8"]')
    page.check('input[value="r16"]')
    with page.expect_navigation():
        page.click("#compare")
    assert "r8 − r16 · validation · 12 rows" in page.inner_text("#paired")  # the list is newest first: r16 is the reference
    assert page.locator("#curves img").count() == 3
    assert not errors, errors
