"""What a training run keeps current while it trains, for `tunelab board` and for anyone who opens
the run folder: status.json's heartbeat at every log step, and the plots and report.html at
every validation (so a long run has a current report before it ends)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback

from tunelab.tracking.metrics import read_jsonl
from tunelab.tracking.plots import plot_metrics
from tunelab.tracking.report import write_report
from tunelab.tracking.status import write_status


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
