"""Prompt styles: how a prompt becomes chat messages, kept as data (YAML) so users add their own.

A style file has `user` (a template with `{prompt}`, and optionally `{context}`, `{steps}` or
any `{name}` given by `defaults` or `--var name=value`), an optional `system` turn, `steps`
(numbered into `{steps}`), `requires` (`context` and/or `examples`) and `k` (few-shot examples).
Built in: plain, role, cot, grounded, few_shot (`styles/*.yaml`). Messages are rendered by the
model's own chat template (`tunelab.data.templates`), as in training and evaluation.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import read_yaml
from tunelab.data.templates import _needs_bos, render  # the same BOS rule as training's tokenization
from tunelab.errors import TunelabError, did_you_mean

STYLE_DIR = Path(__file__).with_name("styles")
KEYS = {"description", "system", "user", "steps", "defaults", "requires", "k"}
BUILTIN_FIELDS = {"prompt", "context", "steps"}


def style_names() -> list[str]:
    return sorted(p.stem for p in STYLE_DIR.glob("*.yaml"))


@dataclass
class Style:
    name: str
    user: str
    system: str | None = None
    description: str = ""
    steps: list[str] = field(default_factory=list)
    defaults: dict[str, str] = field(default_factory=dict)
    requires: list[str] = field(default_factory=list)
    k: int = 3

    def _fill(self, template: str, values: dict[str, str], where: str) -> str:
        missing = [f for _, f, _, _ in string.Formatter().parse(template) if f and f not in values]
        if missing:
            raise TunelabError(
                f"style {self.name}: {where} needs {{{missing[0]}}}; pass --var {missing[0]}=VALUE"
                + (" or --context FILE" if missing[0] == "context" else ""))
        return template.format_map(values)

    def messages(self, prompt: str, *, context: str | None = None, examples: list[tuple[str, str]] = (),
                 variables: dict[str, str] | None = None, history: list[dict] = ()) -> list[dict]:
        """[system] + example turns + earlier turns + the styled prompt as the last user turn."""
        if "context" in self.requires and not context:
            raise TunelabError(f"style {self.name}: needs context passages; pass --context FILE")
        if "examples" in self.requires and not examples:
            raise TunelabError(f"style {self.name}: needs examples; pass --examples FILE.jsonl or a dataset")
        values = {**self.defaults, **(variables or {}), "context": context or "",
                  "steps": "\n".join(f"{i}. {s}" for i, s in enumerate(self.steps, 1))}
        out = [{"role": "system", "content": self._fill(self.system, values, "system")}] if self.system else []
        for question, answer in list(examples)[: self.k]:
            out += [{"role": "user", "content": self._fill(self.user, {**values, "prompt": question}, "user")},
                    {"role": "assistant", "content": answer}]
        out += list(history)
        out.append({"role": "user", "content": self._fill(self.user, {**values, "prompt": prompt}, "user")})
        return out


def load_style(name: str) -> Style:
    """A built-in style by name, or a user's style file (`my_style.yaml`)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else STYLE_DIR / f"{name}.yaml"
    if not path.is_file():
        where = (f"file {name} does not exist" if name.endswith((".yaml", ".yml"))
                 else f"unknown style{did_you_mean(name, style_names())}")
        raise TunelabError(f"--style {name}: {where}; built in: {', '.join(style_names())}, or a path to a .yaml file")
    data = read_yaml(path, "style") or {}
    if not isinstance(data, dict):
        raise TunelabError(f"{path}: must be a mapping with at least `user: \"{{prompt}}\"`")
    problems = [f"{path}: unknown key '{k}' (allowed: {', '.join(sorted(KEYS))})" for k in data if k not in KEYS]
    if not isinstance(data.get("user"), str) or "{prompt}" not in data["user"]:
        problems.append(f"{path}: field 'user' must be a string containing {{prompt}}")
    if not isinstance(data.get("steps", []), list) or not isinstance(data.get("defaults", {}), dict):
        problems.append(f"{path}: 'steps' must be a list and 'defaults' a mapping")
    if not set(data.get("requires", [])) <= {"context", "examples"}:
        problems.append(f"{path}: 'requires' may list only context and examples")
    if problems:
        raise TunelabError("\n  ".join(["invalid style:", *problems]))
    return Style(name=path.stem, user=data["user"], system=data.get("system"), description=data.get("description", ""),
                 steps=[str(s) for s in data.get("steps", [])], defaults={k: str(v) for k, v in data.get("defaults", {}).items()},
                 requires=list(data.get("requires", [])), k=int(data.get("k", 3)))


def load_examples(source: str, data_format: str | None = None, k: int = 3) -> list[tuple[str, str]]:
    """k (question, answer) pairs: from a dataset through a data format (`--examples-format samsum`),
    or from a .jsonl file of {"prompt", "completion"} or {"messages"} rows."""
    if data_format:
        from tunelab.evals.tasks import load_rows

        rows = load_rows(source, data_format, None, "train", k).examples
        return [(_last(m, "user"), _last(m, "assistant")) for m in rows]
    path = Path(source)
    if not path.is_file():
        raise TunelabError(f"--examples {source}: no such file (a .jsonl file, or a dataset with --examples-format)")
    pairs = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((row["prompt"], row["completion"]) if "prompt" in row
                         else (_last(row["messages"], "user"), _last(row["messages"], "assistant")))
        except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
            raise TunelabError(f"{source}:{line_no}: expected {{\"prompt\", \"completion\"}} or {{\"messages\": "
                               "[user, assistant]}}") from None
        if len(pairs) == k:
            break
    return pairs


def _last(messages: list[dict], role: str) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == role)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation, through the chat template, ending on the assistant header."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if _needs_bos(tokenizer, text) else ids
