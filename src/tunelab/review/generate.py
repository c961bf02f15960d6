"""Outputs to review, generated from a prompts file by one or more models or runs.

`generate_outputs` is the one place the review app calls a model (through the inference
engine, `tunelab.inference`, the same one `tunelab generate` and `tunelab serve` use).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.review import project
from tunelab.review.store import MAX_OUTPUTS, Store


def generate_outputs(model_name: str, chats: list[list[dict]], k: int, *, max_new_tokens: int = 256,
                     temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, backend: str = "auto") -> list[list[str]]:
    """k outputs per chat from one model through the inference engine: greedy when k == 1,
    sampled otherwise (the engine's seeded sampler, so the k samples of a prompt differ)."""
    from tqdm.auto import tqdm

    from tunelab.inference.backends import load_engine
    from tunelab.inference.base import SamplingParams
    from tunelab.inference.prompts import prompt_ids

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0 if k == 1 else temperature,
                            top_p=1.0 if k == 1 else top_p)
    engine = load_engine(model_name, backend, seed=seed)
    try:
        ids = [prompt_ids(engine.tokenizer, chat) for chat in chats for _ in range(k)]
        with tqdm(total=len(ids), desc=f"generating with {model_name}", leave=False) as bar:
            done = engine.generate(ids, params, progress=bar)
    finally:
        engine.close()
    failed = next((c.error for c in done if c.error), None)
    if failed:
        raise TunelabError(f"--model {model_name}: generation failed: {failed}")
    texts = [c.text.strip() for c in done]
    return [texts[i * k : (i + 1) * k] for i in range(len(chats))]


def generated_rows(prompts_file: Path, models: list[str], k: int, **sampling) -> list[tuple]:
    """(id, prompt messages, reference, outputs) rows: each prompt of the file with k outputs from each model."""
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
    return [
        (row.id or f"{prompts_file.stem}-{lineno}", chat, row.reference, outs)
        for (lineno, row), chat, outs in zip(rows, chats, outputs)
    ]


def add_generated(store: Store, prompts_file: Path, models: list[str], k: int, kinds: list[str],
                  per_item: int | None = None, **sampling) -> tuple[int, int]:
    """Items from a prompts file: each prompt with k outputs from each model."""
    return project.add_items(store, generated_rows(prompts_file, models, k, **sampling), kinds, per_item)
