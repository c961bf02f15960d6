"""Greedy generation on validation prompts through the inference engine, scored with task metrics."""

from __future__ import annotations

from tqdm.auto import tqdm

from tunelab.data.templates import prompt_text


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str = "generating") -> list[str]:
    """Greedy completions of `model` itself — a training model's current weights (eval mode for
    the call, then back), peft-wrapped or not, no second copy — through the paged engine
    (`tunelab.inference`). Architectures the engine does not run fall back to `generate()` on
    padded batches of `batch_size`."""
    return [c.text.strip() for c in completions(model, tokenizer, prompts, max_new_tokens, batch_size, desc)]


def completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str = "generating"):
    """`generate`'s Completion objects (text, token ids, finish reason), in prompt order."""
    from tunelab.inference.base import SamplingParams
    from tunelab.inference.offline import generate_with

    if not prompts:
        return []
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with tqdm(total=len(ids), desc=desc, leave=False) as bar:
        return generate_with(model, tokenizer, ids, SamplingParams(max_new_tokens=max_new_tokens), batch_size=batch_size,
                             progress=bar)


def generation_eval(model, tokenizer, examples, n: int, metrics: list[str], max_new_tokens: int, batch_size: int,
                    desc: str = "generating") -> tuple[dict, list[dict]]:
    """Generate for the first n examples; returns (mean metrics and `repetition_loops`, the number of
    outputs that loop to the token limit; rows of prompt/reference/prediction)."""
    from tunelab.evals.metrics import loops, score

    rows = [examples[i]["messages"] for i in range(min(n, len(examples)))]
    if not rows:
        return {}, []
    prompts = [prompt_text(tokenizer, m) for m in rows]
    references = [m[-1]["content"] for m in rows]
    done = completions(model, tokenizer, prompts, max_new_tokens, batch_size, desc)
    predictions = [c.text.strip() for c in done]
    results = score(predictions, references, metrics)
    results["repetition_loops"] = sum(loops(c.token_ids, max_new_tokens) for c in done)
    return results, [
        {"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, references, predictions)
    ]
