"""An Ollama model folder: the GGUF plus a Modelfile that prompts and stops as training did.

Ollama does not run the tokenizer's Jinja chat template; it renders the Modelfile's TEMPLATE,
a Go template. Translating arbitrary Jinja is not attempted: the chat template is recognised as
one of the families tunelab trains with (ChatML as in SmolLM2, with its default system prompt;
Llama-2 `[INST]`; Llama-3 header tokens; tunelab's fallback `### User:` template), by rendering
probe conversations through the tokenizer and through the family's Go template (tunelab's own
evaluator, `gotemplate.py`) and requiring the same text. Anything else is refused by name, so a
Modelfile that would prompt the model in a format it was not trained on is never written.

Ollama's conventions the templates follow: the conversation arrives as `.Messages` (consecutive
messages of one role merged, system text also in `.System`); a conversation that ends on an
assistant message is a reply to continue, so that message gets no end-of-turn; the runtime adds
BOS itself when the GGUF says the tokenizer does, so the template leaves a leading BOS out.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import TunelabError

# Each family: a Go template with @BOS@/@EOS@/@SYSTEM@ holes filled from the tokenizer. `$last`
# marks the final message: Ollama adds the generation prompt after a final user message and
# leaves a final assistant message open.
_RANGE = "{{- range $i, $m := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
_FAMILIES = {
    "chatml": _RANGE
    + '@SYSTEM@<|im_start|>{{ $m.Role }}\n{{ $m.Content }}{{ if not (and $last (eq $m.Role "assistant")) }}'
    "<|im_end|>\n{{ end }}\n"
    '{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}\n'
    "{{- end }}",
    "llama2": "{{- $first := true }}\n" + _RANGE
    + '{{- if eq $m.Role "user" }}{{ if not $first }}@BOS@{{ end }}[INST] {{ if and $first $.System }}<<SYS>>\n'
    "{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ $m.Content }} [/INST]{{ $first = false }}\n"
    '{{- else if eq $m.Role "assistant" }} {{ $m.Content }}{{ if not $last }} @EOS@{{ end }}\n'
    "{{- end }}\n{{- end }}",
    "llama3": _RANGE
    + "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}"
    '{{ if not (and $last (eq $m.Role "assistant")) }}<|eot_id|>{{ end }}\n'
    '{{- if and $last (ne $m.Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n'
    "{{- end }}",
    "tunelab": _RANGE
    + '{{ if eq $m.Role "system" }}{{ $m.Content }}\n\n'
    '{{ else if eq $m.Role "user" }}### User:\n{{ $m.Content }}\n\n'
    "{{ else }}### Assistant:\n{{ $m.Content }}{{ if not $last }}@EOS@\n\n{{ end }}\n"
    "{{- end }}\n"
    '{{- if and $last (ne $m.Role "assistant") }}### Assistant:\n{{ end }}\n'
    "{{- end }}",
}
_CHATML_SYSTEM = ('{{- if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
                  "@DEFAULT@<|im_end|>\n{{ end }}")

_SYSTEM = "You are a careful assistant.\nAnswer in one line."
_USER = ["Plan a meetup for Friday, 6 pm?", "And who brings the snacks?"]
_REPLY = "Friday at 6 pm works: the cafe on Main Street."
PROBES = [  # conversations every recognised template must render exactly as the tokenizer does
    [("user", _USER[0])],
    [("system", _SYSTEM), ("user", _USER[0])],
    [("user", _USER[0]), ("assistant", _REPLY), ("user", _USER[1])],
    [("system", _SYSTEM), ("user", _USER[0]), ("assistant", _REPLY), ("user", _USER[1])],
    [("user", _USER[0]), ("assistant", _REPLY)],
    [("system", _SYSTEM), ("user", _USER[0]), ("assistant", _REPLY), ("user", _USER[1]), ("assistant", _REPLY)],
]


def messages(probe) -> list[dict]:
    return [{"role": role, "content": content} for role, content in probe]


def jinja_render(tokenizer, conversation: list[dict]) -> str:
    """The training prompt for `conversation`, as Ollama would receive it: a final user turn gets
    the generation prompt, a final assistant turn is left open; a leading BOS the tokenizer adds
    by itself anyway is left out (the runtime adds it)."""
    open_reply = conversation[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=not open_reply,
                                         continue_final_message=open_reply)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def adds_bos(tokenizer) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def ollama_values(conversation: list[dict]) -> dict:
    """What Ollama hands a template: `.Messages` with consecutive same-role messages merged
    (joined by a blank line), and every system message's text also in `.System`."""
    merged: list[dict] = []
    for m in conversation:
        if merged and merged[-1]["Role"] == m["role"]:
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in conversation if m["role"] == "system")
    return {"Messages": merged, "System": system}


