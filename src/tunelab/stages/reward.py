"""`tunelab reward RECIPE`: a reward model from preference pairs or from whole rankings.

The base model with a one-output score head (AutoModelForSequenceClassification, num_labels=1;
the score is read at the last non-pad token, which is why the dedicated pad token matters),
LoRA/QLoRA on the body and the new head trained in full. preference.loss:

- `pairwise`: the Bradley–Terry loss −log σ(r(prompt, chosen) − r(prompt, rejected)) (Ouyang et al.
  2022, eq. 1) by trl's RewardTrainer, on pairs; held-out pairwise accuracy and margin.
- `listwise`: Plackett–Luce over every reviewer's whole ranking of an item's outputs, ties and
  disagreements kept, optionally weighted by the item's reviewer agreement (`tunelab.listwise`),
  on `tunelab review export --as rankings`; held-out pairwise accuracy over the pairs a reviewer
  ordered and Kendall's τ-b with each reviewer's order (`evals/ranking.py`).

The run folder records the prompts it trained on (`train_prompts.json`), so `tunelab review
report --reward-model` checks it on the others; `tunelab rl` loads the result by run folder.
"""

from __future__ import annotations

import json

from tunelab import lifecycle
from tunelab.config import Config
from tunelab.lifecycle import Loaded, RunResult


def load(cfg: Config, sharded: bool = False) -> Loaded:
    """Pairs (preference.loss=pairwise) or rankings (listwise) with the model's tokenizer."""
    if cfg.preference.loss == "pairwise":
        return lifecycle.load_pairs(cfg, sharded)
    from tunelab.data.preferences import load_rankings
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import resolve

    tokenizer = load_tokenizer(resolve(cfg.model.name), cfg.model.chat_template)
    return Loaded(tokenizer, load_rankings(cfg, tokenizer))


def record_train_prompts(cfg: Config, loaded: Loaded) -> None:
    """train_prompts.json: the keys of the prompts this run trains on (the run folder exists when build runs)."""
    from tunelab.data.feedback import TRAIN_PROMPTS, prompt_key

    keys = sorted({prompt_key(p) for p in loaded.data.train["prompt"]})
    (cfg.run.path / TRAIN_PROMPTS).write_text(json.dumps(keys) + "\n")


def build(cfg: Config, loaded: Loaded, args_for, callbacks):
    from trl import RewardConfig, RewardTrainer

    from tunelab.models.build import lora_config, precision
    from tunelab.models.reward_model import load_classifier

    record_train_prompts(cfg, loaded)
    args = args_for(RewardConfig, max_length=cfg.data.max_length)
    trainer = RewardTrainer(
        model=load_classifier(cfg, loaded.tokenizer), args=args, train_dataset=loaded.data.train,
        eval_dataset=loaded.data.eval, processing_class=loaded.tokenizer, callbacks=callbacks,
        peft_config=None if cfg.peft.method == "full" else lora_config(cfg.peft, task_type="SEQ_CLS"),
    )
    if cfg.quantization.bits:
        # trl 1.16 casts every trainable parameter of a quantized model to bf16 (QLoRA's adapter dtype). LoRA
        # layers cast their input to match, the trained copy of the score head does not: give it the dtype of
        # the hidden states again (a no-op on a bf16 GPU; on the CPU, fp32). Can go once trl casts adapters only.
        dtype = precision(cfg.train.precision, cfg.model.dtype).dtype
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and ".score." in name:
                param.data = param.data.to(dtype)
    return trainer


def build_listwise(cfg: Config, loaded: Loaded, args_for, callbacks):
    """Our ListwiseTrainer (transformers' Trainer + the Plackett–Luce loss) on the tokenized rankings."""
    from transformers import TrainingArguments

    from tunelab.listwise import ListwiseTrainer, RankingCollator, tokenize_items
    from tunelab.models.build import apply_peft
    from tunelab.models.reward_model import load_classifier

    record_train_prompts(cfg, loaded)
    tokenizer = loaded.tokenizer
    model = apply_peft(load_classifier(cfg, tokenizer), cfg.peft, bool(cfg.quantization.bits),
                       cfg.train.gradient_checkpointing, task_type="SEQ_CLS")
    args = args_for(TrainingArguments, remove_unused_columns=False)  # the collator reads rankings and weight
    data = loaded.data
    return ListwiseTrainer(
        model=model, args=args, data_collator=RankingCollator(tokenizer.pad_token_id), callbacks=callbacks,
        train_dataset=tokenize_items(data.train, tokenizer, cfg.data.num_proc),
        eval_dataset=tokenize_items(data.eval, tokenizer, cfg.data.num_proc), processing_class=tokenizer,
    )


def pair_margins(trainer):
    """r(chosen) − r(rejected) for every validation pair (the collator stacks chosen over rejected)."""
    import torch
    from tqdm.auto import tqdm

    model = trainer.model
    was_training = model.training
    model.eval()
    margins = []
    with torch.no_grad():
        for batch in tqdm(trainer.get_eval_dataloader(), desc="scoring validation pairs", leave=False):
            batch = trainer._prepare_inputs(batch)
            scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            chosen, rejected = scores.logits[:, 0].float().chunk(2)
            margins.append(chosen - rejected)
    model.train(was_training)
    return torch.cat(margins).cpu()


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    from tunelab.evals.pairs import pair_metrics

    return pair_metrics(pair_margins(trainer)), []


def ranked_scores(trainer) -> tuple[list[list[float]], list[list[list[int]]], float]:
    """Every validation item's output scores and rankings, and the weighted mean Plackett–Luce loss."""
    import torch
    from tqdm.auto import tqdm

    from tunelab.listwise import item_scores, plackett_luce_loss

    model = trainer.model
    was_training = model.training
    model.eval()
    scores, rankings, loss_sum, weight_sum = [], [], 0.0, 0.0
    with torch.no_grad():
        for batch in tqdm(trainer.get_eval_dataloader(), desc="scoring validation rankings", leave=False):
            batch = trainer._prepare_inputs(batch)
            grid = item_scores(model, batch)  # (B, K)
            loss_sum += plackett_luce_loss(grid, batch["ranks"], batch["weights"]).item() * batch["weights"].sum().item()
            weight_sum += batch["weights"].sum().item()
            for row, index, ranks in zip(grid.cpu(), batch["index"].cpu(), batch["ranks"].cpu()):
                k = int((index >= 0).sum())
                scores.append(row[:k].tolist())
                rankings.append([r[:k].tolist() for r in ranks if r[0] > 0])
    model.train(was_training)
    return scores, rankings, loss_sum / max(weight_sum, 1e-12)


def measure_listwise(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    from tunelab.evals.ranking import ranking_agreement

    scores, rankings, loss = ranked_scores(trainer)
    found = ranking_agreement(scores, rankings)
    return {"loss": loss, "accuracy": found["accuracy"], "kendall_tau": found["kendall_tau"]}, []


STAGE = lifecycle.Stage(
    name="reward",
    load=load,
    build=build,
    measure=measure,
    perplexity=False,
    curves={
        "accuracy": ("Pairwise accuracy", {"accuracy": "train", "eval_accuracy": "validation"}),
        "margin": ("Reward margin", {"margin": "train", "eval_margin": "validation"}),
    },
)
LISTWISE = lifecycle.Stage(name="reward", load=load, build=build_listwise, measure=measure_listwise, perplexity=False)


def run(cfg: Config) -> RunResult:
    return lifecycle.run(cfg, STAGE if cfg.preference.loss == "pairwise" else LISTWISE)
