"""Outputs to review, generated from a prompts file by one or more models or runs.

`generate_outputs` is the one place the review app calls a model, so it can move to the
inference engine (issue #4) without touching the rest.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.review import project
from tunelab.review.store import MAX_OUTPUTS, Store


class _Sampling:
    """The model with sampling switched on. `evals.generation.generate` decodes greedily (right for
    metrics); k > 1 outputs per prompt need sampling, so this proxy overrides its `generate`
    call. It can go when the inference engine takes over generation here."""

    def __init__(self, model, temperature: float, top_p: float):
        self._model, self._sampling = model, {"do_sample": True, "temperature": temperature, "top_p": top_p}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        return self._model.generate(**{**kwargs, **self._sampling})


def generate_outputs(model_name: str, chats: list[list[dict]], k: int, *, max_new_tokens: int = 256,
                     temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, batch_size: int = 8) -> list[list[str]]:
    """k outputs per chat from one model (greedy when k == 1, sampled otherwise)."""
    import torch

    from tunelab.data.templates import render
    from tunelab.evals.generation import generate
    from tunelab.models.build import load_for_eval

    model, tokenizer = load_for_eval(model_name)
    torch.manual_seed(seed)
    prompts = [render(tokenizer, chat, add_generation_prompt=True) for chat in chats for _ in range(k)]
    runner = model if k == 1 else _Sampling(model, temperature, top_p)
    texts = generate(runner, tokenizer, prompts, max_new_tokens, batch_size, desc=f"generating with {model_name}")
    return [texts[i * k : (i + 1) * k] for i in range(len(chats))]


def add_generated(store: Store, prompts_file: Path, models: list[str], k: int, kinds: list[str],
                  per_item: int | None = None, **sampling) -> tuple[int, int]:
    """Items from a prompts file: each prompt with k outputs from each model."""
    if not models:
        raise TunelabError("add-task: name at least one --model (a run folder, model folder, Hub id or `embedded`)")
    if not 1 <= k * len(models) <= MAX_OUTPUTS:
        raise TunelabError(f"-k {k} x {len(models)} models: at most {MAX_OUTPUTS} outputs per item")
    rows = project.read_rows(prompts_file, project.PromptRow)
    chats = [row.chat() for _, row in rows]
    outputs = [[] for _ in rows]
    for name in models:
        for per_prompt, texts in zip(outputs, generate_outputs(name, chats, k, **sampling)):
            per_prompt += [{"model": name, "text": t} for t in texts]
    items = [
        (row.id or f"{prompts_file.stem}-{lineno}", chat, row.reference, outs)
        for (lineno, row), chat, outs in zip(rows, chats, outputs)
    ]
    return project.add_items(store, items, kinds, per_item)
