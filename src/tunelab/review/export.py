"""`tunelab review export`: what the reviews teach, as training data.

`--as pairs` (the default; reward models and DPO): each rank item's rankings are merged into one consensus (mean rank over its reviewers); pairs
are taken from it (`all`: every pair of outputs whose consensus ranks differ; `best-worst`:
the best output(s) against the worst), ties skipped, and pairs with an empty answer or two
identical answers skipped too. Every row carries the item's agreement
(Kendall's W of its reviewers; null with one reviewer) and the number of reviewers, so a
trainer can filter or weight by them. Row shape:
{"id", "prompt": [{role, content}], "chosen", "rejected", "agreement", "n_reviewers"}.

`--as rankings` (the listwise reward model): one row per rank item with all its outputs and every
reviewer's full ranking, ties and disagreements kept:
{"id", "prompt", "outputs": [text], "models": [name], "rankings": [[rank per output] per reviewer],
"reviewers": [name], "agreement", "n_reviewers"}.

`--as ratings` (KTO): one row per output judged good or not: from rate items by the majority of
its thumbs (an even split is skipped), from rubric items by whether its weighted score (0-100,
mean over reviewers) reaches the threshold:
{"id", "prompt", "completion", "label", "model", "source": "rate" | "rubric", "agreement",
"n_reviewers"} where `agreement` is the share of the output's reviewers who voted with the label
(rate) or null (rubric).
"""

from __future__ import annotations

import json
import os
from itertools import combinations
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.review.agreement import kendalls_w
from tunelab.review.aggregate import Reviews, consensus, load
from tunelab.review.store import Store

PAIRS = ("all", "best-worst")
SHAPES = ("pairs", "rankings", "ratings")


def _usable(chosen: str, rejected: str) -> bool:
    """An empty answer or two identical ones teach nothing (and preference trainers refuse them)."""
    return bool(chosen.strip()) and bool(rejected.strip()) and chosen.strip() != rejected.strip()


def pairs(reviews: Reviews, mode: str = "all", min_reviewers: int = 1) -> tuple[list[dict], int]:
    """(preference rows, pairs skipped because an answer was empty or both were the same text)."""
    if mode not in PAIRS:
        raise TunelabError(f"--pairs {mode}: use one of {', '.join(PAIRS)}")
    rows, skipped = [], 0
    for item in (i for i in reviews.items.values() if i.kind == "rank"):
        _, ranks = reviews.rank_matrix(item)
        if len(ranks) < max(min_reviewers, 1):
            continue
        mean = consensus(ranks)
        if mode == "all":
            chosen_rejected = [(i, j) if mean[i] < mean[j] else (j, i)
                               for i, j in combinations(range(len(mean)), 2) if mean[i] != mean[j]]
        else:
            best = [i for i, v in enumerate(mean) if v == mean.min()]
            worst = [i for i, v in enumerate(mean) if v == mean.max()]
            chosen_rejected = [] if mean.min() == mean.max() else [(i, j) for i in best for j in worst]
        agreement = kendalls_w(ranks)
        usable = [(i, j) for i, j in chosen_rejected if _usable(item.outputs[i][2], item.outputs[j][2])]
        skipped += len(chosen_rejected) - len(usable)
        for n, (i, j) in enumerate(usable):
            rows.append({
                "id": f"{item.external_id}-{n}",
                "prompt": item.prompt,
                "chosen": item.outputs[i][2],
                "rejected": item.outputs[j][2],
                "agreement": None if agreement is None else round(agreement, 4),
                "n_reviewers": len(ranks),
            })
    return rows, skipped


def write_text(path: Path, text: str) -> Path:
    """Write via a temporary file and rename, so a reader never sees half a file. (Not
    tracking.metrics.atomic_write_text: that module imports transformers, 15 s on 2 cores.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def rankings(reviews: Reviews, min_reviewers: int = 1) -> list[dict]:
    """One row per rank item with at least `min_reviewers` finished rankings."""
    rows = []
    for item in (i for i in reviews.items.values() if i.kind == "rank"):
        raters, ranks = reviews.rank_matrix(item)
        if len(ranks) < max(min_reviewers, 1):
            continue
        agreement = kendalls_w(ranks)
        rows.append({
            "id": item.external_id,
            "prompt": item.prompt,
            "outputs": [text for _, _, text in item.outputs],
            "models": [model for _, model, _ in item.outputs],
            "rankings": ranks,
            "reviewers": [reviews.reviewer_names[r] for r in raters],
            "agreement": None if agreement is None else round(agreement, 4),
            "n_reviewers": len(ranks),
        })
    return rows


def _verdicts(reviews: Reviews, item, threshold: float, least: int) -> tuple[dict[int, tuple], int]:
    """Output id -> (desirable, agreement, reviewers) for a rate or rubric item with at least `least`
    reviews, and how many outputs stay undecided (an even split of thumbs)."""
    if item.kind == "rubric":
        if len(item.done) < least:
            return {}, 0
        weighted = {o: reviews.weighted(m) for o, m in reviews.output_means(item).items()}
        return {o: (w >= threshold, None, len(item.done)) for o, w in weighted.items() if w is not None}, 0
    judged, ties = {}, 0
    for o, votes in reviews.thumbs(item).items():
        up, n = sum(votes), len(votes)
        if n < least:
            continue
        if 2 * up == n:
            ties += 1
            continue
        judged[o] = (2 * up > n, max(up, n - up) / n, n)
    return judged, ties


def ratings(reviews: Reviews, threshold: float = 60.0, min_reviewers: int = 1) -> tuple[list[dict], int]:
    """(desirable/undesirable rows, outputs skipped: an even thumbs split or an empty answer)."""
    rows, skipped = [], 0
    for item in (i for i in reviews.items.values() if i.kind in ("rate", "rubric")):
        judged, ties = _verdicts(reviews, item, threshold, max(min_reviewers, 1))
        skipped += ties
        for position, (o, model, text) in enumerate(item.outputs):
            if o not in judged:
                continue
            if not text.strip():
                skipped += 1
                continue
            label, agreement, n = judged[o]
            rows.append({
                "id": f"{item.external_id}-{item.kind}-{position}",
                "prompt": item.prompt,
                "completion": text,
                "label": label,
                "model": model,
                "source": item.kind,
                "agreement": None if agreement is None else round(agreement, 4),
                "n_reviewers": n,
            })
    return rows, skipped


def export(store: Store, to: Path, mode: str = "all", min_reviewers: int = 1, shape: str = "pairs",
           threshold: float = 60.0) -> tuple[int, int]:
    """Write the rows of `shape` (pairs, rankings or ratings) as JSONL (atomically); returns (written, skipped)."""
    if shape not in SHAPES:
        raise TunelabError(f"--as {shape}: use one of {', '.join(SHAPES)}")
    if not 0 <= threshold <= 100:
        raise TunelabError(f"--threshold {threshold}: a weighted rubric score from 0 to 100")
    reviews = load(store)
    if shape == "pairs":
        rows, skipped = pairs(reviews, mode, min_reviewers)
    elif shape == "rankings":
        rows, skipped = rankings(reviews, min_reviewers), 0
    else:
        rows, skipped = ratings(reviews, threshold, min_reviewers)
    write_text(to, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows), skipped
