"""Every shipped recipe trains: one step on a tiny random Llama over the real data in ../shared/data."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, shared_data
from tests.test_preference_recipes import DATA as PREFERENCE_RECIPES  # reward/dpo/rl.yaml: tested there
from tests.test_data_mixture import RECIPES as MIXTURE_RECIPES  # data.sources recipes: tested there
from tunelab.config import load_config
from tunelab.stages import sft

DATA = {  # recipe → folder in ../shared/data
    "samsum-lora.yaml": "samsum",
    "samsum-qlora-llama2-7b.yaml": "samsum",
    "alpaca-full.yaml": "alpaca",
    "cnn_dailymail-lora.yaml": "cnn_dailymail",
    "openorca-lora.yaml": "openorca_sample",
    "guanaco-qlora.yaml": "oasst_guanaco_style",
    "quickstart.yaml": "synthetic:meetup",  # generated, see data/synthetic.py
}


def test_every_recipe_is_covered():
    shipped = {p.name for p in (REPO / "recipes").glob("*.yaml")} - PREFERENCE_RECIPES.keys() - MIXTURE_RECIPES
    assert shipped - {"custom-lora.yaml"} == set(DATA)  # custom-lora is a template for the user's own files


def _source(name: str) -> str:
    return name if name.startswith("synthetic:") else str(shared_data(name))


@pytest.mark.parametrize("recipe", sorted(DATA))
def test_recipe_trains_one_step(recipe, tmp_path, tiny_model_dir):
    cfg = load_config(REPO / "recipes" / recipe, [
        f"data.source={_source(DATA[recipe])}", f"model.name={tiny_model_dir}", f"run.dir={tmp_path}",
        "train.max_steps=1", "train.batch_size=1", "train.grad_accum=1", "train.optim=adamw_torch",
        "data.max_train_samples=8", "data.max_eval_samples=4", "data.max_length=512", "data.overlong=truncate",
        "eval.generation_samples=1", "eval.max_new_tokens=2",
    ])
    summary = sft.run(cfg).summary
    assert summary["train"]["steps"] == 1
    data = summary["data"]
    # a sample whose completion alone exceeds max_length cannot be kept, but is never lost silently
    assert 0 < data["train_samples"] <= 8 and (data["train_samples"] == 8 or data["dropped"] > 0)
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == cfg.method
