"""Render examples through the chat template and mark which tokens carry the loss.

Assistant spans are found in the rendered *text* (each turn's prefix rendered with and without
the generation prompt) and mapped to tokens with the fast tokenizer's offsets, so the labels
are right for any template without re-tokenizing pieces (pieces tokenize differently at their
seams than the whole string does). Tool calls and tool results go through the template's own
tool support (`tools=` and `tool_calls`), never through a format of ours.

`model.chat_template` replaces a model's template with one of `chat_templates/*.jinja` or a
user's file (`use_chat_template`); the tokenizer is saved with it, so every later command
renders the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

IGNORE_INDEX = -100  # labels with this value carry no loss (PyTorch cross_entropy's ignore_index)
TEMPLATE_DIR = Path(__file__).with_name("chat_templates")
CHAT_TEMPLATES = ("chatml", "llama-2", "llama-3")
"""Built-in `model.chat_template` names: `chat_templates/<name>.jinja`."""
TEMPLATE_TOKENS = {
    "chatml": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama-3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "llama-2": ([], None),
}
"""Per built-in template: the special tokens it writes, and the token that ends an assistant turn
(None: the tokenizer's own EOS)."""
TRAIN_ON = ("assistant", "last_assistant", "completion", "all")


def chat_template_text(name: str) -> str:
    """The Jinja source of a built-in template or of a `.jinja` file."""
    path = TEMPLATE_DIR / f"{name}.jinja" if name in CHAT_TEMPLATES else Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.chat_template: {name}: no such file")
    return path.read_text(encoding="utf-8")


def use_chat_template(tokenizer, name: str) -> list[str]:
    """Give `tokenizer` the template `name`; returns the special tokens it had to add.

    A built-in template's markers become special tokens where the vocabulary lacks them (one token
    each, never split into text pieces), and its end-of-turn token becomes the EOS, so generation
    stops where training's answers ended (inference stops on the tokenizer's EOS too).
    """
    tokenizer.chat_template = chat_template_text(name)
    specials, end_of_turn = TEMPLATE_TOKENS.get(name, ([], None))
    vocab = tokenizer.get_vocab()
    added = [t for t in specials if t not in vocab]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    if end_of_turn and tokenizer.eos_token != end_of_turn:
        tokenizer.eos_token = end_of_turn
    return added


def _message(message: dict) -> dict:
    """A stored message as templates expect it: no keys left null by Arrow's shared schema, and
    `tool_calls` (stored as a JSON string of [{name, arguments}]) as OpenAI-style function calls."""
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("tool_calls"), str):
        out["tool_calls"] = [{"type": "function", "function": call} for call in json.loads(out["tool_calls"])]
    return out


def _tools(tools) -> list | None:
    return json.loads(tools) if isinstance(tools, str) else tools


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> str:
    return tokenizer.apply_chat_template([_message(m) for m in messages], tools=_tools(tools), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer, messages: list[dict], tools=None) -> str:
    """The prompt a model sees at inference: every turn before the last, plus the assistant header."""
    return render(tokenizer, messages[:-1], add_generation_prompt=True, tools=tools)


def uses_tools(messages: list[dict], tools=None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_lookup", "description": "probe tool description",
    "parameters": {"type": "object", "properties": {"probe_query": {"type": "string"}}}}}]
_PROBE = [
    {"role": "user", "content": "probe question"},
    {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "probe_lookup",
                                                                     "arguments": {"probe_query": "probe value"}}])},
    {"role": "tool", "content": "probe result"},
    {"role": "assistant", "content": "probe answer"},
]
_tool_support: dict[str, str | None] = {}


def tool_support_problem(tokenizer) -> str | None:
    """What the chat template fails to render of a tool conversation (definitions, calls, results),
    or None when it renders all of it. Checked once per template."""
    template = tokenizer.chat_template or ""
    if template not in _tool_support:
        try:
            text = render(tokenizer, _PROBE, tools=_PROBE_TOOLS)
        except Exception as e:  # noqa: BLE001 - a template may raise on any role it does not know
            _tool_support[template] = f"it fails on a tool conversation ({type(e).__name__}: {e})"
        else:
            missing = [what for what, mark in (("tool definitions", "probe tool description"),
                                               ("tool calls", "probe value"), ("tool results", "probe result"))
                       if mark not in text]
            _tool_support[template] = f"it renders no {', no '.join(missing)}" if missing else None
    return _tool_support[template]


