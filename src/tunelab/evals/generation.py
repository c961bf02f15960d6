"""Batched greedy generation on validation prompts, scored with task metrics."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tunelab.data.templates import prompt_text


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str = "generating") -> list[str]:
    """Greedy completions. Decoder-only models need *left* padding to generate a batch, so this
    pads on the left here only; training keeps right padding."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


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
