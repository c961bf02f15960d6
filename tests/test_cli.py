"""The CLI as a newcomer meets it: every mistake a one-line error before anything heavy loads."""

from __future__ import annotations

import pytest

from tunelab.cli import main
from tunelab.errors import TunelabError


def _no_model(monkeypatch):
    """Make loading any model fail the test: the command must stop before it."""
    from tunelab.inference import backends
    from tunelab.models import build

    def loads(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(backends, "load_engine", loads)
    monkeypatch.setattr(build, "load_for_eval", loads)


# ---- item 13: targets and styles -------------------------------------------------------------

@pytest.mark.parametrize("name", ["runs/nope", "./nope", "runs/nope/adapter", "~/surely-not-here-tunelab"])
def test_a_path_like_target_that_does_not_exist_is_no_such_folder(name, tmp_path, monkeypatch):
    from tunelab.models.loading import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(TunelabError, match="no such folder"):
        resolve(name)


def test_an_owner_slash_name_without_a_local_folder_stays_a_hub_id(tmp_path, monkeypatch):
    from tunelab.models.loading import resolve

    monkeypatch.chdir(tmp_path)
    assert resolve("HuggingFaceTB/SmolLM2-135M").path == "HuggingFaceTB/SmolLM2-135M"


def test_generate_on_a_missing_run_folder_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["generate", "runs/nope", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "huggingface" not in err.lower()


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"]])
def test_a_style_that_needs_context_fails_before_the_model_loads(command, tiny_model_dir, monkeypatch, capsys):
    _no_model(monkeypatch)
    assert main([command[0], str(tiny_model_dir), *command[1:], "--style", "grounded"]) == 2
    assert "--context FILE" in capsys.readouterr().err


def test_a_prompts_file_row_without_the_context_its_style_needs_fails_before_the_model(tmp_path, tiny_model_dir,
                                                                                      monkeypatch, capsys):
    _no_model(monkeypatch)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a?", "context": "A."}\n{"prompt": "b?"}\n')
    assert main(["generate", str(tiny_model_dir), "--input", str(prompts), "--style", "grounded"]) == 2
    assert "prompts.jsonl:2" in capsys.readouterr().err
