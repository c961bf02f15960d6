"""The run lifecycle every training command goes through (`train`, `reward`, `dpo`, `rl`).

processes → run folder checks → trackers → seed → tokenizer, data (every row checked) and model →
run folder files → trainer → evaluate before (once; a resumed run reuses it) → train → evaluate
after → gather shards → save → samples, summary, plots, report. A run that fails before it trains
leaves its folder as it was (`as_it_was_on_failure`). A stage (`stages/sft.py`, `reward.py`, `dpo.py`, `rl.py`)
brings only what differs, as a `Stage`: how it loads, which trainer it builds, what "better"
means for it. Everything that depends on the number of processes lives here, once.

torch and transformers are imported inside the functions: a command imports its stage (and so
this module) only after its config validated, and the stage modules stay light to import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import distributed
from tunelab.config import Config, dump_config
from tunelab.distributed import is_main
from tunelab.errors import TunelabError
from tunelab.tracking.metrics import atomic_write_text, read_jsonl, write_json
from tunelab.tracking.status import CHECKPOINT_DONE, checkpoint_complete, checkpoint_folders

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What every command's `run(config)` returns: the folder it wrote and its summary."""

    run_dir: Path
    summary: dict


@dataclass
class Loaded:
    """What a stage loaded: the tokenizer and its data (`train`/`eval` datasets for the trainer,
    `stats`, and `test_examples` held out for `tunelab eval`, or None); `model` when the stage
    built it up front (SFT), else the stage's `build` does."""

    tokenizer: Any
    data: Any
    model: Any = None


def load_pairs(cfg: Config, sharded: bool = False) -> Loaded:
    """`Stage.load` of the stages that train on preference pairs (reward, dpo, rl): the model's
    tokenizer and the validated, split, length-checked pairs; their models come in `build`."""
    from tunelab.data.preferences import load_preferences
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import resolve

    tokenizer = load_tokenizer(resolve(cfg.model.name), cfg.model.chat_template)
    return Loaded(tokenizer, load_preferences(cfg, tokenizer))


@dataclass(frozen=True)
class Stage:
    """One training command, for `run`.

    load(cfg, sharded) → Loaded (sharded: FSDP2 will shard the model).
    build(cfg, loaded, args_for, callbacks) → the trainer; `args_for(ConfigClass, **extra)` gives
    that trainer's arguments from the run's train.* settings (`trainer.stage_arguments`).
    measure(trainer, cfg, loaded, label) → (metrics for the before/after table, sample rows).
    speed(trainer, training_s) → extra `train` numbers for the summary (tokens/s, padding); training_s
    is the training wall time without its validations.
    curves: extra plots, name → (title, {metrics.jsonl key: legend label}).
    multi_process: the stage runs under several processes (torchrun, `--nproc`); others refuse.
    perplexity: its loss is a token cross-entropy, so metrics.jsonl gets exp(loss) too.
    """

    name: str
    load: Callable[[Config, bool], Loaded]
    build: Callable
    measure: Callable[[Any, Config, Loaded, str], tuple[dict, list[dict]]]
    speed: Callable[[Any, float], dict] | None = None
    curves: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    multi_process: bool = False
    perplexity: bool = True


