"""Who reviews what: each item goes to `item.needed` distinct reviewers, never twice to one.

Items are handed out on demand (a reviewer asks for the next one), so reviewers added later
take part, and nobody waits for a fixed plan. The invariants are the database's own unique
constraints — (item, reviewer) and (item, slot) — so they hold under concurrent claims on
PostgreSQL too; a lost race raises IntegrityError and the caller's transaction is retried.
"""

from __future__ import annotations

import random
from datetime import timedelta

from sqlalchemy import Select, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from tunelab.review.store import Assignment, Item, Reviewer, Store, now

# Claims pick at random among this many of the most-reviewed open items: items fill up (and
# become usable) early, while concurrent reviewers rarely collide on one slot.
SPREAD = 8
# An item claimed but not submitted for this long goes back to the pool, so a reviewer who
# walked away does not hold a slot forever (their page then says the item is no longer theirs).
ABANDONED_AFTER = timedelta(hours=12)


class LostRace(Exception):
    """Another claim filled the chosen item between our read and our insert; retry."""


def _open_to(reviewer_id: int) -> Select:
    """(item id, needed) of the items the reviewer has not had that still have a free slot."""
    mine = select(Assignment.item_id).where(Assignment.reviewer_id == reviewer_id)
    return (select(Item.id, Item.needed).outerjoin(Assignment, Assignment.item_id == Item.id)
            .where(Item.id.not_in(mine)).group_by(Item.id, Item.needed).having(func.count(Assignment.id) < Item.needed))


def closed(s: Session, item: Item) -> bool:
    """An item closes when it has all its reviews (`item.needed` submitted): from then on its
    reviews, and the agreement figures and preference pairs computed from them, stay as they
    are. Until then a reviewer may change their own review (see submit.submit)."""
    return _submitted(s, select(Item.id).where(Item.id == item.id)).get(item.id, 0) >= item.needed


def _submitted(s: Session, item_ids: Select) -> dict[int, int]:
    """Item id -> number of submitted reviews, for the items `item_ids` selects."""
    return dict(s.execute(select(Assignment.item_id, func.count(Assignment.id))
                          .where(Assignment.item_id.in_(item_ids), Assignment.done.is_(True))
                          .group_by(Assignment.item_id)).all())


def reviewer_progress(s: Session, reviewer_id: int) -> dict:
    """For "item 3 of 6": the reviewer's submitted and open assignments, and their total with
    the items still open to them (the total drops when other reviewers fill those first)."""
    done, claimed = s.execute(
        select(func.count(Assignment.id).filter(Assignment.done.is_(True)), func.count(Assignment.id))
        .where(Assignment.reviewer_id == reviewer_id)
    ).one()
    available = s.scalar(select(func.count()).select_from(_open_to(reviewer_id).subquery()))
    return {"done": done, "pending": claimed - done, "position": done + 1, "total": claimed + available}


def past_reviews(s: Session, reviewer_id: int) -> list[dict]:
    """The reviewer's submitted reviews, newest first, each saying whether it can still change."""
    mine = select(Assignment.item_id).where(Assignment.reviewer_id == reviewer_id)
    submitted = _submitted(s, mine)
    rows = s.scalars(select(Assignment).options(joinedload(Assignment.item))
                     .where(Assignment.reviewer_id == reviewer_id, Assignment.done.is_(True))
                     .order_by(Assignment.submitted_at.desc(), Assignment.id.desc())).all()
    return [{"id": a.id, "item": a.item.external_id, "kind": a.item.kind, "submitted_at": a.submitted_at,
             "closed": submitted[a.item_id] >= a.item.needed} for a in rows]


def pending(s: Session, reviewer_id: int) -> Assignment | None:
    return s.scalar(
        select(Assignment).where(Assignment.reviewer_id == reviewer_id, Assignment.done.is_(False))
        .order_by(Assignment.id).limit(1)
    )


def claim_in(s: Session, reviewer_id: int, rng: random.Random) -> Assignment | None:
    """The reviewer's unfinished assignment, else a new one on an open item they have not had;
    None when nothing is left for them."""
    current = pending(s, reviewer_id)
    if current is not None:
        return current
    s.execute(delete(Assignment).where(Assignment.done.is_(False), Assignment.reviewer_id != reviewer_id,
                                       Assignment.created_at < now() - ABANDONED_AFTER))
    count = func.count(Assignment.id)
    open_items = s.execute(_open_to(reviewer_id).order_by(count.desc(), Item.id).limit(SPREAD)).all()
    if not open_items:
        return None
    item_id, needed = rng.choice(open_items)
    taken = set(s.scalars(select(Assignment.slot).where(Assignment.item_id == item_id)))
    free = set(range(needed)) - taken
    if not free:
        raise LostRace(item_id)
    slot = min(free)
    assignment = Assignment(item_id=item_id, reviewer_id=reviewer_id, slot=slot)
    s.add(assignment)
    s.flush()  # a lost race fails here, inside the transaction that store.write retries
    return assignment


def claim(store: Store, reviewer_id: int, rng: random.Random | None = None) -> int | None:
    """Id of the reviewer's next assignment (see `claim_in`), in its own retried transaction."""
    rng = rng or random.Random()

    def run(s):
        a = claim_in(s, reviewer_id, rng)
        return a.id if a else None

    return store.write(run, retry=(IntegrityError, LostRace), attempts=20)


def progress(s: Session) -> dict:
    """For the admin view: totals, per reviewer (done, open, last submission) and per item
    (done/needed and who has it)."""
    reviewers = {r.id: {"name": r.name, "admin": r.admin, "done": 0, "pending": 0, "last": None}
                 for r in s.scalars(select(Reviewer).order_by(Reviewer.name))}
    items = {i.id: {"external_id": i.external_id, "kind": i.kind, "needed": i.needed, "done": 0, "reviewers": []}
             for i in s.scalars(select(Item).order_by(Item.id))}
    for a in s.scalars(select(Assignment).order_by(Assignment.id)):
        r, i = reviewers[a.reviewer_id], items[a.item_id]
        r["done" if a.done else "pending"] += 1
        if a.submitted_at and (r["last"] is None or a.submitted_at > r["last"]):
            r["last"] = a.submitted_at
        i["done"] += a.done
        i["reviewers"].append((r["name"], a.done))
    totals = {
        "done": sum(r["done"] for r in reviewers.values()),
        "pending": sum(r["pending"] for r in reviewers.values()),
        "needed": sum(i["needed"] for i in items.values()),
        "n_items": len(items),
        "items_complete": sum(i["done"] >= i["needed"] for i in items.values()),
    }
    return {"totals": totals, "reviewers": list(reviewers.values()), "items": list(items.values())}
