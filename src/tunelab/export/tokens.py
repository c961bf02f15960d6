"""Which tokens end an assistant turn and a generation, read off the training tokenizer itself.

An exported model has to stop where the trained one learned to stop: on the token its chat
template writes after an assistant message (`<|im_end|>`, `<|eot_id|>`, `</s>`, or EOS in
tunelab's fallback template) and on every EOS id transformers' generate() stops on
(generation_config.json may list several, as Llama-3-Instruct's does). Serving with a different
stop set is the classic "the exported model never stops" bug.
"""

from __future__ import annotations

import json
from pathlib import Path

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


def end_of_turn(tokenizer) -> str | None:
    """The first special token the chat template writes after an assistant message's text."""
    text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    reply = _PROBE[-1]["content"]
    tail = text[text.rindex(reply) + len(reply):]
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    found = [(tail.find(s), -len(s), s) for s in specials if s in tail]
    return min(found)[2] if found else None


def generation_eos_ids(model_dir: Path) -> list[int]:
    """The EOS ids a model folder's generation_config.json (else config.json) declares."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return eos if isinstance(eos, list) else [eos]
    return []


def stop_tokens(tokenizer, eos_ids: list[int] = ()) -> list[str]:
    """End-of-turn token, EOS and the generation config's EOS tokens, each once, in that order."""
    found = [end_of_turn(tokenizer), tokenizer.eos_token, *tokenizer.convert_ids_to_tokens(list(eos_ids))]
    return list(dict.fromkeys(t for t in found if t))
