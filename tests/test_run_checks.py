"""What a training run checks before it loads a model, and what a failed run leaves behind."""

from __future__ import annotations

import json

import pytest

from tests.test_sft import Killed, _cfg
from tunelab.errors import TunelabError
from tunelab.stages import sft


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: the run must stop before it."""
    from tunelab.models import build

    def builds(*args, **kwargs):
        raise AssertionError("the model was built before the error")

    monkeypatch.setattr(build, "build_model", builds)


def test_a_bad_row_stops_the_run_before_the_model_loads_and_leaves_no_folder(tmp_path, tiny_model_dir, no_model):
    data = tmp_path / "data"
    data.mkdir()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (data / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"messages": "not a list"}) + "\n")
    with pytest.raises(TunelabError, match="train.jsonl:2"):
        sft.run(_cfg(tmp_path, tiny_model_dir, data))
    assert not (tmp_path / "run").exists()


def test_a_missing_data_source_leaves_no_folder(tmp_path, tiny_model_dir, no_model):
    with pytest.raises(TunelabError):
        sft.run(_cfg(tmp_path, tiny_model_dir, tmp_path / "nowhere.jsonl"))
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_training_removes_what_it_wrote(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    def fails(*args, **kwargs):
        raise Killed  # e.g. out of memory, or Ctrl-C, in the evaluation before training

    from tunelab import lifecycle

    monkeypatch.setattr(lifecycle, "measure_before", fails)
    with pytest.raises(Killed):
        sft.run(_cfg(tmp_path, tiny_model_dir, task_dir))
    assert not (tmp_path / "run").exists()


def test_a_failed_resume_leaves_the_run_folder_as_it_was(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    from tunelab.trainer import TunelabTrainer

    step = TunelabTrainer.training_step

    def dies_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise Killed
        return step(self, *args, **kwargs)

    monkeypatch.setattr(TunelabTrainer, "training_step", dies_at_step_3)
    with pytest.raises(Killed):
        sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "train.save_every=2", "train.max_steps=4"))
    monkeypatch.undo()
    run = tmp_path / "run"
    before, config = _listing(run), (run / "config.yaml").read_text()
    assert "checkpoints/checkpoint-2" in before
    with pytest.raises(TunelabError):  # the resumed recipe now names a data file that does not exist
        sft.run(_cfg(tmp_path, tiny_model_dir, tmp_path / "gone.jsonl", "train.save_every=2", "train.max_steps=4",
                     "train.resume=true"))
    assert _listing(run) == before and (run / "config.yaml").read_text() == config


def test_weights_that_cannot_be_read_are_one_error_naming_the_folder(tmp_path, tiny_model_dir, task_dir):
    """A corrupt model.safetensors ended `tunelab train` and `serve` in safetensors' traceback."""
    import shutil

    from tunelab.models.build import load_for_eval

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors" * 100)
    with pytest.raises(TunelabError, match=f"model.name: cannot load weights from {broken}: "):
        sft.run(_cfg(tmp_path, broken, task_dir))
    assert not (tmp_path / "run").exists()
    with pytest.raises(TunelabError, match=f"cannot load weights from {broken}"):
        load_for_eval(str(broken))
