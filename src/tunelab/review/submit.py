"""Saving a reviewer's ranking, rubric scores or thumbs: validated whole, then written in one
transaction; a later save replaces the reviewer's earlier one until the item closes.

Form fields: `rank_<output id>` (1 = best, equal numbers are ties) for rank items,
`score_<output id>_<criterion id>` for rubric items, `rate_<output id>` (`up` or `down`) for rate
items, and an optional `comment`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from tunelab.errors import TunelabError
from tunelab.review.assign import closed
from tunelab.review.store import MAX_COMMENT, Assignment, Criterion, Ranking, Rating, Score, Store, now

THUMBS = {"up": True, "down": False}


class SubmissionError(TunelabError):
    """A submission the reviewer can fix (missing or out-of-range value); nothing was saved."""


class NotYours(SubmissionError):
    """The assignment does not exist or belongs to another reviewer."""


class Closed(SubmissionError):
    """The reviewer already submitted this item and it has all its reviews now: no more changes."""


def _integer(form: Mapping[str, str], key: str, lo: int, hi: int, what: str) -> int:
    raw = form.get(key)
    if raw is None or str(raw).strip() == "":
        raise SubmissionError(f"{what}: missing; give every output a value")
    try:
        value = int(raw)
    except ValueError:
        raise SubmissionError(f"{what}: {str(raw)[:20]!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise SubmissionError(f"{what}: {value} is outside {lo}..{hi}")
    return value


def _thumb(form: Mapping[str, str], key: str, what: str) -> bool:
    raw = str(form.get(key) or "").strip()
    if not raw:
        raise SubmissionError(f"{what}: missing; give every output a thumbs up or down")
    if raw not in THUMBS:
        raise SubmissionError(f"{what}: {raw[:20]!r} is not up or down")
    return THUMBS[raw]


def parse(s: Session, assignment: Assignment, form: Mapping[str, str], labels: dict[int, str]) -> list:
    """The Ranking, Score or Rating rows a form describes; raises SubmissionError before anything is written."""
    outputs = assignment.item.outputs
    if assignment.item.kind == "rate":
        return [Rating(assignment_id=assignment.id, output_id=o.id, up=_thumb(form, f"rate_{o.id}", f"output {labels[o.id]}"))
                for o in outputs]
    if assignment.item.kind == "rank":
        return [
            Ranking(assignment_id=assignment.id, output_id=o.id,
                    rank=_integer(form, f"rank_{o.id}", 1, len(outputs), f"rank of output {labels[o.id]}"))
            for o in outputs
        ]
    criteria = s.scalars(select(Criterion).order_by(Criterion.position)).all()
    return [
        Score(assignment_id=assignment.id, output_id=o.id, criterion_id=c.id,
              score=_integer(form, f"score_{o.id}_{c.id}", c.scale_min, c.scale_max,
                             f"{c.name} of output {labels[o.id]}"))
        for o in outputs for c in criteria
    ]


def form_values(s: Session, assignment: Assignment) -> dict[str, str]:
    """A submitted assignment's saved values as form fields (the inverse of `parse`), to edit it."""
    rows = [(f"rank_{r.output_id}", r.rank) for r in
            s.scalars(select(Ranking).where(Ranking.assignment_id == assignment.id))]
    rows += [(f"score_{sc.output_id}_{sc.criterion_id}", sc.score) for sc in
             s.scalars(select(Score).where(Score.assignment_id == assignment.id))]
    rows += [(f"rate_{r.output_id}", "up" if r.up else "down") for r in
             s.scalars(select(Rating).where(Rating.assignment_id == assignment.id))]
    return {key: str(value) for key, value in rows} | {"comment": assignment.comment or ""}


def labels_for(assignment: Assignment) -> dict[int, str]:
    """Output id -> the letter the reviewer sees (A, B, ...), in this assignment's shuffled order."""
    return {o.id: chr(ord("A") + i) for i, o in enumerate(display_order(assignment))}


def display_order(assignment: Assignment) -> list:
    """The item's outputs in an order fixed per assignment (seeded by its id) and blind to models."""
    outputs = list(assignment.item.outputs)
    random.Random(assignment.id).shuffle(outputs)
    return outputs


def _mark_done(assignment: Assignment, comment: str | None) -> None:
    assignment.done = True
    assignment.comment = comment
    assignment.submitted_at = now()


def submit(store: Store, reviewer_id: int, assignment_id: int, form: Mapping[str, str]) -> bool:
    """Validate and save one submission atomically; True when it replaced the reviewer's earlier
    one (an edit: old rows out, new rows in, in the same transaction), refused once the item has
    closed. The assignment row is locked first, so two racing saves of it run one after the other.
    `submitted_at` is the latest save's time."""
    comment = (form.get("comment") or "").strip() or None
    if comment is not None and len(comment) > MAX_COMMENT:
        raise SubmissionError(f"comment: at most {MAX_COMMENT} characters, got {len(comment)}")

    def save(s: Session) -> bool:
        assignment = s.scalar(select(Assignment).where(Assignment.id == assignment_id).with_for_update())
        if assignment is None or assignment.reviewer_id != reviewer_id:
            raise NotYours(f"assignment {assignment_id} is not yours")
        edit = assignment.done
        if edit and closed(s, assignment.item):
            raise Closed("this item is closed: it has all its reviews")
        rows = parse(s, assignment, form, labels_for(assignment))
        if edit:
            for table in (Ranking, Score, Rating):
                s.execute(delete(table).where(table.assignment_id == assignment.id))
        s.add_all(rows)
        s.flush()
        _mark_done(assignment, comment)
        return edit

    return store.write(save)
