"""Data formats: turn one raw dataset row into a chat *example* `{"messages": [...]}`.

Every example ends with an assistant turn (the completion, where the loss goes), so the rest of
the pipeline never needs to know which dataset it came from. `problems` and `convert` are kept
apart so that every row can be checked (and reported by file/line/field) before any of them is
converted. Formats are frozen dataclasses: `convert` is then a picklable, deterministic bound
method, which `datasets.Dataset.map` can fingerprint (cache) and ship to worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from tunelab.errors import TunelabError

ROLES = ("system", "user", "assistant")
TOOL_ROLES = (*ROLES, "tool")
SAMSUM_TEMPLATE = "Summarize this dialogue:\n\n{}"
CNN_DAILYMAIL_TEMPLATE = "Summarize this news article in a few sentences:\n\n{}"
GUANACO_TURN = re.compile(r"### (Human|Assistant):")
SPEAKER_ROLES = {"Human": "user", "Assistant": "assistant"}
_TYPE_NAMES = {str: "string", list: "list", (list, str): "list or a JSON string"}


class Format:
    """Base: checks the declared fields' presence and types; subclasses build the messages."""

    name: str
    required: dict[str, type]
    optional: dict[str, type]
    columns: tuple[str, ...] = ("messages",)
    """The keys `convert` returns: chat examples, or `PREFERENCE_COLUMNS` for preference pairs."""

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
class PromptCompletion(Format):
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


def split_turns(marker: re.Pattern, text: str) -> list[tuple[str, str]]:
    """(speaker, content) pairs of a transcript whose turns start with `marker` (one group: the
    speaker); text before the first marker becomes a ('', text) pair."""
    parts = marker.split(text)
    head = [("", parts[0].strip())] if parts[0].strip() else []
    return head + [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


@dataclass(frozen=True)
class Guanaco(Format):
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
        return split_turns(GUANACO_TURN, row[self.text])

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
        return {"messages": [{"role": SPEAKER_ROLES[s], "content": content} for s, content in self.turns(row)]}


def message_problems(column: str, messages: list, last_role: str) -> list[str]:
    """The first problem of a list of {role, content} dicts that must end on a `last_role` turn."""
    field = f"field '{column}'"
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return [f"{field} item {i} should be a {{role, content}} object, got {type(message).__name__}"]
        if message.get("role") not in ROLES:
            tools = " (tool turns: data.format=messages)" if message.get("role") == "tool" else ""
            return [f"{field} item {i} has role {message.get('role')!r}; allowed: {', '.join(ROLES)}{tools}"]
        content = message.get("content")
        if not isinstance(content, str):
            return [f"{field} item {i} content should be a string, got {type(content).__name__}"]
        if not content.strip():
            return [f"{field} item {i} has empty content"]
    if messages[-1]["role"] != last_role:
        return [f"{field} does not end with {'an' if last_role == 'assistant' else 'a'} {last_role} message"]
    return []


def without_nulls(value: object) -> object:
    """`value` without the dict keys that are null, at any depth. Tool arguments and definitions that
    come as Arrow structs (a Hub dataset, `Dataset.from_list`) carry the union of every row's keys,
    the missing ones null (one schema per column); a template would print those nulls. JSON-string
    arguments (OpenAI's own form) are kept as written."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


@dataclass(frozen=True)
class PlainMessages(Format):
    """A column that already holds the conversation as a list of {role, content} dicts, without
    tool turns (custom with {messages: column}; tool calls: the `messages` format)."""

    name: str
    column: str

    @property
    def required(self) -> dict[str, type]:
        return {self.column: list}

    @property
    def optional(self) -> dict[str, type]:
        return {}

    def content_problems(self, row: dict) -> list[str]:
        return message_problems(self.column, row[self.column], last_role="assistant")

    def convert(self, row: dict) -> dict:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row[self.column]]}


def tool_calls_json(calls: object, where: str) -> str:
    """OpenAI tool calls ([{type, function: {name, arguments}}], or [{name, arguments}]; arguments a
    dict or a JSON string; one call may come alone) → the JSON string of [{name, arguments: dict}]
    that examples store (Arrow needs one type per column; templates get dicts, see templates._message)."""
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for k, call in enumerate(calls, start=1):
        call = call.get("function", call) if isinstance(call, dict) else call
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            raise ValueError(f"{where} tool call {k} has no function name")
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise ValueError(f"{where} tool call {k} ({call['name']}): arguments are not valid JSON") from None
        elif isinstance(arguments, dict):
            arguments = without_nulls(arguments)
        if not isinstance(arguments, dict):
            raise ValueError(f"{where} tool call {k} ({call['name']}): arguments should be an object")
        out.append({"name": call["name"], "arguments": arguments})
    return json.dumps(out, ensure_ascii=False)


def tools_json(tools: object, column: str) -> str | None:
    """A row's tool definitions (a list of JSON schemas, or that list as a JSON string) as a JSON string."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise ValueError(f"field '{column}' is not valid JSON") from None
    else:
        tools = without_nulls(tools)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"field '{column}' should be a list of tool definitions (JSON schema objects)")
    return json.dumps(tools, ensure_ascii=False)


