"""What `tunelab reward`, `dpo` and `rl` share: the SFT run folder and its sequence.

open the run folder → load preference pairs → build the stage's trl trainer → evaluate before
→ train → evaluate after → save the adapter → summary, plots, report. Each stage module brings
only what differs (`Stage`): its model and trainer, and what "better" means for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import Config
from tunelab.errors import TunelabError
from tunelab.stages.sft import RunResult, open_run_dir, run_warnings, train, train_stats, write_samples
from tunelab.tracking.metrics import MetricsCallback, read_jsonl, write_json

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One preference command.

    build(cfg, tokenizer, data, args_for, callbacks) → a trl trainer; `args_for(ConfigClass, **extra)`
    gives that trainer's config from the run's train.* settings.
    evaluate(trainer, cfg, data, label) → (metrics for the before/after table, sample rows).
    curves: extra plots, name → (title, {metrics.jsonl key: legend label}).
    """

    name: str
    build: Callable
    evaluate: Callable
    curves: dict[str, tuple[str, dict[str, str]]]


def trl_arguments(config_class, cfg: Config, run_dir: Path, report_to: list[str], **extra):
    """A trl config (DPOConfig, RewardConfig, RLOOConfig) holding exactly the TrainingArguments that
    SFT uses for these train.* settings, plus the stage's own `extra` fields.

    trl's configs change some transformers defaults (gradient checkpointing on, bf16 on, logging
    every 10 steps); copying every field over keeps one meaning for each train.* key.
    """
    from tunelab.trainer import training_arguments

    base = training_arguments(cfg, str(run_dir / "checkpoints"), report_to)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    values.update(
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        train_sampling_strategy="random",  # length grouping needs SFT's `length` column
        label_names=[],  # trl's trainers compute their own losses; there is no labels column
        **extra,
    )
    return config_class(**values)


def load_policy(cfg: Config, tokenizer):
    """(causal LM, peft_config for trl or None): a fresh adapter comes from peft.*, full
    fine-tuning has none, and a preceding LoRA run (`model.name=runs/<sft run>`) is continued, not
    merged: its adapter is the trainable one, so QLoRA works on top of it and the result is again
    one adapter on the original base. trl then keeps a frozen copy of that adapter as the
    reference, i.e. the reference is the SFT model, as DPO and RLHF intend."""
    from tunelab.models.build import build_model, lora_config, model_options
    from tunelab.models.loading import resolve

    source = resolve(cfg.model.name)
    if source.adapter is not None and cfg.peft.method == "full":
        raise TunelabError(f"peft.method=full: model.name={cfg.model.name} is a LoRA run; merge it first "
                           "(`tunelab merge`) to fine-tune all weights on top of it")
    model = build_model(source, tokenizer, adapter="continue", **model_options(cfg))
    if source.adapter is not None:
        log.info("continuing the adapter of %s (its r/alpha/targets; peft.* shapes only new adapters)", source.adapter)
        return model, None
    return model, (None if cfg.peft.method == "full" else lora_config(cfg.peft))


def pair_metrics(margins: torch.Tensor, prefix: str = "") -> dict:
    """Held-out metrics from per-pair margins (score of chosen − score of rejected): the pairwise
    loss −log σ(margin), the share of pairs ordered right (a tie counts half, so an untrained
    model that cannot tell the two apart scores 0.5, not 0) and the mean margin."""
    margins = margins.double()
    right = (margins > 0).double() + 0.5 * (margins == 0).double()
    return {
        "loss": -torch.nn.functional.logsigmoid(margins).mean().item(),
        f"{prefix}accuracy": right.mean().item(),
        f"{prefix}margin": margins.mean().item(),
    }


def generation_rows(data) -> list[dict]:
    """Validation pairs as chat examples ending on the chosen answer (the reference to compare with)."""
    return [{"messages": p + c} for p, c in zip(data.eval["prompt"], data.eval["chosen"])]


def save_output(model, tokenizer, cfg: Config, run_dir: Path) -> Path:
    """The adapter (without trl's frozen `ref` copy) or the full model, with the tokenizer."""
    from tunelab.models.build import save_trained

    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    return save_trained(model, tokenizer, run_dir, full=cfg.peft.method == "full")


def _evaluate_before(stage: Stage, trainer, cfg: Config, data, run_dir: Path) -> tuple[dict, list[dict]]:
    """Evaluate the untouched model once; a resumed run reuses that result."""
    before_file = run_dir / "eval_before.json"
    if before_file.exists():
        saved = json.loads(before_file.read_text())
        return saved["metrics"], saved["rows"]
    if not cfg.eval.before:
        return {}, []
    before, rows = stage.evaluate(trainer, cfg, data, "before")
    write_json(before_file, {"metrics": before, "rows": rows})
    return before, rows


def run_stage(cfg: Config, stage: Stage) -> RunResult:
    from transformers import set_seed

    from tunelab.data.preferences import load_preferences
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import resolve
    from tunelab.tracking.plots import plot_curves, plot_metrics
    from tunelab.tracking.report import write_report
    from tunelab.tracking.wandb_setup import finish_wandb, wandb_report_to

    run_dir, resume_from = open_run_dir(cfg)
    report_to = wandb_report_to(cfg.tracking.wandb, cfg.tracking.project, cfg.run.name, run_dir,
                                list(cfg.tracking.report_to))  # checks the integrations before the model loads
    set_seed(cfg.run.seed)  # LoRA's A matrices and a reward model's new score head come from the global RNG
    tokenizer = load_tokenizer(resolve(cfg.model.name))
    data = load_preferences(cfg, tokenizer)
    write_json(run_dir / "data_stats.json", data.stats)

    resume_step = int(resume_from.name.split("-")[-1]) if resume_from else None
    callbacks = [MetricsCallback(run_dir / "metrics.jsonl", resume_step=resume_step, perplexity=False)]
    trainer = stage.build(cfg, tokenizer, data, lambda cls, **extra: trl_arguments(cls, cfg, run_dir, report_to, **extra),
                          callbacks)

    before, before_rows = _evaluate_before(stage, trainer, cfg, data, run_dir)
    timing = train(trainer, resume_from)
    after, after_rows = stage.evaluate(trainer, cfg, data, "after")
    finish_wandb()  # transformers never closes its W&B run; flush it before the report

    out = save_output(trainer.model, tokenizer, cfg, run_dir)
    if after_rows:
        write_samples(run_dir / "samples.jsonl", before_rows, after_rows)
    summary = {
        "command": stage.name,
        "model": cfg.model.name,
        "method": cfg.method,
        "output": str(out),
        "data": data.stats,
        "train": train_stats(trainer, timing, run_dir),
        "eval": {"before": before, "after": after},
        "warnings": run_warnings(records := read_jsonl(run_dir / "metrics.jsonl")),
    }
    write_json(run_dir / "summary.json", summary)
    plot_metrics(records, run_dir / "plots")
    for name, (title, keys) in stage.curves.items():
        plot_curves(records, keys, title, run_dir / "plots" / f"{name}.png")
    write_report(run_dir)
    return RunResult(run_dir, summary)
