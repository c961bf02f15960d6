"""`tunelab train RECIPE`: supervised fine-tuning (full, LoRA, DoRA, QLoRA) on the transformers Trainer.

Through the run lifecycle (`tunelab/lifecycle.py`); this module brings what is SFT's own: the
data is checked and tokenized before the model is built with its adapter, packed or
padded rows for our Trainer subclass, and validation loss/perplexity plus task metrics on
greedy generations as the before/after measure. The only stage that runs on several processes.
"""

from __future__ import annotations

import logging

from tunelab import distributed, lifecycle
from tunelab.config import Config
from tunelab.lifecycle import Loaded, RunResult

log = logging.getLogger(__name__)


def load(cfg: Config, sharded: bool) -> Loaded:
    """The tokenizer, then the data (every row checked, then tokenized by it), then the model: a bad
    row or data path stops the run in seconds, before minutes of loading weights."""
    from tunelab.data.prepare import prepare
    from tunelab.models.build import load_for_training, load_tokenizer
    from tunelab.models.loading import resolve

    tokenizer = load_tokenizer(resolve(cfg.model.name), cfg.model.chat_template)
    data = prepare(cfg.data, tokenizer, cfg.run.seed)
    model, tokenizer = load_for_training(cfg, sharded=sharded, tokenizer=tokenizer)
    return Loaded(tokenizer, data, model=model)


def build(cfg: Config, loaded: Loaded, args_for, callbacks):
    from transformers import EarlyStoppingCallback, TrainingArguments

    from tunelab.data.batching import Collator
    from tunelab.trainer import TunelabTrainer

    if cfg.train.early_stopping:
        es = cfg.train.early_stopping
        callbacks = [*callbacks, EarlyStoppingCallback(es.patience, es.threshold)]
    data = loaded.data
    return TunelabTrainer(
        model=loaded.model, args=args_for(TrainingArguments), train_dataset=data.train, eval_dataset=data.eval,
        data_collator=Collator(loaded.tokenizer.pad_token_id), processing_class=loaded.tokenizer, callbacks=callbacks,
        generation=(cfg.train.eval_generation, data.eval_examples, cfg.eval) if cfg.train.eval_generation else None,
    )


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    """Validation loss/perplexity on all validation rows, task metrics on the first generation_samples."""
    from tunelab.evals.generation import generation_eval

    metrics = trainer.evaluate()
    result = {"loss": metrics["eval_loss"], "perplexity": metrics["eval_perplexity"]}
    task, rows = generation_eval(
        loaded.model, loaded.tokenizer, loaded.data.eval_examples, cfg.eval.generation_samples, cfg.eval.metrics,
        cfg.eval.max_new_tokens, cfg.eval.batch_size, desc=f"generating ({label})",
    )
    for row, example in zip(rows, loaded.data.eval_examples):  # the turns before the answer, for the report
        row["messages"] = example["messages"][:-1]
    result.update(task)
    log.info("eval %s: %s", label, ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result, rows


def speed(trainer, runtime_s: float) -> dict:
    """Real (non-pad) tokens per second over all processes, and the share of padding."""
    collator = trainer.data_collator
    real_tokens = distributed.total(collator.real_tokens)  # a collective: every rank calls it
    return {"tokens_per_s": real_tokens / runtime_s if runtime_s else None, "pad_fraction": collator.pad_fraction}


STAGE = lifecycle.Stage(name="train", load=load, build=build, measure=measure, speed=speed, multi_process=True)


def run(cfg: Config) -> RunResult:
    return lifecycle.run(cfg, STAGE)
