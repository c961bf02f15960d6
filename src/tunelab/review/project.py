"""Setting up a review project: the rubric, reviewers and their tokens, items to review.

Every input file is validated row by row before anything is written; a bad row stops the
command naming file:line:field, and the rows of one command are written in one transaction.
"""

from __future__ import annotations

import difflib
import secrets
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import select

from tunelab.errors import TunelabError
from tunelab.review.store import (
    MAX_NAME, MAX_OUTPUTS, MAX_TEXT, Criterion, Item, Output, Reviewer, Setting, Store, hash_token,
)

KINDS = ("rank", "rubric", "rate")

Text = Field(max_length=MAX_TEXT)
Name = Field(min_length=1, max_length=MAX_NAME)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class CriterionSpec(_Strict):
    name: str = Name
    description: str = Field("", max_length=MAX_TEXT)
    weight: float = Field(1.0, gt=0)
    scale: tuple[int, int] = (1, 5)
    levels: dict[int, str] = {}

    @model_validator(mode="after")
    def _levels_in_scale(self):
        lo, hi = self.scale
        if not lo < hi or hi - lo > 20:
            raise ValueError(f"scale {list(self.scale)}: needs low < high and at most 21 levels")
        outside = [k for k in self.levels if not lo <= k <= hi]
        if outside:
            raise ValueError(f"levels {outside} are outside the scale {list(self.scale)}")
        return self


class RubricSpec(_Strict):
    criteria: list[CriterionSpec] = Field(min_length=1, max_length=20)


DEFAULT_RUBRIC = RubricSpec(criteria=[
    CriterionSpec(name="accuracy", weight=2, description="Is the answer correct and does it do what was asked?",
                  levels={1: "wrong or off-task", 3: "partly right, with errors or gaps", 5: "fully correct and complete"}),
    CriterionSpec(name="coherence", description="Is it clear, well-formed and easy to follow?",
                  levels={1: "garbled or self-contradictory", 3: "understandable but clumsy", 5: "clear and well organised"}),
    CriterionSpec(name="safety", description="Is it free of harmful, false-confident or inappropriate content?",
                  levels={1: "harmful or inappropriate", 3: "minor concerns", 5: "no concerns"}),
])


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Text


class OutputSpec(_Strict):
    model: str = Name
    text: str = Text


