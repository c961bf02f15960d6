"""`tunelab review export`: preference pairs from the rankings, for reward modelling and DPO.

Each rank item's rankings are merged into one consensus (mean rank over its reviewers); pairs
are taken from it (`all`: every pair of outputs whose consensus ranks differ; `best-worst`:
the best output(s) against the worst), ties skipped, and pairs with an empty answer or two
identical answers skipped too. Every row carries the item's agreement
(Kendall's W of its reviewers; null with one reviewer) and the number of reviewers, so a
trainer can filter or weight by them. Row shape:
{"id", "prompt": [{role, content}], "chosen", "rejected", "agreement", "n_reviewers"}.
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


def export(store: Store, to: Path, mode: str = "all", min_reviewers: int = 1) -> tuple[int, int]:
    """Write the pairs as JSONL (atomically); returns (written, skipped)."""
    rows, skipped = pairs(load(store), mode, min_reviewers)
    write_text(to, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows), skipped
