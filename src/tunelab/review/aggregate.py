"""The finished reviews, read once from the database into plain structures for the report and
the export; consensus rankings, weighted rubric scores and thumbs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata
from sqlalchemy import select

from tunelab.review.store import Assignment, Criterion, Item, Output, Ranking, Rating, Reviewer, Score, Store


@dataclass
class ItemView:
    id: int
    external_id: str
    kind: str
    prompt: list
    reference: str | None
    needed: int
    outputs: list[tuple[int, str, str]] = field(default_factory=list)  # (output id, model, text)
    done: list[int] = field(default_factory=list)  # ids of finished assignments
    pending: int = 0
    comments: list[tuple[int, str]] = field(default_factory=list)  # (reviewer id, comment)


@dataclass
class Reviews:
    criteria: list[Criterion]
    items: dict[int, ItemView]
    reviewer_names: dict[int, str]
    by: dict[int, int]  # finished assignment id -> reviewer id
    ranks: dict[int, dict[int, int]]  # assignment id -> {output id: rank}
    scores: dict[int, dict[tuple[int, int], int]]  # assignment id -> {(output id, criterion id): score}
    ratings: dict[int, dict[int, bool]] = field(default_factory=dict)  # assignment id -> {output id: thumbs up}

    def rank_matrix(self, item: ItemView) -> tuple[list[int], list[list[int]]]:
        """(reviewer ids, one row of ranks per reviewer in item.outputs order) for a rank item."""
        rows = [a for a in item.done if a in self.ranks]
        return [self.by[a] for a in rows], [[self.ranks[a][o] for o, _, _ in item.outputs] for a in rows]

    def thumbs(self, item: ItemView) -> dict[int, list[bool]]:
        """Rate item: output id -> its thumbs (True = up), one per finished review."""
        votes: dict[int, list[bool]] = defaultdict(list)
        for a in item.done:
            for o, up in self.ratings.get(a, {}).items():
                votes[o].append(up)
        return dict(votes)

    def weighted(self, means: dict[int, float]) -> float | None:
        """0-100: each criterion's mean mapped from its scale to 0..1, weighted by the rubric."""
        parts = [(c.weight, (means[c.id] - c.scale_min) / (c.scale_max - c.scale_min)) for c in self.criteria if c.id in means]
        total = sum(w for w, _ in parts)
        return 100 * sum(w * v for w, v in parts) / total if total else None

    def output_means(self, item: ItemView) -> dict[int, dict[int, float]]:
        """Rubric item: output id -> {criterion id: mean score over its reviewers}."""
        sums: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for a in item.done:
            for (o, c), v in self.scores.get(a, {}).items():
                sums[o][c].append(v)
        return {o: {c: float(np.mean(v)) for c, v in per.items()} for o, per in sums.items()}


def consensus(ranks: list[list[int]]) -> np.ndarray:
    """Mean rank per output over reviewers (ties as average ranks): lower is better. The same
    order as a Borda count, which awards each output the number of outputs ranked below it."""
    return np.mean([rankdata(row) for row in ranks], axis=0)


def load(store: Store) -> Reviews:
    with store.read() as s:
        criteria = list(s.scalars(select(Criterion).order_by(Criterion.position)))
        items = {
            i.id: ItemView(i.id, i.external_id, i.kind, i.prompt, i.reference, i.needed)
            for i in s.scalars(select(Item).order_by(Item.id))
        }
        for o in s.scalars(select(Output).order_by(Output.item_id, Output.position)):
            items[o.item_id].outputs.append((o.id, o.model, o.text))
        names = {rid: name for rid, name in s.execute(select(Reviewer.id, Reviewer.name))}
        by = {}
        for a in s.scalars(select(Assignment).order_by(Assignment.id)):
            if a.done:
                items[a.item_id].done.append(a.id)
                by[a.id] = a.reviewer_id
                if a.comment:
                    items[a.item_id].comments.append((a.reviewer_id, a.comment))
            else:
                items[a.item_id].pending += 1
        ranks: dict[int, dict[int, int]] = defaultdict(dict)
        for r in s.scalars(select(Ranking)):
            ranks[r.assignment_id][r.output_id] = r.rank
        scores: dict[int, dict] = defaultdict(dict)
        for sc in s.scalars(select(Score)):
            scores[sc.assignment_id][(sc.output_id, sc.criterion_id)] = sc.score
        ratings: dict[int, dict[int, bool]] = defaultdict(dict)
        for r in s.scalars(select(Rating)):
            ratings[r.assignment_id][r.output_id] = r.up
    return Reviews(criteria, items, names, by, dict(ranks), dict(scores), dict(ratings))