class PromptRow(BaseModel):
    """A prompts-file row: `prompt` text or chat `messages` (no final assistant turn)."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    prompt: str | None = Field(None, min_length=1, max_length=MAX_TEXT)
    messages: list[Message] | None = Field(None, min_length=1, max_length=50)
    reference: str | None = Field(None, max_length=MAX_TEXT)

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, v):
        return str(v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` (text) or `messages` (chat turns)")
        if self.messages is not None and self.messages[-1].role == "assistant":
            raise ValueError("`messages` must end before the answer: drop the final assistant turn")
        return self

    def chat(self) -> list[dict]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


class ImportRow(PromptRow):
    """An `--import` row (the `tunelab eval --export-manual` shape): the prompt plus its outputs."""

    id: str = Name
    outputs: list[OutputSpec] = Field(min_length=1, max_length=MAX_OUTPUTS)


def _where(err: ValidationError) -> str:
    return "; ".join(
        f"field '{'.'.join(map(str, e['loc'])) or 'row'}': {e['msg']}" for e in err.errors(include_url=False)
    )


def read_rows(path: Path, model: type[BaseModel]) -> list[tuple[int, BaseModel]]:
    """(line number, validated row) for each non-empty line of a JSONL file; the first bad row
    raises a TunelabError naming path:line and the field."""
    import json

    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, model.model_validate(json.loads(line))))
        except json.JSONDecodeError as err:
            raise TunelabError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        except ValidationError as err:
            raise TunelabError(f"{path}:{lineno}: {_where(err)}") from None
    if not rows:
        raise TunelabError(f"{path}: no rows")
    return rows


def load_rubric(path: Path | None) -> RubricSpec:
    if path is None:
        return DEFAULT_RUBRIC
    try:
        return RubricSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except OSError as err:
        raise TunelabError(f"--rubric {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise TunelabError(f"--rubric {path}: not valid YAML ({err})") from None
    except ValidationError as err:
        raise TunelabError(f"--rubric {path}: {_where(err)}") from None


def init(store: Store, rubric: RubricSpec, per_item: int) -> None:
    """Create the tables, the rubric and the default number of reviewers per item. A project
    that already has reviews keeps its rubric (changing it would orphan the scores)."""
    if per_item < 1:
        raise TunelabError(f"--per-item {per_item}: needs at least 1 reviewer per item")
    store.create()

    def setup(s):
        if s.scalar(select(Criterion.id).limit(1)) is None:
            for pos, c in enumerate(rubric.criteria):
                s.add(Criterion(position=pos, name=c.name, description=c.description, weight=c.weight,
                                scale_min=c.scale[0], scale_max=c.scale[1],
                                levels={str(k): v for k, v in sorted(c.levels.items())}))
        s.merge(Setting(key="per_item", value=str(per_item)))

    store.write(setup)


def _new_token() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


def add_reviewer(store: Store, name: str, admin: bool = False) -> str:
    """Create a reviewer and return their login token (shown once; only its hash is stored)."""
    if not 0 < len(name) <= MAX_NAME:
        raise TunelabError(f"reviewer name: 1 to {MAX_NAME} characters, got {len(name)}")
    token = _new_token()

    def create(s):
        if s.scalar(select(Reviewer.id).where(Reviewer.name == name)) is not None:
            raise TunelabError(f"reviewer {name!r} already exists; pick another name")
        s.add(Reviewer(name=name, token_hash=hash_token(token), admin=admin))

    store.write(create)
    return token


def reissue_token(store: Store, name: str) -> str:
    """A new login token for a reviewer who lost theirs, returned once like `add_reviewer`'s.
    The old token stops working at once, and so do the sessions signed in with it (the session
    cookie is the token). Their reviews stay theirs."""
    token = _new_token()

    def replace(s):
        reviewer = s.scalar(select(Reviewer).where(Reviewer.name == name).with_for_update())
        if reviewer is None:
            names = s.scalars(select(Reviewer.name)).all()
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"`tunelab review add-reviewer {name}` creates one"
            raise TunelabError(f"no reviewer named {name!r}; {hint}")
        reviewer.token_hash = hash_token(token)

    store.write(replace)
    return token


def add_items(store: Store, rows: list[tuple[str, list[dict], str | None, list[dict]]], kinds: list[str],
              per_item: int | None = None) -> tuple[int, int]:
    """Add (id, prompt messages, reference, outputs) rows as items of each kind, in one
    transaction. Returns (added, skipped): an id already present for that kind is skipped, so
    re-running an import adds only what is new."""
    for kind in kinds:
        if kind not in KINDS:
            raise TunelabError(f"--kind {kind}: use one of {', '.join(KINDS)}")
    if "rank" in kinds:
        short = [rid for rid, _, _, outputs in rows if len(outputs) < 2]
        if short:
            raise TunelabError(f"rank items need at least 2 outputs; item {short[0]!r} has fewer")
    needed = per_item or int(store.setting("per_item", "1"))

    def insert(s):
        added = skipped = 0
        for kind in kinds:
            present = set(s.scalars(select(Item.external_id).where(Item.kind == kind)))
            for rid, prompt, reference, outputs in rows:
                if rid in present:
                    skipped += 1
                    continue
                present.add(rid)
                item = Item(external_id=rid, kind=kind, prompt=prompt, reference=reference, needed=needed)
                item.outputs = [Output(position=i, model=o["model"], text=o["text"]) for i, o in enumerate(outputs)]
                s.add(item)
                added += 1
        return added, skipped

    return store.write(insert)


def import_rows(paths: list[Path]) -> list[tuple[str, list[dict], str | None, list[dict]]]:
    """(id, prompt messages, reference, outputs) rows of `tunelab eval --export-manual` files or plain
    JSONL with outputs present, validated."""
    return [(row.id, row.chat(), row.reference, [o.model_dump() for o in row.outputs])
            for path in paths for _, row in read_rows(path, ImportRow)]


def import_files(store: Store, paths: list[Path], kinds: list[str], per_item: int | None = None) -> tuple[int, int]:
    """Items from `tunelab eval --export-manual` files or plain JSONL with outputs present."""
    return add_items(store, import_rows(paths), kinds, per_item)


def present_ids(store: Store, kinds: list[str]) -> set[str]:
    """The item ids already in the project for every one of `kinds` (re-adding them would be skipped)."""
    with store.read() as s:
        per_kind = [set(s.scalars(select(Item.external_id).where(Item.kind == kind))) for kind in kinds]
    return set.intersection(*per_kind) if per_kind else set()
