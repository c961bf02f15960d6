"""Greedy generation on validation prompts through the inference engine, scored with task metrics."""

from __future__ import annotations

from tqdm.auto import tqdm

from tunelab.data.templates import prompt_text


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str = "generating") -> list[str]:
    """Greedy completions of `model` itself — a training model's current weights (eval mode for
    the call, then back), peft-wrapped or not, no second copy — through the paged engine
    (`tunelab.inference`). Architectures the engine does not run fall back to `generate()` on
    padded batches of `batch_size`."""
    from tunelab.inference.base import SamplingParams
    from tunelab.inference.offline import generate_with

    if not prompts:
        return []
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with tqdm(total=len(ids), desc=desc, leave=False) as bar:
        done = generate_with(model, tokenizer, ids, SamplingParams(max_new_tokens=max_new_tokens), batch_size=batch_size,
                             progress=bar)
    return [c.text.strip() for c in done]


def generation_eval(model, tokenizer, examples, n: int, metrics: list[str], max_new_tokens: int, batch_size: int,
                    desc: str = "generating") -> tuple[dict, list[dict]]:
    """Generate for the first n examples; returns (mean metrics, rows of prompt/reference/prediction)."""
    from tunelab.evals.metrics import score

    rows = [examples[i]["messages"] for i in range(min(n, len(examples)))]
    if not rows:
        return {}, []
    prompts = [prompt_text(tokenizer, m) for m in rows]
    references = [m[-1]["content"] for m in rows]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc)
    results = score(predictions, references, metrics)
    return results, [
        {"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, references, predictions)
    ]
