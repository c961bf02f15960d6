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
    from tunelab import hub
    from tunelab.models.loading import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    assert resolve("HuggingFaceTB/SmolLM2-135M").path == "HuggingFaceTB/SmolLM2-135M"


def test_an_unreachable_hub_fails_a_model_id_at_once_unless_it_is_cached(tmp_path, monkeypatch):
    """Offline, the hub client would retry for a minute with a warning per retry, then fail."""
    import huggingface_hub
    from huggingface_hub import constants

    from tunelab import hub
    from tunelab.models.loading import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "reachable", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    with pytest.raises(TunelabError, match="model.name: someone/model is a Hugging Face Hub id, .* cannot be reached "
                                           "and it is not in the local cache; use model.name=embedded"):
        resolve("someone/model")
    assert not constants.HF_HUB_OFFLINE
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(tmp_path / "config.json"))
    assert resolve("someone/model").path == "someone/model" and constants.is_offline_mode()  # read from the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    adapter = tmp_path / "run" / "adapter"  # a LoRA run on a Hub base: the same check, naming the run
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "someone/model"}')
    with pytest.raises(TunelabError, match=r"model.name: the base model of .*adapter: someone/model is a Hugging "
                                           r"Face Hub id, .* not in the local cache"):
        resolve(str(tmp_path / "run"))


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


# ---- item 12: packaged recipes and "did you mean" ----------------------------------------------

def test_packaged_recipes_by_name(tmp_path, monkeypatch):
    from tunelab.config import load_config, recipe_names

    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the names come from the package
    assert {"quickstart", "samsum-lora", "dpo"} <= set(recipe_names())
    assert load_config("quickstart").data.source == "synthetic:meetup"
    assert load_config("samsum-lora.yaml").data.format == "samsum"
    with pytest.raises(TunelabError, match="did you mean samsum-lora"):
        load_config("samsum-lroa")


def test_train_help_lists_the_packaged_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "samsum-lora" in capsys.readouterr().out


def test_a_misspelt_command_suggests_the_near_one(capsys):
    with pytest.raises(SystemExit) as code:
        main(["trian", "quickstart"])
    assert code.value.code == 2 and "did you mean train?" in capsys.readouterr().err


def test_top_level_help_lists_every_command(capsys):
    """`tunelab --help` once ended in a TypeError: a help text's "95% intervals" read as a %-format."""
    from tunelab.commands import COMMANDS

    with pytest.raises(SystemExit) as code:
        main(["--help"])
    out = capsys.readouterr().out
    assert code.value.code == 0 and all(command.name in out for command in COMMANDS)


def test_a_misspelt_subcommand_suggests_the_near_one(capsys):
    with pytest.raises(SystemExit) as code:
        main(["review", "add-tsk"])
    assert code.value.code == 2 and "did you mean add-task?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as code:
        main(["data", "inspekt", "quickstart"])
    assert code.value.code == 2 and "did you mean inspect?" in capsys.readouterr().err


def test_misspelt_task_and_style_names_suggest_the_near_ones():
    from tunelab.evals.tasks import check_names
    from tunelab.inference.prompts import load_style

    with pytest.raises(TunelabError, match="did you mean rouge"):
        check_names(["perplexity", "rogue"])
    with pytest.raises(TunelabError, match="did you mean grounded"):
        load_style("grouned")


@pytest.mark.parametrize("kind", ["task", "style"])
def test_latin1_task_and_style_files_name_the_file(kind, tmp_path):
    from tunelab.evals.tasks import read_task_file
    from tunelab.inference.prompts import load_style

    path = tmp_path / f"{kind}.yaml"
    path.write_bytes('user: "{prompt} \u00e0 Z\u00fcrich"\n'.encode("latin-1"))
    with pytest.raises(TunelabError, match=f"{kind}.yaml: not UTF-8 text"):
        (read_task_file if kind == "task" else load_style)(path if kind == "task" else str(path))


def test_a_latin1_context_file_names_the_file(tmp_path, tiny_model_dir, monkeypatch, capsys):
    _no_model(monkeypatch)
    context = tmp_path / "context.txt"
    context.write_bytes("Z\u00fcrich".encode("latin-1"))
    assert main(["generate", str(tiny_model_dir), "--prompt", "q", "--style", "grounded", "--context", str(context)]) == 2
    assert "context.txt: not UTF-8" in capsys.readouterr().err


# ---- item 11: chat's /help, line editing and history --------------------------------------------

class _EchoEngine:
    """Stands in for a model: replies 'ok' to every turn."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def stream(self, ids, params):
        yield "ok"

    def close(self):
        pass


def test_chat_help_commands_and_history_across_sessions(tmp_path, tokenizer, monkeypatch, capsys):
    readline = pytest.importorskip("readline")
    from tunelab.inference import backends

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    (tmp_path / "chat_history").write_text("an earlier question\n")
    monkeypatch.setattr(backends, "load_engine", lambda *args, **kwargs: _EchoEngine(tokenizer))
    lines = iter(["/help", "/stlye role", "hello", "/exit"])

    def typed(prompt):
        line = next(lines)
        readline.add_history(line)  # what readline's input() does on a terminal
        return line

    monkeypatch.setattr("builtins.input", typed)
    assert main(["chat", "embedded"]) == 0
    out = capsys.readouterr().out
    assert "/help lists the commands" in out
    assert "/style NAME" in out and "/reset" in out and "Ctrl-R" in out  # /help
    assert "unknown command /stlye; did you mean /style?" in out
    assert "model> ok" in out
    saved = (tmp_path / "chat_history").read_text().splitlines()
    assert saved[0] == "an earlier question" and saved[-2:] == ["hello", "/exit"]


def test_servers_stopped_by_ctrl_c_say_so(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """uvicorn handles Ctrl-C itself and returns: serve, review serve and board ended silently with
    exit 0, their `interrupted` messages never shown."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)  # returns as after Ctrl-C or SIGTERM
    db = f"sqlite:///{tmp_path / 'review.db'}"
    assert main(["review", "init", "--db", db]) == 0
    for argv, said in [(["serve", str(tiny_model_dir)], "server stopped"),
                       (["review", "serve", "--db", db], "review app stopped"),
                       (["board", "--runs", str(tmp_path)], "board stopped")]:
        capsys.readouterr()
        assert main(argv) == 130, argv
        assert capsys.readouterr().err.strip().endswith(said), argv
