"""Generate once with a model object the caller holds (evaluation, RL rollouts): an engine sized
to the workload over that very model — the training model's current weights, peft-wrapped or
not, no copy — put in eval mode for the call and handed back as it was."""

from __future__ import annotations

import torch

from tunelab.errors import TunelabError
from tunelab.inference.base import Completion, SamplingParams


def generate_with(model, tokenizer, prompt_ids: list[list[int]], params: SamplingParams | list[SamplingParams], *,
                  batch_size: int | None = None, progress=None) -> list[Completion]:
    """Completions in prompt order through the paged engine (the static backend, batches of
    `batch_size`, for architectures the engine does not run); a failed request raises."""
    from tunelab.inference.backends import build_engine

    per_prompt = params if isinstance(params, list) else [params] * len(prompt_ids)
    demand = sum(len(p) + sp.max_new_tokens for p, sp in zip(prompt_ids, per_prompt))
    was_training = model.training
    model.eval()
    engine = build_engine("paged", model, tokenizer, demand_tokens=demand, max_batch=batch_size or len(prompt_ids))
    try:
        with torch.no_grad():
            done = engine.generate(prompt_ids, per_prompt, progress=progress)
    finally:
        engine.close()
        model.train(was_training)
    failed = next((c.error for c in done if c.error), None)
    if failed:
        raise TunelabError(f"generation failed: {failed}")
    return done
