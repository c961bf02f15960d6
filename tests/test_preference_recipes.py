"""reward.yaml, dpo.yaml, kto.yaml and rl.yaml each train one step on a tiny Llama over their real data in ../shared/data."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, shared_data
from tunelab.config import load_config
from tunelab.stages import dpo, kto, reward, rl

DATA = {"reward.yaml": "hh_rlhf_harmless_base", "dpo.yaml": "hh_rlhf_harmless_base", "rl.yaml": "hh_rlhf_harmless_base",
        "kto.yaml": "hh_rlhf_harmless_base"}
"""The preference recipes (tests/test_recipes.py covers the SFT ones) and their folders in ../shared/data."""


def _cfg(recipe, tmp_path, model_dir, *overrides):
    return load_config(REPO / "recipes" / recipe, [
        f"data.source={shared_data(DATA[recipe])}", f"model.name={model_dir}", f"run.dir={tmp_path / recipe}",
        "train.max_steps=1", "data.max_train_samples=8", "data.max_eval_samples=4", "eval.generation_samples=2",
        "eval.max_new_tokens=2", *overrides,
    ])


def test_every_preference_recipe_names_its_command():
    for recipe in DATA:
        assert (REPO / "recipes" / recipe).read_text().startswith(f"# tunelab {recipe.removesuffix('.yaml')} recipes/")


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir):
    return reward.run(_cfg("reward.yaml", tmp_path_factory.mktemp("recipes"), tiny_model_dir, "train.batch_size=2"))


def test_reward_recipe(reward_run):
    summary = json.loads((reward_run.run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 1 and summary["data"]["format"] == "hh_rlhf"
    assert set(summary["eval"]["after"]) == {"loss", "accuracy", "margin"}


def test_dpo_recipe(tmp_path, tiny_model_dir):
    summary = dpo.run(_cfg("dpo.yaml", tmp_path, tiny_model_dir, "train.batch_size=1", "eval.batch_size=2")).summary
    assert summary["train"]["steps"] == 1 and summary["data"]["format"] == "hh_rlhf"
    assert {"loss", "reward_accuracy", "reward_margin", "logp_accuracy", "rouge_l"} <= set(summary["eval"]["after"])


def test_kto_recipe(tmp_path, tiny_model_dir):
    summary = kto.run(_cfg("kto.yaml", tmp_path, tiny_model_dir, "train.batch_size=2", "eval.batch_size=2")).summary
    assert summary["train"]["steps"] == 1 and summary["data"]["train_ratings"] == 2 * summary["data"]["train_pairs"]
    assert {"reward_auc", "reward_gap", "logp_auc", "rouge_l"} <= set(summary["eval"]["after"])


def test_rl_recipe(tmp_path, tiny_model_dir, reward_run):
    summary = rl.run(_cfg("rl.yaml", tmp_path, tiny_model_dir, f"preference.reward_model={reward_run.run_dir}",
                          "train.batch_size=2", "preference.num_generations=2", "preference.max_new_tokens=2")).summary
    assert summary["train"]["steps"] == 1 and "reward" in summary["eval"]["after"]
