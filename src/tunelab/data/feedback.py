"""Data formats for what reviewers give beyond pairs: whole rankings and thumbs up/down.

- `rankings` (`tunelab review export --as rankings`; `tunelab reward` with preference.loss=listwise):
  one row per item: `prompt`, its `outputs` (k texts), `rankings` (one list of k ranks per
  reviewer, 1 = best, equal ranks tie) and the reviewers' `agreement` (Kendall's W or null).
- `ratings` (`tunelab review export --as ratings`; `tunelab kto`): one row per answer: `prompt`,
  `completion` and `label` (true = desirable), trl's unpaired-preference shape.

`prompt` is text or a list of {role, content} ending on a user turn, as in the `preferences` format.
They register themselves in `formats.FORMATS` when this module is imported (`data/preferences.py`,
their only reader, does): listing them in formats.py would make the two modules import each other.

Also here: `prompt_key`, the identity of a prompt, which a reward run records for the prompts it
trained on (`train_prompts.json`), so the review report can check it on the others only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.formats import FORMATS, Format, message_problems

TRAIN_PROMPTS = "train_prompts.json"


def prompt_problems(prompt) -> list[str]:
    """The first problem of a `prompt` field: text, or {role, content} messages ending on a user turn."""
    if prompt is None:
        return ["field 'prompt' is missing"]
    if isinstance(prompt, list):
        return message_problems("prompt", prompt, last_role="user") if prompt else ["field 'prompt' is empty"]
    if not isinstance(prompt, str):
        return [f"field 'prompt' should be a string or a list of {{role, content}}, got {type(prompt).__name__}"]
    return [] if prompt.strip() else ["field 'prompt' is empty"]


def chat_prompt(prompt: str | list[dict]) -> list[dict]:
    """The prompt as chat messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt.strip()}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def prompt_key(prompt: str | list[dict]) -> str:
    """SHA-256 of the prompt's messages: the same prompt in a review project and in an export."""
    return hashlib.sha256(json.dumps(chat_prompt(prompt), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def trained_prompts(run: str | Path) -> set[str] | None:
    """The prompt keys a reward run trained on, or None when its folder does not record them."""
    path = Path(run) / TRAIN_PROMPTS
    return set(json.loads(path.read_text())) if path.is_file() else None


def _agreement_problems(value) -> list[str]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1):
        return [f"field 'agreement' should be a number from -1 to 1 or null, got {value!r}"]
    return []


class _ReviewRows(Format):
    """Rows of a `tunelab review export`: a prompt (checked first) and what the reviewers gave for it."""

    @property
    def optional(self) -> dict[str, type]:
        return {}

    def content_problems(self, row: dict) -> list[str]:
        return prompt_problems(row.get("prompt")) or self.feedback_problems(row)

    def feedback_problems(self, row: dict) -> list[str]:
        raise NotImplementedError


@dataclass(frozen=True)
class ReviewRankings(_ReviewRows):
    name: str = "rankings"
    columns = ("prompt", "outputs", "rankings", "agreement")

    @property
    def required(self) -> dict[str, type]:
        return {"outputs": list, "rankings": list}

    def feedback_problems(self, row: dict) -> list[str]:
        outputs, rankings = row["outputs"], row["rankings"]
        if len(outputs) < 2 or not all(isinstance(o, str) for o in outputs):
            return [f"field 'outputs' should hold at least 2 texts, got {len(outputs)} items"]
        for i, ranks in enumerate(rankings, start=1):
            if not isinstance(ranks, list) or len(ranks) != len(outputs):
                return [f"field 'rankings' item {i} should be a list of {len(outputs)} ranks, one per output"]
            if not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= len(outputs) for r in ranks):
                return [f"field 'rankings' item {i}: ranks are whole numbers from 1 (best) to {len(outputs)}"]
        return _agreement_problems(row.get("agreement"))

    def convert(self, row: dict) -> dict:
        agreement = row.get("agreement")
        return {"prompt": chat_prompt(row["prompt"]), "outputs": [o.strip() for o in row["outputs"]],
                "rankings": [list(r) for r in row["rankings"]], "agreement": None if agreement is None else float(agreement)}


@dataclass(frozen=True)
class ReviewRatings(_ReviewRows):
    name: str = "ratings"
    columns = ("prompt", "completion", "label")

    @property
    def required(self) -> dict[str, type]:
        return {"completion": str}

    def feedback_problems(self, row: dict) -> list[str]:
        if not isinstance(row.get("label"), bool):
            return [f"field 'label' should be true (desirable) or false, got {row.get('label')!r}"]
        return []

    def convert(self, row: dict) -> dict:
        return {"prompt": chat_prompt(row["prompt"]), "completion": [{"role": "assistant", "content": row["completion"].strip()}],
                "label": row["label"]}


FORMATS.update({fmt.name: fmt for fmt in (ReviewRankings(), ReviewRatings())})
