"""What a training run keeps current while it trains, for `tunelab board` and for anyone who opens
the run folder: metrics.jsonl (every Trainer log), status.json's heartbeat at every log step, and
the plots and report.html at every validation (so a long run has a current report before it ends)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from tunelab.tracking.metrics import _dumps, append_jsonl, atomic_write_text, perplexity, read_jsonl, write_json
from tunelab.tracking.plots import plot_metrics
from tunelab.tracking.report import write_report
from tunelab.tracking.status import CHECKPOINT_DONE, write_status


class MetricsCallback(TrainerCallback):
    """Mirrors every Trainer log to metrics.jsonl, the source for plots and the report."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, perplexity: bool = True,
                 resume_time: float | None = None):
        """`resume_step`: the checkpoint step a resumed run restarts from, `resume_time`: when that
        checkpoint was complete. Lines logged after it are dropped now because the resumed run logs
        them again (also those of its own step logged after the save: the end of a run killed after
        its last checkpoint). `perplexity`: add exp(loss) to loss lines (false where the loss is no
        cross-entropy, as in DPO)."""
        self.path = Path(path)
        self.perplexity = perplexity
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step
                    and (resume_time is None or r.get("time", 0) <= resume_time)]
            atomic_write_text(self.path, "".join(_dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Under multi-process training every rank gets on_log; only one may write.
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        if "eval_loss" in logs and self.perplexity:
            record["perplexity"] = perplexity(logs["eval_loss"])
        if "loss" in logs and self.perplexity:
            record["train_perplexity"] = perplexity(logs["loss"])
        append_jsonl(self.path, record)


class CheckpointMarker(TrainerCallback):
    """Logs at every checkpoint step, and marks checkpoint-N complete (`CHECKPOINT_DONE`) once transformers has written all of it:
    on_save comes after `Trainer._save_checkpoint`, whose writes are collective under several
    processes, so the main process marks it alone."""

    def on_step_end(self, args, state, control, **kwargs):
        """A checkpoint step is also a log step. transformers keeps the training loss summed since the
        last log in memory only, so a run resumed from a checkpoint between two log steps would next
        log the mean of the resumed steps alone; logged first, the sum is in the records instead."""
        if control.should_save:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(folder / CHECKPOINT_DONE, {"step": state.global_step, "time": time.time()})


class ProgressLines(ProgressCallback):
    """transformers' progress bar, with one formatted line per log step above it instead of the
    raw log dict: `step 20/100  loss 1.234  lr 2.00e-04  3,456 tok/s  ETA 0:01:05`, and
    `step 20/100  validation loss 1.301  perplexity 3.67` for a validation."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.start = self.last = (time.time(), state.global_step, state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        line = progress_line(logs, state, self.start, self.last)
        self.last = (time.time(), state.global_step, state.num_input_tokens_seen)
        if line:
            self.training_bar.write(line)


def progress_line(logs: dict, state, start: tuple, last: tuple) -> str | None:
    """One log step as a line; start/last: (time, step, tokens seen) when training began and at the
    previous log. None for the trainer's end-of-training summary (the table follows)."""
    at = f"step {state.global_step}/{state.max_steps}"
    if any(key.startswith("eval_") for key in logs):
        shown = {key.removeprefix("eval_"): value for key, value in logs.items() if key.startswith("eval_")
                 and not key.endswith(("_runtime", "_per_second", "_tokens"))}
        return f"{at}  validation " + "  ".join(f"{key} {value:.4g}" for key, value in shown.items()
                                               if isinstance(value, (int, float)))
    if "loss" not in logs:
        return None
    now = time.time()
    parts = [at, f"loss {logs['loss']:.4g}"]
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if state.num_input_tokens_seen and now > last[0]:
        parts.append(f"{(state.num_input_tokens_seen - last[2]) / (now - last[0]):,.0f} tok/s")
    done = state.global_step - start[1]
    if done > 0:
        remaining = (now - start[0]) / done * (state.max_steps - state.global_step)
        parts.append(f"ETA {int(remaining) // 3600}:{int(remaining) % 3600 // 60:02d}:{int(remaining) % 60:02d}")
    return "  ".join(parts)


class LiveRunCallback(TrainerCallback):
    """Add after MetricsCallback: the validation's metrics.jsonl line is written (on_log) before
    on_evaluate redraws from it. Only the main process writes."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)

    def _beat(self, state) -> None:
        write_status(self.run_dir, "running", step=state.global_step, max_steps=state.max_steps or None)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._beat(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self._beat(state)

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_metrics(read_jsonl(self.run_dir / "metrics.jsonl"), self.run_dir / "plots")
            write_report(self.run_dir)