def checkpoints(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """(the newest complete checkpoint, or None; the checkpoints a kill cut short while they were
    written). The one place that decides what `--resume` continues from."""
    found = [folder for _, folder in checkpoint_folders(run_dir)]
    complete = [folder for folder in found if checkpoint_complete(folder)]
    return (complete[-1] if complete else None), [folder for folder in found if folder not in complete]


def last_checkpoint(run_dir: Path) -> Path | None:
    return checkpoints(run_dir)[0]


def run_ended_at(checkpoint: Path) -> bool:
    """Whether early stopping had stopped the run when `checkpoint` was written (its saved
    TrainerControl); the last step is checked against the resumed run's own plan (ResumeGuard)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    return bool(control.get("should_training_stop"))


def open_run_dir(cfg: Config) -> tuple[Path, Path | None, list[Path]]:
    """(run folder, checkpoint to resume from, checkpoints cut short): refuse to mix a new run into
    an old one unless resuming, and name the checkpoint resumed from. Writes nothing."""
    run_dir = cfg.run.path
    resume_from, cut = checkpoints(run_dir)
    if cfg.train.resume and resume_from is None:
        short = f"; {', '.join(f.name for f in cut)} was cut short while it was written" if cut else ""
        raise TunelabError(f"--resume: {run_dir} has no complete checkpoint to resume from "
                           f"(checkpoints/checkpoint-N{short})")
    if not cfg.train.resume and (resume_from or (run_dir / "summary.json").exists()):
        raise TunelabError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it, "
            "or choose another run.name / run.dir"
        )
    if resume_from is not None and is_main():
        log.info("resuming from %s", resume_from.name)
    return run_dir, resume_from, cut


def write_run_folder(cfg: Config, run_dir: Path, cut: list[Path], loaded: Loaded) -> None:
    """The run folder's first files, once the config, paths and data have passed their checks (main
    process only). Checkpoints cut short go (a resumed run writes them again)."""
    for folder in cut:
        log.warning("%s was cut short while it was written (it has no %s); removing it", folder.name, CHECKPOINT_DONE)
        shutil.rmtree(folder, ignore_errors=True)
    if not cfg.train.resume:  # a run killed before its first checkpoint starts over: drop what it logged
        for stale in ("metrics.jsonl", "eval_before.json"):
            (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    write_json(run_dir / "data_stats.json", loaded.data.stats)
    if loaded.data.test_examples is not None:
        loaded.data.test_examples.to_json(run_dir / "test.jsonl")


@contextlib.contextmanager
def as_it_was_on_failure(run_dir: Path):
    """A run that fails (or is interrupted) before training starts leaves its folder as it was: what
    this attempt added is removed, and a folder it created goes altogether."""
    existed = run_dir.is_dir()
    before = set(run_dir.iterdir()) if existed else set()
    try:
        yield
    except BaseException:
        if is_main() and not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif is_main():
            for added in set(run_dir.iterdir()) - before:
                shutil.rmtree(added) if added.is_dir() else added.unlink()
        raise


def check_processes(cfg: Config, stage: Stage) -> None:
    """Join the process group (torchrun / accelerate launch / `--nproc`), or refuse it for a stage
    that runs on one process only, before anything is written."""
    processes = distributed.world_size()
    if processes > 1 and not stage.multi_process:
        raise TunelabError(
            f"tunelab {stage.name} runs on one process, but {processes} were started (torchrun or "
            f"accelerate launch); run `tunelab {stage.name} RECIPE` directly (several GPUs: `tunelab train --nproc N`)"
        )
    distributed.init(cfg)


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def train(trainer, resume_from: Path | None) -> dict:
    import torch
    from transformers import set_seed

    from tunelab.trainer import AlreadyFinished, ResumeGuard

    # The shuffle order is drawn from the global RNG when training starts; re-seed so it does not
    # depend on what ran before (the before-evaluation, which a resumed run skips).
    set_seed(trainer.args.seed)
    if resume_from is not None:
        trainer.add_callback(ResumeGuard(run_ended_at(resume_from)))
    start = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except AlreadyFinished:
        # The checkpoint is the run's end, its weights and state loaded: finish as train() does after
        # its last step (the best checkpoint's weights with load_best, the final log, on_train_end).
        # `_finalize_training` is transformers' own (private) tail of the loop; see ResumeGuard.
        trainer._finalize_training(None, 0, start)
        keep_last_validation(trainer, resume_from)
    except torch.OutOfMemoryError:
        raise TunelabError(
            f"out of memory at step {trainer.state.global_step + 1}; the last checkpoint is kept in "
            f"{trainer.args.output_dir}. Lower train.batch_size (raise train.grad_accum to keep the batch), "
            "lower data.max_length, set train.gradient_checkpointing=true, or use quantization.bits=4 (QLoRA)."
        ) from None
    return train_timing(trainer, time.time() - start)


def keep_last_validation(trainer, checkpoint: Path) -> None:
    """A run resumed at its end trains no step, so the validation its last step ran — logged before
    that checkpoint was written, and kept in metrics.jsonl — is the loaded model's: given back to a
    trainer that keeps one (`last_eval`), so "after" reuses it as the uninterrupted run did instead
    of logging a second validation. (On one process: elsewhere every rank would have to agree.)"""
    if not hasattr(trainer, "last_eval") or distributed.world_size() > 1:
        return
    step, metrics = trainer.state.global_step, checkpoint.parent.parent / "metrics.jsonl"
    logged = [r for r in read_jsonl(metrics) if r.get("step") == step and "eval_loss" in r] if metrics.exists() else []
    if logged:
        trainer.last_eval = (step, {key: value for key, value in logged[-1].items() if key.startswith("eval_")})


def train_timing(trainer, runtime_s: float) -> dict:
    """The wall time of `trainer.train()`, and — for a trainer with a StepClock (SFT's) — the
    training time without the validations run inside it, and where a step's time went."""
    clock = getattr(trainer, "clock", None)
    if clock is None:
        return {"runtime_s": runtime_s, "training_s": runtime_s}
    parts = clock.totals()
    return {"runtime_s": runtime_s, "training_s": runtime_s - parts["evaluation"], "step_time_s": parts}


def measure_before(stage: Stage, trainer, cfg: Config, loaded: Loaded, run_dir: Path):
    """The untouched model's metrics, measured once and kept, so a resumed run reuses them.

    Returns (metrics, rows), or — under FSDP2, which shards the model only inside `train()` —
    a callback whose `.result` holds them once training has begun."""
    saved = run_dir / "eval_before.json"
    if saved.exists():
        kept = json.loads(saved.read_text())
        return kept["metrics"], kept["rows"]
    if not cfg.eval.before:
        return {}, []

    def measure():
        metrics, rows = stage.measure(trainer, cfg, loaded, "before")
        if is_main():
            write_json(saved, {"metrics": metrics, "rows": rows})
        return metrics, rows

    if distributed.fsdp_enabled(cfg):
        return distributed.after_sharding(trainer, measure)
    return measure()


def save_output(trainer, tokenizer, cfg: Config, run_dir: Path, state_dict: dict | None) -> Path:
    """The adapter (without trl's frozen `ref` copy) or the full model, with the tokenizer."""
    from tunelab.models.build import save_trained

    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    return save_trained(model, tokenizer, run_dir, full=cfg.peft.method == "full", state_dict=state_dict)


def run(cfg: Config, stage: Stage) -> RunResult:
    """The whole run of `stage` under `cfg`; see the module docstring for the sequence."""
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    from tunelab.models.build import precision
    from tunelab.evals.intervals import add_run_intervals
    from tunelab.tracking.live import CheckpointMarker, LiveRunCallback, MetricsCallback, ProgressLines
    from tunelab.tracking.status import write_status
    from tunelab.tracking.plots import plot_curves, plot_metrics
    from tunelab.tracking.report import write_report
    from tunelab.tracking.trackers import send_results, tensorboard_dir
    from tunelab.tracking.wandb_setup import finish_wandb, wandb_report_to
    from tunelab.trainer import stage_arguments

    check_processes(cfg, stage)
    run_dir, resume_from, cut = open_run_dir(cfg)
    if is_main():
        log.info("run folder: %s", run_dir)
    with as_it_was_on_failure(run_dir):
        report_to = wandb_report_to(cfg.tracking.wandb, cfg.tracking.project, cfg.run.name, run_dir,
                                    list(cfg.tracking.report_to))  # checks the integrations before the model loads
        tensorboard = tensorboard_dir(run_dir, report_to) if is_main() else None
        set_seed(cfg.run.seed)  # LoRA's A matrices, new embedding rows, a score head: drawn from the global RNG
        with distributed.main_process_first():  # rank 0 fills the caches (converted GGUF, tokenized data) first
            loaded = stage.load(cfg, distributed.fsdp_enabled(cfg))  # checks rows before the model loads
        if is_main():
            write_run_folder(cfg, run_dir, cut, loaded)
            write_status(run_dir, "running", step=0)  # the board reads it; LiveRunCallback keeps it beating
        marker = json.loads((resume_from / CHECKPOINT_DONE).read_text()) if resume_from else {}
        callbacks = [MetricsCallback(run_dir / "metrics.jsonl", resume_step=marker.get("step"),
                                     perplexity=stage.perplexity, resume_time=marker.get("time")),
                     LiveRunCallback(run_dir), CheckpointMarker()]
        trainer = stage.build(cfg, loaded, lambda cls, **extra: stage_arguments(cls, cfg, run_dir, report_to, **extra),
                              callbacks)
        trainer.remove_callback(ProgressCallback)  # the bar stays; the raw log dicts become ProgressLines' lines
        trainer.add_callback(ProgressLines())
        before = measure_before(stage, trainer, cfg, loaded, run_dir)
    with said_in_status(run_dir):
        timed = train(trainer, resume_from)
        before, before_rows = before if isinstance(before, tuple) else before.result
        after, after_rows = stage.measure(trainer, cfg, loaded, "after")
    samples = sample_rows(before_rows, after_rows)
    if is_main():
        send_results(before, after, samples, trainer.state.global_step, tensorboard)
    finish_wandb()  # transformers never closes its W&B run; flush it before the report

    full = cfg.peft.method == "full"
    state_dict = distributed.full_state_dict(trainer, precision(cfg.train.precision, cfg.model.dtype).dtype
                                             if full else None)  # a collective: every rank takes part
    speed = stage.speed(trainer, timed["training_s"]) if stage.speed else {}
    if not is_main():
        return RunResult(run_dir, {})
    out = save_output(trainer, loaded.tokenizer, cfg, run_dir, state_dict)
    if samples:
        atomic_write_text(run_dir / "samples.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples))
    summary = {
        "command": stage.name,
        "model": cfg.model.name,
        "method": cfg.method,
        "output": str(out),
        "data": loaded.data.stats,
        "train": {**train_stats(trainer, timed, run_dir), **speed},
        "eval": {"before": before, "after": after},
        "warnings": run_warnings(records := read_jsonl(run_dir / "metrics.jsonl")),
    }
    add_run_intervals(summary, samples)  # 95% intervals, paired after − before tests on the same rows
    write_json(run_dir / "summary.json", summary)
    plot_metrics(records, run_dir / "plots")
    for name, (title, keys) in stage.curves.items():
        plot_curves(records, keys, title, run_dir / "plots" / f"{name}.png")
    write_report(run_dir)
    write_status(run_dir, "finished", step=trainer.state.global_step)
    return RunResult(run_dir, summary)


@contextlib.contextmanager
def said_in_status(run_dir: Path):
    """status.json says `interrupted` (Ctrl-C, a kill the process sees) or `failed` (with the error)
    when training or the after-evaluation stops; rank 0 writes it."""
    from tunelab.tracking.status import write_status

    try:
        yield
    except KeyboardInterrupt:
        if is_main():
            write_status(run_dir, "interrupted")
        raise
    except Exception as err:
        if is_main():
            write_status(run_dir, "failed", error=f"{type(err).__name__}: {err}")
        raise


def train_stats(trainer, timing: dict, run_dir: Path) -> dict:
    """The summary's `train` numbers every training stage reports. The losses come from
    metrics.jsonl, which holds every step once however often the run was resumed."""
    import torch

    records = read_jsonl(run_dir / "metrics.jsonl")

    return {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        **timing,
        "peak_memory_gb": peak_memory_gb(),
        "final_loss": last_train_loss(records),
        "mean_loss": mean_train_loss(records),
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


def last_train_loss(records: list[dict]) -> float | None:
    losses = [r["loss"] for r in records if "loss" in r]
    return losses[-1] if losses else None


def mean_train_loss(records: list[dict]) -> float | None:
    """The mean training loss over all steps: each logged loss is the mean of the steps since the
    previous log, so it weighs as many steps (what transformers' training_loss is for a run that
    was never resumed)."""
    logged = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] is not None]
    steps = [step - before for (step, _), before in zip(logged, [0, *(s for s, _ in logged)])]
    return sum(n * loss for n, (_, loss) in zip(steps, logged)) / sum(steps) if sum(steps) else None


def sample_rows(before: list[dict], after: list[dict]) -> list[dict]:
    """samples.jsonl's rows: each generated prompt with its reference and both models' answers,
    and its conversation (`messages`, the turns before the answer) where the stage kept it."""
    rows = []
    for i, row in enumerate(after):
        rows.append({
            "prompt": row["prompt"],
            **({"messages": row["messages"]} if "messages" in row else {}),
            "reference": row["reference"],
            "before": before[i]["prediction"] if i < len(before) else None,
            "after": row["prediction"],
        })
    return rows
