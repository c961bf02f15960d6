"""The pad token, chosen so that the vocabulary stays the base model's whenever it can.

A dedicated pad token, never EOS (padding would then mask real EOS labels and the model would
never learn to stop). Adding a new one grows the vocabulary, and then the adapter must carry the
resized embedding and output layers (hundreds of MB for one row nobody trains) and plain
`PeftModel.from_pretrained(base, adapter)` fails on the shape. So a special token the tokenizer
already has and the chat template never writes is reused first — Llama-3.1's
`<|finetune_right_pad_id|>`, reserved tokens, `<unk>` (Llama 2, Mistral), an unused special token
(SmolLM2's code-model markers) — and a new `<|pad|>` is added only when there is none. That a
reused token occurs in no training sample is checked when the data is tokenized.
"""

from __future__ import annotations

import re
from pathlib import Path

PAD_TOKEN = "<|pad|>"
"""Added only when the tokenizer has no special token to spare."""
PREFERRED = re.compile(r"pad|reserved|unused", re.IGNORECASE)
PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def template_tokens(tokenizer) -> str:
    """Text the chat template writes around a conversation (its markers), '' without a template."""
    if not tokenizer.chat_template:
        return ""
    try:
        return tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 — a template that refuses the probe (e.g. no system role) marks nothing
        return tokenizer.apply_chat_template(PROBE[1:], tokenize=False, add_generation_prompt=True)


def spare_special_token(tokenizer, stop_ids: set[int] = frozenset()) -> str | None:
    """A special token that is not BOS/EOS/a stop id and that the chat template never writes, or None.
    Tokens named pad/reserved/unused come first, then a real `<unk>` (not GPT-2's `<|endoftext|>`,
    a document end the base model predicts), then the other added special tokens, latest first."""
    used = template_tokens(tokenizer)
    taken = {tokenizer.bos_token_id, tokenizer.eos_token_id, *stop_ids}
    added = [(i, t.content) for i, t in sorted(tokenizer.added_tokens_decoder.items(), reverse=True) if t.special]
    unk = tokenizer.unk_token
    ranked = [c for c in added if PREFERRED.search(c[1])]
    ranked += [(tokenizer.unk_token_id, unk)] if unk and "unk" in unk.lower() else []
    ranked += [c for c in added if "endoftext" not in c[1]]
    for token_id, text in ranked:
        if token_id not in taken and text not in used:
            return text
    return None


def set_pad_token(tokenizer, stop_ids: set[int] = frozenset()) -> bool:
    """Give the tokenizer a pad token that is not EOS; True when a new token had to be added."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id not in {tokenizer.eos_token_id, *stop_ids}:
        return False
    spare = spare_special_token(tokenizer, stop_ids)
    if spare is not None:
        tokenizer.pad_token = spare
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def generation_stop_ids(model_path: str) -> set[int]:
    """The EOS ids a local model folder's generation_config.json lists (chat models may list
    several), so the pad token is none of them; empty for a Hub id or a folder without one."""
    import json

    config = Path(model_path) / "generation_config.json"
    if not config.is_file():
        return set()
    ids = json.loads(config.read_text()).get("eos_token_id")
    return set(ids if isinstance(ids, list) else [] if ids is None else [ids])


def saved_embedding_rows(adapter: Path | None) -> int | None:
    """Rows of the embedding matrix an adapter folder carries, or None. Adapters written before the
    pad token was reused hold a resized embedding (rounded up to a multiple of 64): the base must
    be resized to exactly that size for them to load."""
    if adapter is None:
        return None
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key.endswith("embed_tokens.weight"):
                return f.get_slice(key).get_shape()[0]
    return None