def conversation_problems(column: str, messages: list[dict]) -> list[str]:
    """The first problem of a converted conversation with tool turns: it must end on an assistant
    turn, and a tool result must answer an assistant's tool call."""
    field = f"field '{column}'"
    for i, m in enumerate(messages):
        if m["role"] == "tool" and (i == 0 or not (messages[i - 1]["tool_calls"] or messages[i - 1]["role"] == "tool")):
            return [f"{field} turn {i + 1} is a tool result that follows no tool call"]
        if m["role"] != "assistant" and not m["content"].strip():
            return [f"{field} turn {i + 1} has empty content"]
        if m["role"] == "assistant" and not (m["content"].strip() or m["tool_calls"]):
            return [f"{field} turn {i + 1} is an empty assistant turn (no content, no tool call)"]
    if messages[-1]["role"] != "assistant":
        return [f"{field} does not end with an assistant message"]
    return []


@dataclass(frozen=True)
class Conversation(Format):
    """A column that holds a whole conversation, with tool calls and results; `tools`: an optional
    column with the tool definitions. Subclasses read one turn (`turn`)."""

    columns = ("messages", "tools")
    """Each message is {role, content, tool_calls} (tool_calls: None or a JSON string), the same keys in
    every row, so Arrow keeps one schema; `tools` is None or a JSON string."""

    @property
    def required(self) -> dict[str, type]:
        return {self.column: list}

    @property
    def optional(self) -> dict[str, type]:
        return {self.tools: (list, str)} if self.tools else {}

    def turn(self, item: object, where: str) -> dict:
        raise NotImplementedError

    def messages(self, row: dict) -> list[dict]:
        """The row's turns as messages; ValueError names the first bad turn."""
        turns = row[self.column]
        if not turns:
            raise ValueError(f"field '{self.column}' is empty")
        return [self.turn(item, f"field '{self.column}' item {i}") for i, item in enumerate(turns, start=1)]

    def content_problems(self, row: dict) -> list[str]:
        try:
            messages = self.messages(row)
            tools_json(row.get(self.tools), self.tools) if self.tools else None
        except ValueError as e:
            return [str(e)]
        return conversation_problems(self.column, messages)

    def convert(self, row: dict) -> dict:
        return {"messages": self.messages(row), "tools": tools_json(row.get(self.tools), self.tools) if self.tools else None}


@dataclass(frozen=True)
class Messages(Conversation):
    """OpenAI chat `messages`: {role, content} dicts, roles system/user/assistant/tool; an assistant
    turn may carry `tool_calls` (content then may be null)."""

    name: str = "messages"
    column: str = "messages"
    tools: str | None = "tools"

    def turn(self, item: object, where: str) -> dict:
        if not isinstance(item, dict):
            raise ValueError(f"{where} should be a {{role, content}} object, got {type(item).__name__}")
        role, content, calls = item.get("role"), item.get("content"), item.get("tool_calls")
        if role not in TOOL_ROLES:
            raise ValueError(f"{where} has role {role!r}; allowed: {', '.join(TOOL_ROLES)}")
        if calls and role != "assistant":
            raise ValueError(f"{where}: only assistant turns make tool calls (role {role!r})")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"{where} content should be a string, got {type(content).__name__}")
        return {"role": role, "content": content, "tool_calls": tool_calls_json(calls, where) if calls else None}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool", "function_call": "assistant"}


@dataclass(frozen=True)
class ShareGPT(Conversation):
    """ShareGPT `conversations`: {from, value} turns with the roles human, gpt, system and tool
    (`observation` as LLaMA-Factory writes it); a `function_call` turn is an assistant's tool call
    whose value is the JSON call {name, arguments} (or a list of them). `system`: an optional column
    with the system prompt."""

    name: str = "sharegpt"
    column: str = "conversations"
    role: str = "from"
    content: str = "value"
    tools: str | None = "tools"
    system: str | None = "system"

    @property
    def optional(self) -> dict[str, type]:
        return {**super().optional, **({self.system: str} if self.system else {})}

    def turn(self, item: object, where: str) -> dict:
        if not isinstance(item, dict):
            raise ValueError(f"{where} should be a {{{self.role}, {self.content}}} object, got {type(item).__name__}")
        speaker, value = item.get(self.role), item.get(self.content)
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"{where} has {self.role} {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise ValueError(f"{where} {self.content} should be a string, got {type(value).__name__}")
        if speaker == "function_call":
            try:
                call = json.loads(value)
            except ValueError:
                raise ValueError(f"{where} is a function_call whose {self.content} is not JSON") from None
            return {"role": "assistant", "content": "", "tool_calls": tool_calls_json(call, where)}
        return {"role": SHAREGPT_ROLES[speaker], "content": value.strip(), "tool_calls": None}

    def messages(self, row: dict) -> list[dict]:
        messages = super().messages(row)
        system = (row.get(self.system) or "").strip() if self.system else ""
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system, "tool_calls": None}, *messages]
        return messages


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ASSISTANT = "\n\nAssistant:"


