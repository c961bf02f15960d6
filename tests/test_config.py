"""Config: YAML + overrides, every error named by field with the allowed values, before any model loads."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from tunelab.cli import main
from tunelab.config import Config, load_config
from tunelab.errors import TunelabError


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(_recipe(tmp_path, "data: {format: samsum, source: x}\n"),
                      ["train.max_steps=20", "peft.target_modules=[q_proj, v_proj]", "train.lr=1e-3",
                       "train.early_stopping.patience=2", "train.eval_every=5"])
    assert cfg.train.max_steps == 20
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == 1e-3
    assert cfg.train.early_stopping.patience == 2


def test_all_errors_reported_together_with_field_and_allowed_values(tmp_path):
    with pytest.raises(TunelabError) as err:
        load_config(_recipe(tmp_path, "data: {format: samsum, source: x, batching: pack}\ntrain: {lr: -1, epoks: 2}\n"))
    msg = str(err.value)
    assert "data.batching: got 'pack'; allowed: 'packing' or 'padding'" in msg
    assert "train.lr" in msg and "greater than 0" in msg
    assert "train.epoks: unknown key" in msg


def test_cross_field_checks():
    with pytest.raises(TunelabError, match="data.source: required"):
        load_config(None, ["data.format=samsum"])
    with pytest.raises(TunelabError, match="quantization.bits: a quantized base cannot be fully fine-tuned"):
        load_config(None, ["data.format=samsum", "data.source=x", "quantization.bits=4", "peft.method=full"])
    with pytest.raises(TunelabError, match="train.early_stopping: needs train.eval_every"):
        load_config(None, ["data.format=samsum", "data.source=x", "train.early_stopping={patience: 2}"])
    with pytest.raises(TunelabError, match="data.fields: required"):
        load_config(None, ["data.source=x"])


def test_method_names():
    base = ["data.format=samsum", "data.source=x"]
    assert load_config(None, base).method == "lora"
    assert load_config(None, base + ["quantization.bits=4"]).method == "qlora"
    assert load_config(None, base + ["peft.method=full"]).method == "full"
    assert load_config(None, base + ["peft.method=dora"]).method == "dora"


def test_cli_prints_config_errors_without_traceback(tmp_path, capsys):
    code = main(["train", str(_recipe(tmp_path, "data: {format: samsum, source: x}\n")), "model.nme=embedded"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.nme: unknown key" in err and "Traceback" not in err


def test_bad_override_syntax():
    with pytest.raises(TunelabError, match="expected key.sub=value"):
        load_config(None, ["train.max_steps"])


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_names_its_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# tunelab "), "each recipe opens with the command that runs it"
    mixture = "\n  sources:" in recipe.read_text()  # a mixture recipe names its own data.sources
    cfg = load_config(recipe, [] if mixture else ["data.source=somewhere"])
    assert isinstance(cfg, Config)


def test_mid_run_generation_and_selection_checks():
    base = ["data.format=samsum", "data.source=x"]
    with pytest.raises(TunelabError, match="train.eval_generation: needs train.eval_every"):
        load_config(None, [*base, "train.eval_generation={task: rouge_l}"])
    with pytest.raises(TunelabError, match="not a multiple of train.eval_every=4"):
        load_config(None, [*base, "train.eval_every=4", "train.eval_generation={every: 6}"])
    with pytest.raises(TunelabError, match="train.select_on: `generation` needs train.eval_generation"):
        load_config(None, [*base, "train.eval_every=4", "train.select_on=generation"])
    with pytest.raises(TunelabError, match="save_every .* must be a multiple"):
        load_config(None, [*base, "train.eval_every=4", "train.save_every=6", "train.load_best=true"])
    cfg = load_config(None, [*base, "train.eval_every=4", "train.eval_generation={task: rouge, every: 8}"])
    assert cfg.train.eval_generation.key == "rouge_l"


def test_data_adapter_is_the_old_name_of_data_format(tmp_path, caplog):
    cfg = load_config(_recipe(tmp_path, "data: {adapter: samsum, source: x}\n"))
    assert cfg.data.format == "samsum" and "data.adapter is now called data.format" in caplog.text
    assert "adapter" not in cfg.model_dump()["data"]  # config.yaml writes the new name
    with pytest.raises(TunelabError, match="data.adapter: the old name of data.format; keep only data.format"):
        load_config(_recipe(tmp_path, "data: {adapter: samsum, format: alpaca, source: x}\n"))


# ---- every config error instant and naming its key or file (#15 item 8) ----


def test_a_malformed_override_value_names_its_key():
    with pytest.raises(TunelabError, match=r"override 'train.lr=\[1,': the value of train.lr is not valid YAML"):
        load_config(None, ["train.lr=[1,"])


def test_a_recipe_that_is_not_utf8_names_the_file_and_the_encoding(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run: {name: caf\u00e9}\ndata: {format: samsum, source: x}\n".encode("latin-1"))
    with pytest.raises(TunelabError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "not UTF-8" in str(err.value) and "line 1" in str(err.value)


def test_an_unknown_optimizer_fails_validation_with_a_suggestion():
    with pytest.raises(TunelabError, match="train.optim: unknown optimizer 'bogus_opt'"):
        load_config(None, ["data.format=samsum", "data.source=x", "train.optim=bogus_opt"])
    with pytest.raises(TunelabError, match="did you mean adamw_torch"):
        load_config(None, ["data.format=samsum", "data.source=x", "train.optim=adamw_troch"])


def test_the_optimizer_list_is_transformers_own():
    from transformers.training_args import OptimizerNames

    from tunelab.config import OPTIMIZERS

    assert sorted(OPTIMIZERS) == sorted(o.value for o in OptimizerNames)


def test_an_unknown_key_suggests_the_near_one():
    with pytest.raises(TunelabError, match="train.lrr: unknown key; did you mean train.lr"):
        load_config(None, ["data.format=samsum", "data.source=x", "train.lrr=1e-4"])
    with pytest.raises(TunelabError, match="trian: unknown key; did you mean train"):
        load_config(None, ["data.format=samsum", "data.source=x", "trian.lr=1e-4"])


def test_an_unknown_data_format_is_a_config_error_with_a_suggestion():
    """It was found only once the stage had imported torch and loaded the tokenizer (~7 s)."""
    with pytest.raises(TunelabError, match=r"data.format: unknown format 'samsun'; did you mean samsum\? \(formats: samsum, "):
        load_config(None, ["data.format=samsun", "data.source=x"])
    with pytest.raises(TunelabError, match=r"data.sources\[1\].format: unknown format 'alpacca'; did you mean alpaca\?"):
        load_config(None, ["data.format=samsum", "data.sources=[{source: a}, {source: b, format: alpacca}]"])
    for name in ("rankings", "ratings", "preferences", "custom"):  # the feedback formats register themselves on import
        load_config(None, [f"data.format={name}", "data.source=x", "data.fields={prompt: p, completion: c}"])
    from tunelab.config import EvalRunConfig, build_config

    with pytest.raises(TunelabError, match="format: unknown format 'samsun'; did you mean samsum"):
        build_config({"target": "embedded", "dataset": "x", "format": "samsun"}, "tunelab eval", EvalRunConfig)


CONFIG_ERRORS = """
import sys, time
from tunelab.cli import main
start = time.time()
codes = [main(argv) for argv in ARGVS]
print(codes, "torch" in sys.modules, round(time.time() - start, 2))
"""


def test_config_errors_of_every_training_command_import_no_torch(tmp_path):
    import subprocess
    import sys

    bad = _recipe(tmp_path, "data: {format: samsum, source: x}\ntrain: {optim: bogus_opt}\n")
    argvs = [["train", str(bad)], ["train", str(bad), "--nproc", "2"], ["reward", str(bad)], ["dpo", str(bad)],
             ["rl", str(bad)], ["kfold", str(bad)], ["quickstart", "train.optim=bogus_opt"],
             ["train", str(bad), "train.lr=[1,"], ["eval", "embedded", "limit=0"],
             ["train", str(bad), "train.optim=adamw_torch", "data.format=samsun"]]
    out = subprocess.run([sys.executable, "-c", CONFIG_ERRORS.replace("ARGVS", repr(argvs))], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    codes, torch_loaded, _seconds = out.stdout.rsplit("]", 1)[0] + "]", *out.stdout.rsplit("]", 1)[1].split()
    assert codes == repr([2] * len(argvs)), out.stderr
    assert torch_loaded == "False"
    assert out.stderr.count("error: ") == len(argvs) and "Traceback" not in out.stderr


def test_activation_offload_needs_checkpointing():
    with pytest.raises(TunelabError, match="train.activation_offload: offloads the hidden states that checkpointing"):
        load_config(None, ["data.format=samsum", "data.source=x", "train.activation_offload=true"])
    assert load_config(None, ["data.format=samsum", "data.source=x", "train.activation_offload=true",
                              "train.gradient_checkpointing=true"]).train.activation_offload