def go_render(template: str, conversation: list[dict]) -> str:
    from tunelab.export.gotemplate import render

    return render(template, ollama_values(conversation))


def _default_system(tokenizer) -> str:
    """ChatML templates that insert a system turn when the conversation has none (SmolLM2's)."""
    text = jinja_render(tokenizer, messages(PROBES[0]))
    head = "<|im_start|>system\n"
    return text[len(head):text.index("<|im_end|>")] if text.startswith(head) and "<|im_end|>" in text else ""


def _candidates(tokenizer):
    """(family, Go template) for each family, holes filled from this tokenizer; each also with a
    literal leading BOS, for templates that write one that the tokenizer does not add itself."""
    bos = tokenizer.bos_token or ""
    default = _default_system(tokenizer)
    system = _CHATML_SYSTEM.replace("@DEFAULT@", default) if default else ""
    for family, template in _FAMILIES.items():
        filled = template.replace("@SYSTEM@", system).replace("@BOS@", bos).replace("@EOS@", tokenizer.eos_token or "")
        for lead in dict.fromkeys(("", bos)):
            yield family, lead + filled


def chat_format(tokenizer) -> tuple[str, str]:
    """(family, Ollama TEMPLATE) that renders every probe exactly as the tokenizer's chat template."""
    expected = [jinja_render(tokenizer, messages(p)) for p in PROBES]
    for family, template in _candidates(tokenizer):
        if all(go_render(template, messages(p)) == text for p, text in zip(PROBES, expected)):
            return family, template
    head = (tokenizer.chat_template or "").strip().replace("\n", "\\n")
    raise TunelabError(
        f"export --format ollama: the chat template ({head[:160]}{'...' if len(head) > 160 else ''}) is none of "
        f"the families tunelab can write as an Ollama TEMPLATE ({', '.join(_FAMILIES)}); export --format gguf "
        "keeps the template in the file (llama.cpp uses it with --jinja), or write the Modelfile TEMPLATE by hand"
    )


def modelfile(tokenizer, gguf_name: str, eos_ids: list[int], title: str) -> str:
    """The Modelfile text: FROM the GGUF beside it, the TEMPLATE, one `PARAMETER stop` per stop token."""
    from tunelab import __version__
    from tunelab.export.tokens import stop_tokens

    family, template = chat_format(tokenizer)
    stops = stop_tokens(tokenizer, eos_ids)
    if '"""' in template or any('"' in s or "\n" in s for s in stops):
        raise TunelabError("export --format ollama: the chat template or a stop token contains quotes that "
                           "a Modelfile cannot hold")
    lines = [f"# {title}: written by tunelab {__version__}; chat template family: {family}",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_ollama(model_dir: Path, out_dir: Path, dtype: str, name: str) -> Path:
    """`out_dir` with `<name>-<dtype>.gguf` and a Modelfile (`ollama create NAME -f Modelfile`)."""
    from transformers import AutoTokenizer

    from tunelab.export.gguf import write_gguf
    from tunelab.export.tokens import generation_eos_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gguf_name = f"{name}-{dtype}.gguf"
    text = modelfile(tokenizer, gguf_name, generation_eos_ids(model_dir), name)  # refuses before the long write
    write_gguf(model_dir, out_dir / gguf_name, dtype, name)
    (out_dir / "Modelfile").write_text(text)
    return out_dir
