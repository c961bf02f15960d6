"""Render examples through the model's own chat template and mark which tokens carry the loss.

Assistant spans are found in the rendered *text* (each turn's prefix rendered with and without
the generation prompt) and mapped to tokens with the fast tokenizer's offsets, so the labels
are right for any template without re-tokenizing pieces (pieces tokenize differently at their
seams than the whole string does).
"""

from __future__ import annotations

IGNORE_INDEX = -100  # labels with this value carry no loss (PyTorch cross_entropy's ignore_index)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The prompt a model sees at inference: every turn before the last, plus the assistant header."""
    return render(tokenizer, messages[:-1], add_generation_prompt=True)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans of each assistant turn (content + end-of-turn tokens)."""
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or start > len(upto):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; "
                "set data.completion_only_loss=false for this model"
            )
        spans.append((start, len(upto)))
    return full, spans


def _needs_bos(tokenizer, text: str) -> bool:
    bos = tokenizer.bos_token
    if bos is None or text.startswith(bos):
        return False
    return tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]  # the tokenizer adds BOS by default


def tokenize_example(tokenizer, messages: list[dict], completion_only: bool = True) -> dict:
    """→ {input_ids, labels}: labels equal input_ids on assistant turns, IGNORE_INDEX elsewhere.

    With completion_only=False every token except a leading BOS carries the loss.
    """
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if completion_only:
        labels = [
            tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for tok, (start, _end) in zip(ids, offsets)
        ]
    else:
        labels = list(ids)
    if _needs_bos(tokenizer, full):
        ids = [tokenizer.bos_token_id] + ids
        labels = [IGNORE_INDEX] + labels
    return {"input_ids": ids, "labels": labels}


def tokenize_within(tokenizer, messages: list[dict], max_length: int, completion_only: bool = True) -> dict | None:
    """Tokenize, shortening the longest user turn until the sample fits (then `truncated` is 1);
    None when even that fails.

    Cutting the *prompt* keeps the completion whole: for summarization the reference must stay
    intact, while the end of a long article can go (cutting the end of the sequence would cut
    the very tokens the model should learn).
    """
    out = tokenize_example(tokenizer, messages, completion_only)
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
        out = {**tokenize_example(tokenizer, messages, completion_only), "truncated": 1}
    return out if len(out["input_ids"]) <= max_length else None
