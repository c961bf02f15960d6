"""`--resume` after a kill at any instant ends as the uninterrupted run: a checkpoint cut short is
never resumed from, and a run killed after its last step trains no extra step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_sft import Killed, _cfg
from tunelab import lifecycle
from tunelab.errors import TunelabError
from tunelab.stages import sft
from tunelab.tracking.metrics import read_jsonl

COMMON = ("train.save_every=2", "train.max_steps=4", "peft.dropout=0.1", "data.max_train_samples=16",
          "data.max_eval_samples=4")
PROCESS_NUMBERS = ("runtime_s", "training_s", "step_time_s", "tokens", "peak_memory_gb", "tokens_per_s", "mfu",
                   "pad_fraction")
"""Summary numbers that describe the process that ran, not the run (a resumed process trains fewer tokens)."""


def _run(tmp, tiny_model_dir, task_dir, *extra):
    return sft.run(_cfg(tmp, tiny_model_dir, task_dir, *COMMON, *extra))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, task_dir) -> Path:
    """The uninterrupted run every resumed one must equal."""
    return _run(tmp_path_factory.mktemp("straight"), tiny_model_dir, task_dir).run_dir


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _comparable(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    for key in PROCESS_NUMBERS:
        summary["train"].pop(key, None)
    summary.pop("output")
    return _flat(summary)


def _metric_lines(run: Path) -> list[tuple[int, tuple[str, ...]]]:
    """metrics.jsonl as (step, logged keys) per line: which logs were written, in order."""
    return [(r["step"], tuple(sorted(k for k in r if k not in ("time", "epoch")))) for r in read_jsonl(run / "metrics.jsonl")]


def assert_same_end(run: Path, straight: Path) -> None:
    a, b = load_file(run / "adapter" / "adapter_model.safetensors"), load_file(straight / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name
    got, want = _comparable(run), _comparable(straight)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), key
    assert _metric_lines(run) == _metric_lines(straight)
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r], rel=1e-4)
    assert (run / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()
    assert (run / "report.html").is_file()


def test_a_checkpoint_cut_short_is_skipped_and_the_run_resumes_from_the_one_before(
        tmp_path, tiny_model_dir, task_dir, straight, monkeypatch, caplog):
    from transformers import Trainer

    save = Trainer._save_optimizer_and_scheduler

    def killed_while_saving_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise Killed  # the weights of checkpoint-4 are written, its optimizer state is not
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_while_saving_step_4)
    with pytest.raises(Killed):
        _run(tmp_path, tiny_model_dir, task_dir)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "checkpoint-4").is_dir()
    assert lifecycle.last_checkpoint(tmp_path / "run") == checkpoints / "checkpoint-2"

    with caplog.at_level("INFO", logger="tunelab"):
        resumed = _run(tmp_path, tiny_model_dir, task_dir, "train.resume=true").run_dir
    assert "checkpoint-4 was cut short" in caplog.text and "resuming from checkpoint-2" in caplog.text
    assert_same_end(resumed, straight)


def test_a_run_killed_after_its_last_step_ends_as_the_uninterrupted_one(
        tmp_path, tiny_model_dir, task_dir, straight, monkeypatch):
    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(lifecycle, "save_output", killed)  # the kill lands while the adapter is written
    with pytest.raises(Killed):
        _run(tmp_path, tiny_model_dir, task_dir)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert lifecycle.last_checkpoint(run).name == "checkpoint-4" and not (run / "summary.json").exists()
    assert_same_end(_run(tmp_path, tiny_model_dir, task_dir, "train.resume=true").run_dir, straight)

    # A finished run whose adapter and summary were removed: --resume rebuilds the same end.
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    assert_same_end(_run(tmp_path, tiny_model_dir, task_dir, "train.resume=true").run_dir, straight)


def test_a_run_that_validated_at_its_last_step_resumes_at_its_end_without_a_second_validation(
        tmp_path, tiny_model_dir, task_dir, monkeypatch):
    """With train.eval_every at the last step, that validation (logged before the last checkpoint) is
    the "after" loss; a resumed run at its end logged a second one (a 7th metrics.jsonl line)."""
    straight = _run(tmp_path / "straight", tiny_model_dir, task_dir, "train.eval_every=4").run_dir

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(lifecycle, "save_output", killed)
    with pytest.raises(Killed):
        _run(tmp_path, tiny_model_dir, task_dir, "train.eval_every=4")
    monkeypatch.undo()
    resumed = _run(tmp_path, tiny_model_dir, task_dir, "train.eval_every=4", "train.resume=true").run_dir
    assert_same_end(resumed, straight)
    assert_same_end(_run(tmp_path, tiny_model_dir, task_dir, "train.eval_every=4", "train.resume=true").run_dir, straight)


def test_a_run_resumed_between_log_steps_logs_the_losses_of_the_uninterrupted_run(
        tmp_path, tiny_model_dir, task_dir, monkeypatch):
    """Checkpoints every step, logs every second: the loss summed since the last log used to live in
    memory only, so the run resumed from checkpoint-3 logged step 4's loss as the mean of step 4 alone."""
    from transformers import Trainer

    extra = ("train.save_every=1", "train.logging_steps=2")
    straight = _run(tmp_path / "straight", tiny_model_dir, task_dir, *extra).run_dir
    save = Trainer._save_optimizer_and_scheduler

    def killed_while_saving_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise Killed
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_while_saving_step_4)
    with pytest.raises(Killed):
        _run(tmp_path, tiny_model_dir, task_dir, *extra)
    monkeypatch.undo()
    assert lifecycle.last_checkpoint(tmp_path / "run").name == "checkpoint-3"
    assert_same_end(_run(tmp_path, tiny_model_dir, task_dir, *extra, "train.resume=true").run_dir, straight)


def test_resume_without_a_complete_checkpoint_says_so(tmp_path, tiny_model_dir, task_dir):
    (tmp_path / "run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # cut short: no marker
    with pytest.raises(TunelabError, match="no complete checkpoint"):
        _run(tmp_path, tiny_model_dir, task_dir, "train.resume=true")
