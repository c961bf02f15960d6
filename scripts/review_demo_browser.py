"""Stand-in reviewers for scripts/review_demo.sh: each signs in to the running review app in
headless Chromium and works through its items with the keyboard shortcuts (rank) and the radio
buttons (rubric), until the app has nothing left for them.

Their judgement is a proxy for a human's: similarity of each output to the reference answer
shown on the page (difflib), plus a little per-reviewer noise so agreement is not perfect.

Usage: .venv/bin/python scripts/review_demo_browser.py URL TOKEN [TOKEN ...]
"""

from __future__ import annotations

import random
import sys
from difflib import SequenceMatcher

from playwright.sync_api import sync_playwright


def judge(text: str, reference: str, rng: random.Random) -> float:
    return SequenceMatcher(None, text, reference).ratio() + rng.gauss(0, 0.05)


def rank(page, reference: str, rng: random.Random) -> None:
    cards = {c.get_attribute("data-label"): c.query_selector(".text").inner_text() for c in page.query_selector_all(".card")}
    scored = sorted(((judge(t, reference, rng), label) for label, t in cards.items()), reverse=True)
    previous = None
    for value, label in scored:
        if previous is not None and previous - value < 0.02:
            page.keyboard.press("=")  # too close to call: a tie
        page.keyboard.press(label.lower())
        previous = value
    with page.expect_navigation():
        page.keyboard.press("Enter")


def score(page, reference: str, rng: random.Random) -> None:
    for card in page.query_selector_all(".card"):
        quality = judge(card.query_selector(".text").inner_text(), reference, rng)
        for row in card.query_selector_all(".score-row"):
            radios = row.query_selector_all("input[type=radio]")
            level = min(len(radios) - 1, max(0, round(quality * (len(radios) - 1) + rng.gauss(0, 0.4))))
            radios[level].check()
    with page.expect_navigation():
        page.click("#send")


def review(browser, url: str, token: str, seed: int) -> int:
    rng, done = random.Random(seed), 0
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{url}/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")
    page.click("#next")
    page.wait_for_load_state()
    while "/assignments/" in page.url:
        reference = page.inner_text(".reference .text") if page.query_selector(".reference") else ""
        (rank if page.query_selector('form[data-kind="rank"]') else score)(page, reference, rng)
        done += 1
    page.close()
    return done


def main() -> None:
    url, tokens = sys.argv[1], sys.argv[2:]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        for i, token in enumerate(tokens):
            print(f"reviewer {i + 1}: {review(browser, url, token, seed=i)} items reviewed in the browser")
        browser.close()


if __name__ == "__main__":
    main()
