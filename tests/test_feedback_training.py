"""KTO, ORPO, SimPO and GRPO with reward functions: a few steps on a tiny Llama move their held-out
metric the right way; the reward functions and the checks that run before any model loads.

The data: the chosen answer starts with "yes", the rejected one with "no" (as in
test_preference_training.py), so one token tells them apart and a few steps suffice.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.test_preference_training import _cfg, marker_pairs  # noqa: F401 - the same learnable pairs
from tunelab.config import load_config
from tunelab.errors import TunelabError

def test_kto_learns_from_answers_marked_good_or_bad(tmp_path, tiny_model_dir, marker_pairs):
    from tunelab.stages import kto

    result = kto.run(_cfg(tmp_path / "run", tiny_model_dir, marker_pairs))
    before, after = result.summary["eval"]["before"], result.summary["eval"]["after"]
    assert before["reward_auc"] == 0.5 and before["reward_gap"] == 0  # policy == reference: no implicit reward yet
    assert after["reward_auc"] > 0.9 and after["reward_gap"] > 0.05
    assert after["logp_auc"] > before["logp_auc"]
    data = result.summary["data"]
    assert data["train_ratings"] == 2 * data["train_pairs"] and data["train_desirable"] == data["train_pairs"]
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "kl" in steps[0] and "rewards/chosen" in steps[0]
    assert not (result.run_dir / "adapter" / "ref").exists()


def test_kto_reads_the_ratings_export_and_checks_its_batch(tmp_path, tokenizer):
    from tunelab.data.preferences import load_ratings
    from tunelab.stages import kto

    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"q{i}"}], "completion": f"a{i}", "label": i % 3 == 0}
            for i in range(12)]
    (tmp_path / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.source={tmp_path / 'ratings.jsonl'}", "data.format=ratings", f"run.dir={tmp_path}/r",
                             "data.validation_fraction=0.25"])
    data = load_ratings(cfg, tokenizer)
    assert data.train.column_names == ["prompt", "completion", "label"] and len(data.train) == 9
    assert data.train[0]["completion"][0]["role"] == "assistant"
    assert all(row["messages"][-1]["content"] in {f"a{i}" for i in range(0, 12, 3)} for row in data.generation_rows())
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n")
    with pytest.raises(TunelabError, match=r"bad.jsonl:1: field 'label' should be true \(desirable\) or false"):
        load_ratings(cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(tmp_path / "bad.jsonl")})}),
                     tokenizer)
    with pytest.raises(TunelabError, match="train.batch_size: KTO estimates its KL reference point"):
        kto.run(load_config(None, ["data.source=x", "data.format=ratings", "train.batch_size=1"]))


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_methods_learn_the_preference(method, tmp_path, tiny_model_dir, marker_pairs):
    from tunelab.stages import dpo

    result = dpo.run(_cfg(tmp_path / "run", tiny_model_dir, marker_pairs, f"preference.method={method}"))
    before, after = result.summary["eval"]["before"], result.summary["eval"]["after"]
    assert "reward_accuracy" not in after  # no reference model, so no DPO implicit reward
    assert after["logp_margin"] > before["logp_margin"] + 0.05 and after["logp_accuracy"] > before["logp_accuracy"]
    assert after["loss"] < before["loss"]


def test_grpo_with_reward_functions_raises_them(tmp_path, tiny_model_dir, marker_pairs, monkeypatch):
    """GRPO on two functions that agree: a built-in (length:8, answers of 8 words: with 4 new tokens, the
    more words the better) and one of ours by python:module:function (the share of 4 words). Both vary
    between the sampled completions of a random model, so every group has an advantage to follow."""
    from tunelab.stages import rl

    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def words(prompts, completions, reference, **kwargs):
            return [len(c[0]["content"].split()) / 4 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _cfg(tmp_path / "run", tiny_model_dir, marker_pairs, "preference.algorithm=grpo", "preference.grpo_loss=dr_grpo",
               'preference.rewards=["length:8", {function: "python:my_rewards:words", weight: 0.5}]',
               "preference.num_generations=4", "preference.max_new_tokens=4", "train.lr=2e-2", "eval.generation_samples=8")
    result = rl.run(cfg)
    before, after = result.summary["eval"]["before"], result.summary["eval"]["after"]
    assert after["reward"] > before["reward"] and after["reward/length:8"] > before["reward/length:8"]
    assert after["reward"] == pytest.approx(after["reward/length:8"] + 0.5 * after["reward/words"])
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/length:8/mean" in steps[0] and "rewards/words/mean" in steps[0]


def test_builtin_reward_functions():
    from tunelab.evals.rewards import reward_function

    completions = [[{"role": "assistant", "content": text}] for text in ("Yes, it is.", "no", "one two three four")]
    references = ["Yes, it is.", "yes", "a b"]

    def call(spec):
        return reward_function(spec)(prompts=[[]] * 3, completions=completions, reference=references)

    assert call("exact_match") == [1.0, 0.0, 0.0]
    assert call("regex:^[Yy]es") == [1.0, 0.0, 0.0]
    assert call("length") == [1.0, 1.0, 0.0]  # words: 3 as the reference's 3, 1 as 1, 4 = twice the reference's 2
    assert call("length:3") == [1.0, 1 - 2 / 3, 1 - 1 / 3]
    assert call("rouge")[0] == 1.0 and call("rouge")[1] == 0.0
    assert reward_function("rouge").__name__ == "rouge"
    with pytest.raises(TunelabError, match="compares with a reference answer"):
        reward_function("exact_match")(prompts=[[]], completions=["x"])


def test_rl_checks_rewards_before_loading(tmp_path, tiny_model_dir, marker_pairs):
    from tunelab.stages import rl

    with pytest.raises(TunelabError) as err:
        rl.run(_cfg(tmp_path / "run", tiny_model_dir, marker_pairs, 'preference.rewards=["python:no_such_module:f"]'))
    assert "python:no_such_module:f: cannot import it" in str(err.value)
    with pytest.raises(TunelabError, match="preference.rewards: required by tunelab rl"):
        rl.run(_cfg(tmp_path / "run", tiny_model_dir, marker_pairs))
    with pytest.raises(TunelabError, match="preference.rewards.0: function 'bleu'"):
        load_config(None, ["data.source=x", "data.format=hh_rlhf", "preference.rewards=[bleu]"])
