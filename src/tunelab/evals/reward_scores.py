"""A reward model's scores of answers: each prompt + answer rendered with the chat template as trl
renders it for reward models (the whole conversation, the answer as the last assistant turn),
right-padded, read at the last non-pad token (the score head's own rule)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def score_chats(model, tokenizer, chats: list[list[dict]], batch_size: int = 8, desc: str = "scoring") -> torch.Tensor:
    """(len(chats),) float32 rewards on the CPU; a chat is [prompt turns..., {"role": "assistant", ...}]."""
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    scores = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, disable=len(texts) <= batch_size):
        inputs = tokenizer(text=texts[start : start + batch_size], return_tensors="pt", padding=True,
                           padding_side="right", add_special_tokens=False).to(model.device)
        scores.append(model(**inputs, use_cache=False).logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def score_outputs(model, tokenizer, items: list[tuple[list[dict], list[str]]], batch_size: int = 8) -> list[list[float]]:
    """For each (prompt messages, outputs) item: the reward of each output, in order."""
    chats = [prompt + [{"role": "assistant", "content": text}] for prompt, outputs in items for text in outputs]
    flat = score_chats(model, tokenizer, chats, batch_size, desc="scoring outputs").tolist()
    out, at = [], 0
    for _, outputs in items:
        out.append(flat[at : at + len(outputs)])
        at += len(outputs)
    return out
