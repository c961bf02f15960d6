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
    """Our Trainer on the packed (or padded) rows, with the micro-batch split (`train.batch_size`,
    probed when auto on one CUDA device) and, under train.compile, compiled decoder layers fed one
    static [rows, max_length] shape."""
    from transformers import EarlyStoppingCallback, TrainingArguments

    from tunelab.data.batching import Collator
    from tunelab.kernels import regional
    from tunelab.trainer import TunelabTrainer

    if cfg.train.early_stopping:
        es = cfg.train.early_stopping
        callbacks = [*callbacks, EarlyStoppingCallback(es.patience, es.threshold)]
    data, pad = loaded.data, loaded.tokenizer.pad_token_id
    one_process = distributed.world_size() == 1
    plan, step = batch_plan(cfg, loaded)
    compiled = regional.apply(loaded.model, cfg.train.compile) if one_process else []
    if compiled and not regional.check(loaded.model, lambda: step(plan.batch_size)):
        compiled = []
    if compiled:
        log.info("train.compile=auto: %d decoder layers compiled for [%d, %d] batches", len(
            regional.decoder_layers(loaded.model)), plan.batch_size, cfg.data.max_length)
    log.info(plan.describe())
    args = args_for(TrainingArguments)
    args.per_device_train_batch_size, args.gradient_accumulation_steps = plan.batch_size, plan.grad_accum
    static = {"width": cfg.data.max_length, "rows": plan.batch_size} if compiled else {}
    trainer = TunelabTrainer(
        model=loaded.model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=Collator(pad, **static), eval_collator=Collator(pad), eval_parts=data.eval_parts,
        processing_class=loaded.tokenizer, callbacks=callbacks,
        generation=(cfg.train.eval_generation, data.eval_examples, cfg.eval) if cfg.train.eval_generation else None,
    )
    trainer.batch_plan, trainer.compiled = plan, compiled
    return trainer


def batch_plan(cfg: Config, loaded: Loaded):
    """(the micro-batch split, step(b): one training forward+backward on b full-length rows, for the
    probe and the compile check). Probed only for batch_size=auto on one CUDA device."""
    import torch

    from tunelab import autobatch
    from tunelab.data.batching import Collator
    from tunelab.models.build import precision

    t, max_length = cfg.train, cfg.data.max_length
    one_cuda = torch.cuda.is_available() and distributed.world_size() == 1
    if one_cuda and not hasattr(loaded.model, "hf_device_map"):  # (a 4-bit model is on the GPU already)
        # The Trainer moves the model to the GPU in its constructor, but the probe and the compile
        # check run before it: on the CPU they would measure nothing and fail in the Triton kernels.
        loaded.model.to(torch.device("cuda", torch.cuda.current_device()))
    rows = [loaded.data.train[i] for i in range(min(len(loaded.data.train), t.rows_per_step(max_length)))]
    autocast = precision(t.precision, cfg.model.dtype)
    dtype = torch.bfloat16 if autocast.bf16 else torch.float16 if autocast.fp16 else None
    collate = Collator(loaded.tokenizer.pad_token_id, width=max_length)
    step = autobatch.step_on(loaded.model, rows, collate, dtype)
    probe, usable = (None, None)
    if t.batch_size == "auto" and one_cuda:
        trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
        probe, usable = autobatch.cuda_probe(step, trainable)
    return autobatch.plan(t, max_length, distributed.world_size(), probe, usable), step


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    """Validation loss/perplexity on all validation rows (a mixture: also each source's, `loss_<source>`),
    task metrics on the first generation_samples."""
    from tunelab.evals.generation import generation_eval

    metrics = last_validation(trainer) if label == "after" else None
    metrics = metrics or trainer.evaluate()
    result = {"loss": metrics["eval_loss"], "perplexity": metrics["eval_perplexity"],
              **{f"loss_{name}": metrics[f"eval_loss_{name}"] for name in loaded.data.eval_parts}}
    task, rows = generation_eval(
        loaded.model, loaded.tokenizer, loaded.data.eval_examples, cfg.eval.generation_samples, cfg.eval.metrics,
        cfg.eval.max_new_tokens, cfg.eval.batch_size, desc=f"generating ({label})",
    )
    for row, example in zip(rows, loaded.data.eval_examples):  # the turns before the answer, for the report
        row["messages"] = example["messages"][:-1]
    result.update(task)
    log.info("eval %s: %s", label, ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result, rows


def last_validation(trainer) -> dict | None:
    """The validation the Trainer ran at the last step, when the model still has those weights (no
    best checkpoint loaded in their place): the "after" loss without a second pass."""
    from pathlib import Path

    if trainer.last_eval is None or trainer.last_eval[0] != trainer.state.global_step:
        return None
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).name != f"checkpoint-{trainer.state.global_step}":
        return None
    return trainer.last_eval[1]


def speed(trainer, training_s: float) -> dict:
    """Real (non-pad) training tokens per second of training (validation excluded) over all processes,
    MFU where the GPU's peak is known, the share of padding, and how the batch was split."""
    import torch

    from tunelab.speed import mfu, parameter_count

    collator = trainer.data_collator
    real_tokens = distributed.total(collator.real_tokens)  # a collective: every rank calls it
    tokens_per_s = real_tokens / training_s if training_s else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    per_device = tokens_per_s / distributed.world_size() if tokens_per_s else None
    return {"tokens": real_tokens, "tokens_per_s": tokens_per_s,
            "mfu": mfu(parameter_count(trainer.model), per_device, device),
            "pad_fraction": collator.pad_fraction, "batch": trainer.batch_plan.summary(),
            "compiled": bool(trainer.compiled)}


STAGE = lifecycle.Stage(name="train", load=load, build=build, measure=measure, speed=speed, multi_process=True)


def run(cfg: Config) -> RunResult:
    return lifecycle.run(cfg, STAGE)
