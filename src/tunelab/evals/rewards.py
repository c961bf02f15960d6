"""The rewards of `tunelab rl` (preference.rewards): reward-model runs and reward functions, in the
form trl's RLOO and GRPO trainers take them.

A function is called as trl calls reward functions — `f(prompts=, completions=, reference=,
**columns) -> list[float]`, one per completion, where a completion is the text or, for chat
prompts, `[{"role": "assistant", "content": text}]` and `reference` is the row's reference answer
(the chosen answer of a pair, the last assistant turn of a chat example). Built-ins:

- `exact_match`: 1 when the completion equals the reference (whitespace collapsed, `evals.metrics`);
- `rouge`: ROUGE-L F1 against the reference;
- `length` / `length:N`: 1 when the completion has as many words as the reference (or N), falling
  linearly to 0 at none or at twice as many — a verbosity control;
- `regex:PATTERN`: 1 when `re.search(PATTERN, completion)` finds it, else 0;
- `python:module:function`: your own, imported by name.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from tunelab.config import RewardSpec
from tunelab.errors import TunelabError


def completion_text(completion) -> str:
    """The text of a completion as trl passes it: a string, or a list of messages (the assistant's last)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _per_completion(name: str, score: Callable[[str, str | None], float]) -> Callable:
    """A trl reward function that scores each completion text against its row's reference."""
    def reward(prompts, completions, reference=None, **_):
        references = reference if reference is not None else [None] * len(completions)
        return [score(completion_text(c), r) for c, r in zip(completions, references)]

    reward.__name__ = name  # trl logs each reward under its function's name
    return reward


def _needs_reference(name: str, score: Callable[[str, str], float]) -> Callable[[str, str | None], float]:
    def scored(text: str, reference: str | None) -> float:
        if reference is None:
            raise TunelabError(f"preference.rewards: {name} compares with a reference answer, and these rows have "
                               "none (rl data: pairs, whose chosen answer is the reference, or chat examples)")
        return score(text, reference)

    return scored


def length_closeness(words: int, target: int) -> float:
    """1 at the target word count, linearly down to 0 at none or at twice the target (and beyond)."""
    return max(0.0, 1.0 - abs(words - target) / max(target, 1))


def python_function(spec: str) -> Callable:
    """`python:module:function` → the function; a TunelabError naming the spec when it cannot be imported."""
    module_name, _, attribute = spec.removeprefix("python:").rpartition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise TunelabError(f"preference.rewards: {spec}: cannot import it ({err}); the module must be importable "
                           "from where tunelab runs (PYTHONPATH)") from None
    if not callable(function):
        raise TunelabError(f"preference.rewards: {spec} is not a function")
    return function


def reward_function(spec: str) -> Callable:
    """The trl reward function a `function:` spec names (see the module docstring)."""
    from tunelab.evals import metrics

    kind, _, rest = spec.partition(":")
    if spec == "exact_match":
        return _per_completion(spec, _needs_reference(spec, metrics.exact_match))
    if spec == "rouge":
        return _per_completion(spec, _needs_reference(spec, metrics.rouge_l))
    if spec == "length":
        return _per_completion(spec, _needs_reference(spec, lambda t, r: length_closeness(len(t.split()), len(r.split()))))
    if kind == "length":
        return _per_completion(spec, lambda t, _: length_closeness(len(t.split()), int(rest)))
    if kind == "regex":
        pattern = re.compile(rest)
        return _per_completion(spec, lambda t, _: float(pattern.search(t) is not None))
    return python_function(spec)


@dataclass
class Rewards:
    """What trl's trainers take: reward_funcs, reward_processing_classes (a reward model's tokenizer,
    None for a function) and reward_weights; `names` as metrics.jsonl and summary.json say them."""

    funcs: list
    processing_classes: list
    weights: list[float]
    names: list[str]


def build_rewards(specs: list[RewardSpec]) -> Rewards:
    from tunelab.models.reward_model import load_reward_model

    funcs, processing = [], []
    for spec in specs:
        if spec.reward_model is not None:
            model, tokenizer = load_reward_model(spec.reward_model)
            funcs.append(model)
            processing.append(tokenizer)
        else:
            funcs.append(reward_function(spec.function))
            processing.append(None)
    return Rewards(funcs, processing, [s.weight for s in specs], [s.name for s in specs])


def score(rewards: Rewards, prompts: list[list[dict]], completions: list[str], references: list[str],
          batch_size: int = 8) -> dict[str, list[float]]:
    """Each reward of each (prompt, completion), by name: reward models score the rendered chat,
    functions get the completions in trl's chat shape and the references."""
    from tunelab.evals.reward_scores import score_chats

    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    out = {}
    for func, tokenizer, name in zip(rewards.funcs, rewards.processing_classes, rewards.names):
        if tokenizer is not None:
            out[name] = score_chats(func, tokenizer, [p + c for p, c in zip(prompts, chat_completions)], batch_size).tolist()
        else:
            out[name] = [float(v) for v in func(prompts=prompts, completions=chat_completions, reference=references)]
    return out
