"""A reward model trained on whole rankings: the Plackett–Luce loss, ties included, on transformers' Trainer.

Plackett (1975) and Luce (1959): a reviewer's ranking of k outputs is read as choosing the best
of all k, then the best of the rest, and so on; with scores s, the probability of a ranking is
Π_stage exp(s_chosen) / Σ_{j still left} exp(s_j). For k = 2 this is Bradley–Terry, so the loss
is −log σ(s_chosen − s_rejected), the pairwise loss trl's RewardTrainer uses. Equal ranks (ties)
are handled as Breslow (1974) handles tied event times in Cox's partial likelihood: the outputs of
a tie group are chosen at the same stage, each against everything not yet placed (the whole
group included), so the order inside a group is neither rewarded nor punished and tied outputs
are pulled toward equal scores. The loss of a batch is the mean over its rankings of −log P,
weighted per ranking (e.g. by the item's reviewer agreement). Every reviewer's ranking of an item
counts, so disagreements are kept, not averaged away into a consensus.

`ListwiseTrainer` is the Trainer with this loss: each batch holds B items with their k outputs
rendered as prompt + answer (B·k sequences through the score head) and R rankings per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer


def plackett_luce_loss(scores: torch.Tensor, ranks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over rankings of −log P_PL(ranking | scores), ties as tie groups (see the module docstring).

    scores (B, K): each item's output scores (padding outputs: any value);
    ranks (B, R, K): 1 = best, equal ranks tie, 0 = no such output or ranking (padding);
    weights (B, R): weight of each ranking (0 for padding rankings).
    """
    valid = ranks > 0  # (B, R, K)
    # risk[b, r, i, j]: output j is still unplaced when output i's tie group is chosen. An output
    # with no rank keeps only itself, so its (masked) term stays finite and adds no gradient.
    eye = torch.eye(ranks.shape[-1], dtype=torch.bool, device=ranks.device)  # (K, K)
    risk = ((ranks[..., None, :] >= ranks[..., :, None]) & valid[..., None, :]) | eye  # (B, R, K, K)
    s = scores[:, None, None, :].expand(risk.shape)  # (B, R, K, K): s[..., i, j] = score of output j
    log_denominator = torch.logsumexp(s.masked_fill(~risk, float("-inf")), dim=-1)  # (B, R, K)
    terms = (log_denominator - scores[:, None, :]) * valid  # (B, R, K): −log P of choosing i at its stage
    per_ranking = terms.sum(-1)  # (B, R)
    return (weights * per_ranking).sum() / weights.sum().clamp(min=1e-12)


def tokenize_items(rows, tokenizer, num_proc: int | None = None):
    """Rankings data (prompt, outputs, rankings, weight) → input_ids (one list per output, prompt +
    answer rendered with the chat template as trl renders reward-model inputs), rankings, weight."""
    def tokenize(batch):
        return {"input_ids": [[tokenizer.apply_chat_template(p + [{"role": "assistant", "content": o}], tokenize=True,
                                                              return_dict=False) for o in outputs]
                              for p, outputs in zip(batch["prompt"], batch["outputs"])]}

    return rows.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["prompt", "outputs"],
                    desc="tokenizing ranked outputs")


@dataclass
class RankingCollator:
    """Items → input_ids/attention_mask (B·k sequences, right-padded), index (B, K) of each output's
    sequence (−1: none), ranks (B, R, K) and weights (B, R), padded with 0."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [ids for row in rows for ids in row["input_ids"]]
        longest = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for n, ids in enumerate(sequences):
            input_ids[n, : len(ids)] = torch.tensor(ids)
            attention_mask[n, : len(ids)] = 1
        k, r = max(len(row["input_ids"]) for row in rows), max(len(row["rankings"]) for row in rows)
        index = torch.full((len(rows), k), -1, dtype=torch.long)
        ranks = torch.zeros((len(rows), r, k), dtype=torch.long)
        weights = torch.zeros((len(rows), r))
        start = 0
        for b, row in enumerate(rows):
            outputs = len(row["input_ids"])
            index[b, :outputs] = torch.arange(start, start + outputs)
            ranks[b, : len(row["rankings"]), :outputs] = torch.tensor(row["rankings"])
            weights[b, : len(row["rankings"])] = row["weight"]
            start += outputs
        return {"input_ids": input_ids, "attention_mask": attention_mask, "index": index, "ranks": ranks,
                "weights": weights}


def item_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, K) score of each item's outputs (0 where an item has fewer than K)."""
    flat = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, 0]
    index = batch["index"]
    return flat.float()[index.clamp(min=0)].masked_fill(index < 0, 0.0)  # (B, K)


class ListwiseTrainer(Trainer):
    """transformers' Trainer with the Plackett–Luce loss (`plackett_luce_loss`) over each batch's rankings."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The loss is already a mean over the batch's rankings: let the Trainer divide it by the
        # gradient-accumulation steps (it skips that for models whose forward takes loss kwargs).
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = item_scores(model, inputs)
        loss = plackett_luce_loss(scores, inputs["ranks"], inputs["weights"])
        return (loss, scores) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
