"""Mixtures: each source's share of the training tokens follows its weight (seeded draw, off by at
most one sample), each source's rows and validation rows are kept apart, and the shipped mixture
recipe trains and reports its shares."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import REPO, shared_data
from tunelab.config import load_config
from tunelab.data.mixture import mix
from tunelab.data.prepare import prepare
from tunelab.errors import TunelabError

RECIPES = {"samsum-oasst-mix.yaml"}  # tested here, not in test_recipes.py (it names its own data.sources)


def shares(lengths, drawn):
    tokens = [sum(ls[i] for i in picks) for ls, picks in zip(lengths, drawn)]
    return [t / sum(tokens) for t in tokens], sum(tokens)


@pytest.mark.parametrize("rule", ["subsample", "repeat"])
def test_token_shares_follow_the_weights_within_one_sample(rule):
    rng = random.Random(0)
    lengths = [[rng.randint(20, 300) for _ in range(2000)], [rng.randint(200, 1500) for _ in range(60)],
               [rng.randint(50, 100) for _ in range(500)]]
    weights = [5, 3, 2]
    drawn = mix(lengths, weights, rule, seed=1)
    got, total = shares(lengths, drawn)
    for share, weight, ls in zip(got, weights, lengths):
        assert abs(share - weight / 10) <= max(ls) / total  # the stated tolerance: one sample's tokens
    whole = 1 if rule == "subsample" else 0  # the scarcest source for its weight / the most abundant one
    assert sorted(drawn[whole]) == list(range(len(lengths[whole])))
    if rule == "subsample":
        assert all(len(set(picks)) == len(picks) for picks in drawn)  # without replacement
    else:
        assert len(drawn[1]) > len(lengths[1])  # the long, scarce source is repeated
    assert mix(lengths, weights, rule, seed=1) == drawn and mix(lengths, weights, rule, seed=2) != drawn


def write_source(folder, n, words, seed):
    rng = random.Random(seed)
    folder.mkdir()
    with (folder / "train.jsonl").open("w") as f:
        for i in range(n):
            answer = " ".join(rng.choice(["tide", "moon", "sand", "wave"]) for _ in range(rng.randint(*words)))
            f.write(json.dumps({"q": f"{folder.name} question {i}?", "a": answer}) + "\n")


def test_a_mixture_reports_each_source_and_validates_them_apart(tmp_path, tokenizer):
    write_source(tmp_path / "short", 400, (3, 30), seed=0)
    write_source(tmp_path / "long", 60, (60, 200), seed=1)
    sources = (f"[{{source: {tmp_path / 'short'}, weight: 3}}, "
               f"{{source: {tmp_path / 'long'}, weight: 1, name: chat, max_samples: 10}}]")
    cfg = load_config(None, ["data.format=custom", "data.fields={prompt: q, completion: a}", f"data.sources={sources}",
                             "data.max_length=512", "data.validation_fraction=0.2"])
    data = prepare(cfg.data, tokenizer, seed=0)
    stats = data.stats
    short, chat = stats["sources"]["short"], stats["sources"]["chat"]
    assert stats["train_tokens"] == short["train_tokens"] + chat["train_tokens"] == sum(
        len(ids) for ids in data.train["input_ids"])
    assert abs(short["token_share"] - 0.75) < 0.01 and abs(chat["token_share"] - 0.25) < 0.01
    assert chat["available_train_samples"] == chat["train_samples"] == 10 and chat["repeated"] == 0  # used whole
    assert short["train_samples"] < short["available_train_samples"]  # drawn down to its share
    assert (short["eval_samples"], chat["eval_samples"]) == (80, 12)  # each source's own 20%
    assert list(data.eval_parts) == ["short", "chat"]
    assert len(data.eval) == sum(len(p) for p in data.eval_parts.values())  # eval: the parts, each packed alone
    assert sum(data.eval_parts["chat"]["num_samples"][:]) == 12
    firsts = [m[0]["content"] for m in data.eval_examples["messages"][:4]]  # generation sees both sources at once
    assert [f.split()[0] for f in firsts] == ["short", "long", "short", "long"]


@pytest.mark.parametrize("overrides, problem", [
    (["data.source=x", "data.sources=[{source: y}]"], "give either data.source or data.sources"),
    (["data.sources=[{source: a/x.jsonl}, {source: b/x.jsonl}]", "data.format=samsum"], "both named 'x'"),
    (["data.sources=[{source: a, format: samsum}, {source: b, format: custom}]"], r"data.sources\[1\].fields: required"),
    (["data.sources=[{source: a, weight: 0}]", "data.format=samsum"], "greater than 0"),
])
def test_mixture_config_errors_name_the_entry(overrides, problem):
    with pytest.raises(TunelabError, match=problem):
        load_config(None, overrides)


def test_the_mixture_recipe_trains_and_reports_shares_and_each_sources_loss(tmp_path, tiny_model_dir, monkeypatch):
    shared_data("samsum"), shared_data("oasst_guanaco_style")
    monkeypatch.chdir(REPO)  # the recipe names ../shared/data/... from the repository root
    from tunelab.stages import sft

    cfg = load_config(REPO / "recipes" / "samsum-oasst-mix.yaml", [
        f"model.name={tiny_model_dir}", f"run.dir={tmp_path}", "train.max_steps=1", "train.batch_size=1",
        "data.max_train_samples=16", "data.max_eval_samples=2", "data.max_length=512",
        "eval.generation_samples=2", "eval.max_new_tokens=2",
    ])
    summary = sft.run(cfg).summary
    assert summary["train"]["steps"] == 1
    mixed = json.loads((tmp_path / "summary.json").read_text())["data"]["sources"]
    assert set(mixed) == {"samsum", "oasst"} and mixed["oasst"]["repeated"] == 0
    assert abs(mixed["samsum"]["token_share"] - 0.8) < 0.05  # 16 OASST conversations: a coarse draw
    for side in ("before", "after"):  # each source's validation loss; the whole is their token-weighted mean
        ev = summary["eval"][side]
        parts = [ev["loss_samsum"], ev["loss_oasst"]]
        assert parts[0] != parts[1] and min(parts) < ev["loss"] < max(parts)
    report = (tmp_path / "report.html").read_text()
    assert "<h3>Mixture</h3>" in report and f"{summary['eval']['after']['loss_oasst']:.4g}" in report
