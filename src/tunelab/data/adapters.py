"""Adapters: turn one raw dataset row into a chat *example* `{"messages": [...]}`.

Every example ends with an assistant turn (the completion, where the loss goes), so the rest of
the pipeline never needs to know which dataset it came from. `problems` and `convert` are kept
apart so that every row can be checked (and reported by file/line/field) before any of them is
converted. Adapters are frozen dataclasses: `convert` is then a picklable, deterministic bound
method, which `datasets.Dataset.map` can fingerprint (cache) and ship to worker processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunelab.errors import TunelabError

ROLES = ("system", "user", "assistant")
SAMSUM_TEMPLATE = "Summarize this dialogue:\n\n{}"
CNN_DAILYMAIL_TEMPLATE = "Summarize this news article in a few sentences:\n\n{}"
GUANACO_TURN = re.compile(r"### (Human|Assistant):")
_TYPE_NAMES = {str: "string", list: "list"}


class Adapter:
    """Base: checks the declared fields' presence and types; subclasses build the messages."""

    name: str
    required: dict[str, type]
    optional: dict[str, type]

    def problems(self, row: dict) -> list[str]:
        """Short messages naming the field, one per problem; empty when `convert` will succeed."""
        found = []
        for field, kind in {**self.required, **self.optional}.items():
            value = row.get(field)
            if value is None:
                if field in self.required:
                    found.append(f"field '{field}' is missing")
            elif not isinstance(value, kind):
                found.append(f"field '{field}' should be a {_TYPE_NAMES[kind]}, got {type(value).__name__}")
            elif field in self.required and not (value.strip() if kind is str else value):
                found.append(f"field '{field}' is empty")
        return found or self.content_problems(row)

    def content_problems(self, row: dict) -> list[str]:
        """Problems beyond presence and type (only asked once those are fine)."""
        return []

    def convert(self, row: dict) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class PromptCompletion(Adapter):
    """[system?] + user + assistant from one column each; `template` wraps the prompt text."""

    name: str
    prompt: str
    completion: str
    system: str | None = None
    template: str = "{}"

    @property
    def required(self) -> dict[str, type]:
        return {self.prompt: str, self.completion: str}

    @property
    def optional(self) -> dict[str, type]:
        return {self.system: str} if self.system else {}

    def user_content(self, row: dict) -> str:
        return self.template.format(row[self.prompt].strip())

    def convert(self, row: dict) -> dict:
        system = (row.get(self.system) or "").strip() if self.system else ""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": self.user_content(row)})
        messages.append({"role": "assistant", "content": row[self.completion].strip()})
        return {"messages": messages}


@dataclass(frozen=True)
class Alpaca(PromptCompletion):
    """Alpaca's optional `input` (the context the instruction refers to) follows the instruction."""

    name: str = "alpaca"
    prompt: str = "instruction"
    completion: str = "output"
    context: str = "input"

    @property
    def optional(self) -> dict[str, type]:
        return {self.context: str}

    def user_content(self, row: dict) -> str:
        context = (row.get(self.context) or "").strip()
        instruction = row[self.prompt].strip()
        return f"{instruction}\n\n{context}" if context else instruction


@dataclass(frozen=True)
class Guanaco(Adapter):
    """OASST Guanaco text: `### Human: …### Assistant: …`, repeated, with no separator between turns."""

    name: str = "guanaco"
    text: str = "text"

    @property
    def required(self) -> dict[str, type]:
        return {self.text: str}

    @property
    def optional(self) -> dict[str, type]:
        return {}

    def turns(self, row: dict) -> list[tuple[str, str]]:
        """(speaker, content) pairs; text before the first marker becomes a ('', text) pair."""
        parts = GUANACO_TURN.split(row[self.text])
        head = [("", parts[0].strip())] if parts[0].strip() else []
        return head + [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]

    def content_problems(self, row: dict) -> list[str]:
        turns = self.turns(row)
        field = f"field '{self.text}'"
        if not turns or turns[0][0] != "Human":
            return [f"{field} does not start with a '### Human:' turn"]
        if turns[-1][0] != "Assistant":
            return [f"{field} does not end with an '### Assistant:' turn"]
        for i, (speaker, content) in enumerate(turns):
            if speaker != ("Human", "Assistant")[i % 2]:
                return [f"{field} has two '### {speaker}:' turns in a row (turn {i + 1})"]
            if not content:
                return [f"{field} has an empty '### {speaker}:' turn (turn {i + 1})"]
        return []

    def convert(self, row: dict) -> dict:
        role = {"Human": "user", "Assistant": "assistant"}
        return {"messages": [{"role": role[speaker], "content": content} for speaker, content in self.turns(row)]}


@dataclass(frozen=True)
class Messages(Adapter):
    """A column that already holds the conversation as a list of {role, content} dicts."""

    name: str
    column: str

    @property
    def required(self) -> dict[str, type]:
        return {self.column: list}

    @property
    def optional(self) -> dict[str, type]:
        return {}

    def content_problems(self, row: dict) -> list[str]:
        field = f"field '{self.column}'"
        for i, message in enumerate(row[self.column], start=1):
            if not isinstance(message, dict):
                return [f"{field} item {i} should be a {{role, content}} object, got {type(message).__name__}"]
            if message.get("role") not in ROLES:
                return [f"{field} item {i} has role {message.get('role')!r}; allowed: {', '.join(ROLES)}"]
            content = message.get("content")
            if not isinstance(content, str):
                return [f"{field} item {i} content should be a string, got {type(content).__name__}"]
            if not content.strip():
                return [f"{field} item {i} has empty content"]
        if row[self.column][-1]["role"] != "assistant":
            return [f"{field} does not end with an assistant message"]
        return []

    def convert(self, row: dict) -> dict:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row[self.column]]}


ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        PromptCompletion("samsum", prompt="dialogue", completion="summary", template=SAMSUM_TEMPLATE),
        PromptCompletion("cnn_dailymail", prompt="article", completion="highlights", template=CNN_DAILYMAIL_TEMPLATE),
        PromptCompletion("openorca", prompt="question", completion="response", system="system_prompt"),
        Guanaco(),
        Alpaca(),
    )
}
"""The fixed adapters by name; `custom` is built per config by `custom_adapter`."""


def custom_adapter(fields: dict[str, str] | None) -> Adapter:
    """`{prompt, completion, system?}` or `{messages}` mapping adapter keys to the data's columns."""
    keys = set(fields or {})
    if keys == {"messages"}:
        return Messages("custom", column=fields["messages"])
    if {"prompt", "completion"} <= keys <= {"prompt", "completion", "system"}:
        return PromptCompletion("custom", fields["prompt"], fields["completion"], system=fields.get("system"))
    raise TunelabError(
        f"data.fields: {fields!r} is not usable for the custom adapter; give either "
        "{prompt: <column>, completion: <column>} with an optional system: <column>, "
        "or {messages: <column holding a list of {role, content}>}"
    )


def get_adapter(name: str, fields: dict[str, str] | None = None) -> Adapter:
    """The adapter called `name`; `fields` is the column mapping that only `custom` takes."""
    if name == "custom":
        return custom_adapter(fields)
    if name not in ADAPTERS:
        raise TunelabError(f"data.adapter: unknown adapter '{name}'; choose one of {', '.join([*ADAPTERS, 'custom'])}")
    if fields:
        raise TunelabError(f"data.fields: only used by data.adapter=custom, not by '{name}'; remove it")
    return ADAPTERS[name]