def preference_pair(prompt: list[dict], chosen: str, rejected: str) -> dict:
    """trl's conversational preference shape: the prompt's messages (ending on a user turn) and
    each answer as one assistant message, so the model's own chat template renders all three."""
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _identical(row: dict, chosen: str, rejected: str) -> list[str]:
    if row[chosen].strip() == row[rejected].strip():
        return [f"fields '{chosen}' and '{rejected}' are identical (nothing to prefer)"]
    return []


@dataclass(frozen=True)
class PromptPreference(Format):
    """[system?] + user prompt, a chosen and a rejected answer, one column each (orca_dpo, custom)."""

    name: str
    prompt: str
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str | None = None
    columns = PREFERENCE_COLUMNS

    @property
    def required(self) -> dict[str, type]:
        return {self.prompt: str, self.chosen: str, self.rejected: str}

    @property
    def optional(self) -> dict[str, type]:
        return {self.system: str} if self.system else {}

    def content_problems(self, row: dict) -> list[str]:
        return _identical(row, self.chosen, self.rejected)

    def convert(self, row: dict) -> dict:
        system = (row.get(self.system) or "").strip() if self.system else ""
        prompt = [{"role": "system", "content": system}] if system else []
        prompt.append({"role": "user", "content": row[self.prompt].strip()})
        return preference_pair(prompt, row[self.chosen].strip(), row[self.rejected].strip())


@dataclass(frozen=True)
class HhRlhf(Format):
    """Anthropic HH-RLHF: `chosen` and `rejected` are whole `\n\nHuman: …\n\nAssistant: …` transcripts.

    The prompt is their shared prefix, cut back to the last `\n\nAssistant:` inside it; the rest
    of each transcript is the answer. (Cutting at each transcript's own last marker would be wrong
    for the few rows whose answer itself contains an `Assistant:` line.) An empty answer is kept:
    in this data, saying nothing is sometimes the preferred reply.
    """

    name: str = "hh_rlhf"
    chosen: str = "chosen"
    rejected: str = "rejected"
    columns = PREFERENCE_COLUMNS

    @property
    def required(self) -> dict[str, type]:
        return {self.chosen: str, self.rejected: str}

    @property
    def optional(self) -> dict[str, type]:
        return {}

    def split(self, row: dict) -> tuple[str, str, str] | None:
        """(prompt transcript, chosen answer, rejected answer), or None without a shared prompt."""
        chosen, rejected = row[self.chosen], row[self.rejected]
        shared = chosen[: next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                               min(len(chosen), len(rejected)))]
        cut = shared.rfind(HH_ASSISTANT)
        if cut < 0:
            return None
        answer = cut + len(HH_ASSISTANT)
        return chosen[:cut], chosen[answer:].strip(), rejected[answer:].strip()

    def content_problems(self, row: dict) -> list[str]:
        if problems := _identical(row, self.chosen, self.rejected):
            return problems
        split = self.split(row)
        if split is None:
            return [f"fields '{self.chosen}' and '{self.rejected}' share no prompt (they differ before the "
                    "first '\n\nAssistant:')"]
        turns = split_turns(HH_TURN, split[0])
        if not turns or turns[0][0] != "Human":
            return [f"field '{self.chosen}' does not start with a '\n\nHuman:' turn"]
        if turns[-1][0] != "Human":
            return [f"field '{self.chosen}': the turn before the answers is not a '\n\nHuman:' turn"]
        return []

    def convert(self, row: dict) -> dict:
        prompt, chosen, rejected = self.split(row)
        return preference_pair([{"role": SPEAKER_ROLES[s], "content": c} for s, c in split_turns(HH_TURN, prompt)],
                               chosen, rejected)


