"""Supervised fine-tuning: load → prepare data → evaluate before → train → evaluate after → save → report."""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import distributed
from tunelab.config import Config, dump_config
from tunelab.distributed import is_main
from tunelab.errors import TunelabError
from tunelab.tracking.metrics import MetricsCallback, read_jsonl, write_json

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def last_checkpoint(run_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt = run_dir / "checkpoints"
    return Path(found) if ckpt.is_dir() and (found := get_last_checkpoint(str(ckpt))) else None


def open_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """Create the run folder; refuse to mix a new run into an old one unless resuming."""
    run_dir = cfg.run.path
    resume_from = last_checkpoint(run_dir)
    if cfg.train.resume and resume_from is None:
        raise TunelabError(f"--resume: {run_dir} has no checkpoint to resume from (checkpoints/checkpoint-N)")
    if not cfg.train.resume and (resume_from or (run_dir / "summary.json").exists()):
        raise TunelabError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it, "
            "or choose another run.name / run.dir"
        )
    if not is_main():  # under several processes, rank 0 alone writes the run folder
        return run_dir, resume_from
    if not cfg.train.resume:  # a run killed before its first checkpoint starts over: drop what it logged
        for stale in ("metrics.jsonl", "eval_before.json"):
            (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir, resume_from


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def evaluate(trainer, model, tokenizer, cfg: Config, examples, label: str) -> tuple[dict, list[dict]]:
    """Validation loss/perplexity on all validation rows, task metrics on the first generation_samples."""
    from tunelab.evals.generation import generation_eval

    metrics = trainer.evaluate()
    result = {"loss": metrics["eval_loss"], "perplexity": metrics["eval_perplexity"]}
    task, rows = generation_eval(
        model, tokenizer, examples, cfg.eval.generation_samples, cfg.eval.metrics,
        cfg.eval.max_new_tokens, cfg.eval.batch_size, desc=f"generating ({label})",
    )
    result.update(task)
    log.info("eval %s: %s", label, ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result, rows


def evaluate_before(trainer, tokenizer, cfg: Config, data, path: Path) -> tuple[dict, list[dict]]:
    """Evaluate the untouched model and keep the result, so a resumed run reuses it."""
    before, rows = evaluate(trainer, trainer.model, tokenizer, cfg, data.eval_examples, "before")
    if is_main():
        write_json(path, {"metrics": before, "rows": rows})
    return before, rows


def build_trainer(cfg: Config, model, tokenizer, data, run_dir: Path, resume_step: int | None, report_to: list[str]):
    from transformers import EarlyStoppingCallback

    from tunelab.data.batching import Collator
    from tunelab.trainer import TunelabTrainer, training_arguments

    args = training_arguments(cfg, str(run_dir / "checkpoints"), report_to)
    callbacks = [MetricsCallback(run_dir / "metrics.jsonl", resume_step=resume_step)]
    if cfg.train.early_stopping:
        es = cfg.train.early_stopping
        callbacks.append(EarlyStoppingCallback(es.patience, es.threshold))
    collator = Collator(tokenizer.pad_token_id)
    trainer = TunelabTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
        generation=(cfg.train.eval_generation, data.eval_examples, cfg.eval) if cfg.train.eval_generation else None,
    )
    return trainer, collator


def train(trainer, resume_from: Path | None) -> dict:
    from transformers import set_seed

    # The shuffle order is drawn from the global RNG when training starts; re-seed so it does not
    # depend on what ran before (the before-evaluation, which a resumed run skips).
    set_seed(trainer.args.seed)
    start = time.time()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        raise TunelabError(
            f"out of memory at step {trainer.state.global_step + 1}; the last checkpoint is kept in "
            f"{trainer.args.output_dir}. Lower train.batch_size (raise train.grad_accum to keep the batch), "
            "lower data.max_length, set train.gradient_checkpointing=true, or use quantization.bits=4 (QLoRA)."
        ) from None
    return {"runtime_s": time.time() - start, "train_loss": output.training_loss}


def run(cfg: Config) -> RunResult:
    from tunelab.data.prepare import prepare
    from tunelab.models.build import load_for_training, precision, save_trained
    from tunelab.tracking.plots import plot_metrics
    from tunelab.tracking.report import write_report
    from tunelab.tracking.wandb_setup import finish_wandb, wandb_report_to

    from transformers import set_seed

    distributed.init(cfg)  # joins the process group (if torchrun started several) before the model loads
    run_dir, resume_from = open_run_dir(cfg)
    report_to = wandb_report_to(cfg.tracking.wandb, cfg.tracking.project, cfg.run.name, run_dir,
                                list(cfg.tracking.report_to))  # checks the integrations before the model loads
    set_seed(cfg.run.seed)  # LoRA's A matrices and new embedding rows are drawn from the global RNG
    with distributed.main_process_first():
        model, tokenizer = load_for_training(cfg, sharded=distributed.fsdp_enabled(cfg))
        data = prepare(cfg.data, tokenizer, cfg.run.seed)
    if is_main():
        write_json(run_dir / "data_stats.json", data.stats)
    if data.test_examples is not None and is_main():
        data.test_examples.to_json(run_dir / "test.jsonl")  # held out for `tunelab eval`

    resume_step = int(resume_from.name.split("-")[-1]) if resume_from else None
    trainer, collator = build_trainer(cfg, model, tokenizer, data, run_dir, resume_step, report_to)

    # Evaluate the untouched model once; a resumed run reuses that result.
    before_file = run_dir / "eval_before.json"
    before, before_rows, deferred = {}, [], None
    if before_file.exists():
        saved = json.loads(before_file.read_text())
        before, before_rows = saved["metrics"], saved["rows"]
    elif cfg.eval.before and distributed.fsdp_enabled(cfg):  # FSDP2 shards the model inside train()
        deferred = distributed.after_sharding(trainer, lambda: evaluate_before(trainer, tokenizer, cfg, data, before_file))
    elif cfg.eval.before:
        before, before_rows = evaluate_before(trainer, tokenizer, cfg, data, before_file)

    timing = train(trainer, resume_from)
    if deferred:
        before, before_rows = deferred.result
    after, after_rows = evaluate(trainer, model, tokenizer, cfg, data.eval_examples, "after")
    finish_wandb()  # transformers never closes its W&B run; flush it before the report

    full = cfg.peft.method == "full"
    state_dict = distributed.full_state_dict(trainer, precision(cfg.train.precision, cfg.model.dtype).dtype if full else None)
    real_tokens = distributed.total(collator.real_tokens)
    if not is_main():
        return RunResult(run_dir, {})
    out = save_trained(trainer.model, tokenizer, run_dir, full=full, state_dict=state_dict)
    write_samples(run_dir / "samples.jsonl", before_rows, after_rows)
    summary = {
        "model": cfg.model.name,
        "method": cfg.method,
        "output": str(out),
        "data": data.stats,
        "train": {
            **train_stats(trainer, timing, run_dir),
            "tokens_per_s": real_tokens / timing["runtime_s"] if timing["runtime_s"] else None,  # all processes
            "pad_fraction": collator.pad_fraction,
        },
        "eval": {"before": before, "after": after},
        "warnings": run_warnings(records := read_jsonl(run_dir / "metrics.jsonl")),
    }
    write_json(run_dir / "summary.json", summary)
    plot_metrics(records, run_dir / "plots")
    write_report(run_dir)
    return RunResult(run_dir, summary)


def train_stats(trainer, timing: dict, run_dir: Path) -> dict:
    """The summary's `train` numbers every training stage reports (SFT, reward, DPO, RL)."""
    return {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "runtime_s": timing["runtime_s"],
        "peak_memory_gb": peak_memory_gb(),
        "final_loss": last_train_loss(run_dir / "metrics.jsonl"),
        "mean_loss": timing["train_loss"],
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def run_warnings(records: list[dict]) -> list[str]:
    """What the user should know about how training went (shown by the CLI and in the report)."""
    from tunelab.tracking.diagnostics import describe, overfitting

    flag = overfitting(records)
    if flag:
        log.warning(describe(flag))
    return [describe(flag)] if flag else []


def last_train_loss(metrics_file: Path) -> float | None:
    losses = [r["loss"] for r in read_jsonl(metrics_file) if "loss" in r]
    return losses[-1] if losses else None


def write_samples(path: Path, before: list[dict], after: list[dict]) -> None:
    with path.open("w") as f:
        for i, row in enumerate(after):
            f.write(json.dumps({
                "prompt": row["prompt"],
                "reference": row["reference"],
                "before": before[i]["prediction"] if i < len(before) else None,
                "after": row["prediction"],
            }) + "\n")
