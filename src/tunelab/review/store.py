"""The review project's database: SQLAlchemy models and transactions (SQLite file or PostgreSQL).

One database is one review project. Writes go through `Store.write`, which runs a function in
one transaction and retries it when the database reports a transient conflict, so a
submission is saved whole or not at all, whichever backend and however many reviewers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import (
    JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event,
    inspect,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_DB = "sqlite:///review.db"

# Input limits: they bound what one request or one imported row can make the server hold.
MAX_TEXT = 50_000  # characters in one prompt turn, reference or output (a long news article fits)
MAX_OUTPUTS = 12  # outputs shown together in one item
MAX_COMMENT = 2_000  # characters in a reviewer's comment
MAX_NAME = 200  # ids, model names, reviewer and criterion names
MAX_BODY = 256 * 1024  # bytes in one HTTP request body


def now() -> datetime:
    return datetime.now(timezone.utc)


def hash_token(token: str) -> str:
    """Tokens are 192-bit random strings, so one SHA-256 is enough at rest (no slow KDF needed:
    there is nothing to brute-force that is easier than the token itself)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[str] = mapped_column(String(MAX_NAME))


class Reviewer(Base):
    __tablename__ = "reviewers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Criterion(Base):
    """One rubric criterion: a scale scale_min..scale_max, level descriptions and a weight."""

    __tablename__ = "criteria"
    id: Mapped[int] = mapped_column(primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(MAX_NAME), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    scale_min: Mapped[int] = mapped_column(Integer, default=1)
    scale_max: Mapped[int] = mapped_column(Integer, default=5)
    levels: Mapped[dict] = mapped_column(default=dict)  # {"1": "wrong", "5": "fully correct"}


class Item(Base):
    """A prompt and the outputs to review, of one kind: `rank`, `rubric` or `rate` (thumbs up/down)."""

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("external_id", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(MAX_NAME))
    kind: Mapped[str] = mapped_column(String(10))
    prompt: Mapped[list] = mapped_column()  # chat messages [{role, content}], no final assistant turn
    reference: Mapped[str | None] = mapped_column(Text, nullable=True)
    needed: Mapped[int] = mapped_column(Integer)  # distinct reviewers wanted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    outputs: Mapped[list[Output]] = relationship(order_by="Output.position", back_populates="item")


class Output(Base):
    __tablename__ = "outputs"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(MAX_NAME))
    text: Mapped[str] = mapped_column(Text)
    item: Mapped[Item] = relationship(back_populates="outputs")


class Assignment(Base):
    """An item given to one reviewer. `slot` (0..needed-1) is unique per item, so the database
    itself refuses an item to more than `needed` reviewers when two claims race."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "reviewer_id"), UniqueConstraint("item_id", "slot"))
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    slot: Mapped[int] = mapped_column(Integer)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    item: Mapped[Item] = relationship()
    reviewer: Mapped[Reviewer] = relationship()


class Ranking(Base):
    """Rank of one output in one submission (1 = best; equal ranks are ties)."""

    __tablename__ = "rankings"
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer)


class Rating(Base):
    """A thumbs up (True) or down (False) for one output in one submission: what KTO learns from."""

    __tablename__ = "ratings"
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), primary_key=True)
    up: Mapped[bool] = mapped_column(Boolean)


class Score(Base):
    __tablename__ = "scores"
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), primary_key=True)
    criterion_id: Mapped[int] = mapped_column(ForeignKey("criteria.id"), primary_key=True)
    score: Mapped[int] = mapped_column(Integer)


def normalize_url(db: str) -> str:
    """`review.db` -> sqlite:///review.db; postgresql:// -> the psycopg 3 driver (SQLAlchemy's
    default PostgreSQL driver is psycopg2, which tunelab does not install)."""
    if "://" not in db:
        return f"sqlite:///{db}"
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


class Store:
    """Engine + transactions. `read()` for pages, `write(fn)` for every change."""

    def __init__(self, db: str = DEFAULT_DB):
        self.url = normalize_url(db)
        self.sqlite = self.url.startswith("sqlite")
        try:
            if self.sqlite:
                # 30 s busy timeout: a writer waits for the lock instead of failing at once.
                engine = create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
                event.listen(engine, "connect", _sqlite_connect)
                event.listen(engine, "begin", _sqlite_begin)
            else:
                engine = create_engine(self.url, pool_size=10, max_overflow=40, pool_pre_ping=True)
        except Exception as err:  # bad URL, missing driver
            raise TunelabError(f"--db {db}: cannot open the review database: {err}") from None
        self.engine = engine
        # Writers take SQLite's write lock at BEGIN: a deferred transaction that reads and then
        # writes can fail with "database is locked" without waiting when another writer is active.
        self._write_engine = engine.execution_options(sqlite_begin="IMMEDIATE")

    def create(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as err:
            raise TunelabError(f"--db {self.url}: cannot create the review tables: {err.orig}") from None

    def check(self) -> Store:
        """Fail with the fix when the database was never initialised."""
        path = self.engine.url.database
        if self.sqlite and path and path != ":memory:" and not os.path.exists(path):  # connecting would create it
            raise TunelabError(f"--db {self.url}: no such file; run `tunelab review init --db {self.url}` first")
        try:
            ready = inspect(self.engine).has_table("items")
        except OperationalError as err:
            raise TunelabError(f"--db {self.url}: cannot connect: {err.orig}") from None
        if not ready:
            raise TunelabError(f"--db {self.url}: not a review project yet; run `tunelab review init --db {self.url}`")
        Base.metadata.create_all(self.engine)  # tables a later tunelab added (ratings) join an older project
        return self

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def write(self, fn: Callable[[Session], T], retry: tuple[type[Exception], ...] = (), attempts: int = 8) -> T:
        """fn(session) in one transaction, committed at the end; retried from scratch on transient
        conflicts (a locked SQLite file, a PostgreSQL serialization failure or deadlock) and on
        the exception types in `retry` (e.g. IntegrityError when two claims race for a slot)."""
        for attempt in range(attempts):
            try:
                with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
                    return fn(session)
            except (*retry, OperationalError, DBAPIError) as err:
                if attempt == attempts - 1 or not (isinstance(err, retry) or _transient(err)):
                    raise
                log.debug("retrying a transaction after %s", type(err).__name__)
                time.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))  # jitter: racers spread out
        raise AssertionError("unreachable")

    def setting(self, key: str, default: str | None = None) -> str | None:
        with self.read() as s:
            row = s.get(Setting, key)
            return row.value if row else default


def _transient(err: Exception) -> bool:
    if isinstance(err, IntegrityError):
        return False
    code = getattr(getattr(err, "orig", None), "sqlstate", None)
    return code in ("40001", "40P01") or "database is locked" in str(err)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN (pysqlite's own implicit BEGIN is always deferred).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")