@dataclass(frozen=True)
class ReviewExport(Format):
    """What `tunelab review export` writes: `prompt` (text, or a list of {role, content} ending on a
    user turn), `chosen`, `rejected`, and the reviewers' `agreement` (0-1 or null) and `n_reviewers`."""

    name: str = "preferences"
    columns = (*PREFERENCE_COLUMNS, "agreement")

    @property
    def required(self) -> dict[str, type]:
        return {"chosen": str, "rejected": str}

    @property
    def optional(self) -> dict[str, type]:
        return {}

    def content_problems(self, row: dict) -> list[str]:
        prompt, agreement, reviewers = row.get("prompt"), row.get("agreement"), row.get("n_reviewers")
        if prompt is None:
            return ["field 'prompt' is missing"]
        if isinstance(prompt, list):
            problems = message_problems("prompt", prompt, last_role="user") if prompt else ["field 'prompt' is empty"]
            if problems:
                return problems
        elif not isinstance(prompt, str):
            return [f"field 'prompt' should be a string or a list of {{role, content}}, got {type(prompt).__name__}"]
        elif not prompt.strip():
            return ["field 'prompt' is empty"]
        if agreement is not None and (isinstance(agreement, bool) or not isinstance(agreement, (int, float))
                                      or not -1 <= agreement <= 1):
            return [f"field 'agreement' should be a number from -1 to 1 or null, got {agreement!r}"]
        if reviewers is not None and (isinstance(reviewers, bool) or not isinstance(reviewers, int) or reviewers < 1):
            return [f"field 'n_reviewers' should be a whole number >= 1, got {reviewers!r}"]
        return _identical(row, "chosen", "rejected")

    def convert(self, row: dict) -> dict:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt.strip()}]
        else:
            prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        agreement = row.get("agreement")
        return {**preference_pair(prompt, row["chosen"].strip(), row["rejected"].strip()),
                "agreement": None if agreement is None else float(agreement)}


FORMATS: dict[str, Format] = {
    fmt.name: fmt
    for fmt in (
        PromptCompletion("samsum", prompt="dialogue", completion="summary", template=SAMSUM_TEMPLATE),
        PromptCompletion("cnn_dailymail", prompt="article", completion="highlights", template=CNN_DAILYMAIL_TEMPLATE),
        PromptCompletion("openorca", prompt="question", completion="response", system="system_prompt"),
        Guanaco(),
        Alpaca(),
        ShareGPT(),
        Messages(),
        HhRlhf(),
        PromptPreference("orca_dpo", prompt="question", system="system"),
        ReviewExport(),
    )
}
"""The fixed formats by name; `custom` is built per config by `custom_format`."""


def custom_format(fields: dict[str, str] | None) -> Format:
    """`{prompt, completion, system?}` or `{messages}` mapping the format's keys to the data's columns."""
    keys = set(fields or {})
    if keys == {"messages"}:
        return PlainMessages("custom", column=fields["messages"])
    if keys == {"messages", "tools"}:
        return Messages("custom", column=fields["messages"], tools=fields["tools"])
    if {"prompt", "completion"} <= keys <= {"prompt", "completion", "system"}:
        return PromptCompletion("custom", fields["prompt"], fields["completion"], system=fields.get("system"))
    if {"prompt", "chosen", "rejected"} <= keys <= {"prompt", "chosen", "rejected", "system"}:
        return PromptPreference("custom", fields["prompt"], fields["chosen"], fields["rejected"], fields.get("system"))
    raise TunelabError(
        f"data.fields: {fields!r} is not usable for the custom format; give either "
        "{prompt: <column>, completion: <column>} with an optional system: <column>, "
        "or {messages: <column holding a list of {role, content}>} with an optional tools: <column>, "
        "or for preference pairs {prompt: <column>, chosen: <column>, rejected: <column>} (optional system)"
    )


RENAMABLE = {
    "sharegpt": {"conversations": "column", "from": "role", "value": "content", "tools": "tools", "system": "system"},
    "messages": {"messages": "column", "tools": "tools"},
}
"""The keys that data.fields may rename, per format: {key as the format names it: attribute}."""


def get_format(name: str, fields: dict[str, str] | None = None) -> Format:
    """The format called `name`; `fields` is the column mapping of `custom`, or other key names for
    `sharegpt` and `messages` (RENAMABLE)."""
    if name == "custom":
        return custom_format(fields)
    if name not in FORMATS:
        raise TunelabError(f"data.format: unknown format '{name}'; choose one of {', '.join([*FORMATS, 'custom'])}")
    if fields and name in RENAMABLE:
        unknown = set(fields) - set(RENAMABLE[name])
        if unknown:
            raise TunelabError(f"data.fields: {name} renames only {', '.join(RENAMABLE[name])}; "
                               f"not {', '.join(sorted(unknown))}")
        return dataclasses.replace(FORMATS[name], **{RENAMABLE[name][key]: column for key, column in fields.items()})
    if fields:
        raise TunelabError(f"data.fields: only used by data.format=custom, sharegpt and messages, not by '{name}'; "
                           "remove it")
    return FORMATS[name]