def assistant_spans(tokenizer, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int, int]]]:
    """Full rendered text and (message index, start, end) character spans of each assistant turn
    (content + end-of-turn tokens)."""
    full = render(tokenizer, messages, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools))
        upto = render(tokenizer, messages[: i + 1], tools=tools)
        if not full.startswith(upto) or start > len(upto):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; "
                "set data.train_on=all for this model, or model.chat_template to one that does"
            )
        spans.append((i, start, len(upto)))
    return full, spans


def trained_spans(messages: list[dict], spans: list[tuple[int, int, int]], train_on: str) -> list[tuple[int, int]]:
    """The character spans that carry the loss under `data.train_on` (see DataConfig.train_on)."""
    if train_on == "last_assistant":
        spans = spans[-1:]
    elif train_on == "completion":
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        spans = [s for s in spans if s[0] > last_user]
    return [(start, end) for _i, start, end in spans]


def _needs_bos(tokenizer, text: str) -> bool:
    bos = tokenizer.bos_token
    if bos is None or text.startswith(bos):
        return False
    return tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]  # the tokenizer adds BOS by default


def tokenize_example(tokenizer, messages: list[dict], train_on: str | bool = "assistant", tools=None) -> dict:
    """→ {input_ids, labels}: labels equal input_ids on the tokens `train_on` chooses, IGNORE_INDEX
    elsewhere. `all`: every token except a leading BOS. (True/False: the old completion-only switch,
    i.e. assistant/all.)"""
    train_on = {True: "assistant", False: "all"}.get(train_on, train_on)
    if uses_tools(messages, tools) and (problem := tool_support_problem(tokenizer)):
        raise ValueError(f"the rows have tool calls, but the chat template cannot show them: {problem}; set "
                         "model.chat_template=chatml or llama-3 (both render tools), or a .jinja file that does")
    if train_on == "all":
        full, spans = render(tokenizer, messages, tools=tools), None
    else:
        full, turns = assistant_spans(tokenizer, messages, tools)
        spans = trained_spans(messages, turns, train_on)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if spans is None:
        labels = list(ids)
    else:
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX for tok, (start, _end) in zip(ids, offsets)]
    if _needs_bos(tokenizer, full):
        ids = [tokenizer.bos_token_id] + ids
        labels = [IGNORE_INDEX] + labels
    return {"input_ids": ids, "labels": labels}


def tokenize_within(tokenizer, messages: list[dict], max_length: int, train_on: str | bool = "assistant",
                    tools=None) -> dict | None:
    """Tokenize, shortening the longest user turn until the sample fits (then `truncated` is 1);
    None when even that fails.

    Cutting the *prompt* keeps the completion whole: for summarization the reference must stay
    intact, while the end of a long article can go (cutting the end of the sequence would cut
    the very tokens the model should learn).
    """
    out = tokenize_example(tokenizer, messages, train_on, tools)
    out["truncated"] = 0
    for _ in range(4):  # each pass removes the measured excess (+ slack for re-tokenization seams)
        excess = len(out["input_ids"]) - max_length
        if excess <= 0:
            return out
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            return None
        longest = max(users, key=lambda i: len(messages[i]["content"]))
        ids = tokenizer(messages[longest]["content"], add_special_tokens=False)["input_ids"]
        if len(ids) <= excess:
            return None
        messages = [*messages[:longest], {**messages[longest], "content": tokenizer.decode(ids[: -(excess + 8)])},
                    *messages[longest + 1 :]]
        out = {**tokenize_example(tokenizer, messages, train_on, tools), "truncated": 1}
    return out if len(out["input_ids"]) <= max_length else None
