"""Preference data: hh_rlhf / orca_dpo / review-export / custom formats, row checks, splits, filters."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_data
from tunelab.config import load_config
from tunelab.data.formats import get_format
from tunelab.data.preferences import load_preferences
from tunelab.errors import TunelabError


def _rows(path, n=None):
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n or 10**9), f)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hh_rlhf_prompt_is_the_shared_prefix_on_real_rows():
    data_format = get_format("hh_rlhf")
    rows = _rows(shared_data("hh_rlhf_harmless_base") / "test.jsonl")
    assert all(data_format.problems(row) == [] for row in rows)
    for row in rows[:200]:
        pair = data_format.convert(row)
        prompt = pair["prompt"]
        assert prompt[0]["role"] == "user" and prompt[-1]["role"] == "user"
        # the transcript is the prompt's turns, then the answer as the final Assistant turn
        turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in prompt)
        for side in ("chosen", "rejected"):
            assert " ".join(row[side].split()) == " ".join(f"{turns}\n\nAssistant: {pair[side][0]['content']}".split())
    # row 1255: the chosen answer itself contains a later "Assistant:" line; the prompt must stop
    # where the two transcripts part, not at the chosen transcript's own last marker
    pair = data_format.convert(rows[1254])
    assert pair["prompt"][-1]["content"] == "Isn't that drag kings?"
    assert "\n\nAssistant:" in pair["chosen"][0]["content"]
    assert pair["rejected"][0]["content"].startswith("A drag king is the opposite of a drag queen")


def test_hh_rlhf_rows_without_a_shared_prompt_are_problems():
    data_format = get_format("hh_rlhf")
    same = "\n\nHuman: hi\n\nAssistant: hello"
    assert data_format.problems({"chosen": same, "rejected": same + " "}) == [
        "fields 'chosen' and 'rejected' are identical (nothing to prefer)"]
    assert "share no prompt" in data_format.problems({"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                  "rejected": "\n\nHuman: x\n\nAssistant: b"})[0]
    assert "does not start with" in data_format.problems({"chosen": "\n\nAssistant: a\n\nAssistant: b",
                                                      "rejected": "\n\nAssistant: a\n\nAssistant: c"})[0]


def test_orca_dpo_keeps_the_system_prompt():
    row = _rows(shared_data("orca_dpo_pairs") / "validation.jsonl", 1)[0]
    pair = get_format("orca_dpo").convert(row)
    assert [m["role"] for m in pair["prompt"]] == ["system", "user"]
    assert pair["prompt"][1]["content"] == row["question"].strip()
    assert pair["chosen"] == [{"role": "assistant", "content": row["chosen"].strip()}]


def test_review_export_rows_text_or_messages():
    data_format = get_format("preferences")
    text = {"id": "a", "prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "agreement": 0.8, "n_reviewers": 3}
    assert data_format.problems(text) == []
    assert data_format.convert(text)["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert data_format.convert(text)["agreement"] == 0.8
    chat = {**text, "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
            "agreement": None, "n_reviewers": 1}
    assert data_format.problems(chat) == [] and data_format.convert(chat)["agreement"] is None


@pytest.mark.parametrize(("change", "problem"), [
    ({"prompt": None}, "field 'prompt' is missing"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "field 'prompt' does not end with a user message"),
    ({"prompt": 7}, "field 'prompt' should be a string or a list of {role, content}, got int"),
    ({"agreement": "high"}, "field 'agreement' should be a number from -1 to 1 or null, got 'high'"),
    ({"n_reviewers": 0}, "field 'n_reviewers' should be a whole number >= 1, got 0"),
    ({"rejected": ""}, "field 'rejected' is empty"),
])
def test_review_export_problems_name_the_field(change, problem):
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "agreement": 0.5, "n_reviewers": 2, **change}
    assert get_format("preferences").problems(row) == [problem]


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"data.source={tmp_path}", f"run.dir={tmp_path / 'run'}", "data.format=preferences",
                              "data.validation_fraction=0.25", *overrides])


def test_bad_row_stops_with_file_line_and_field(tmp_path, tokenizer):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "train.jsonl", [good, good, {"prompt": "q", "chosen": "a"}, good])
    with pytest.raises(TunelabError, match=rf"{path}:3: field 'rejected' is missing"):
        load_preferences(_cfg(tmp_path), tokenizer)


def test_min_agreement_and_max_length_drop_and_count(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "agreement": [0.2, 0.9, None][i % 3]}
            for i in range(12)]
    rows[0]["chosen"] = "long " * 200
    _write(tmp_path / "train.jsonl", rows)
    data = load_preferences(_cfg(tmp_path, "preference.min_agreement=0.5", "data.max_length=64"), tokenizer)
    assert data.stats["below_min_agreement"] == 4 and data.stats["overlong"] == 0  # row 0 has agreement 0.2
    assert data.train.column_names == ["prompt", "chosen", "rejected"]
    assert data.stats["train_pairs"] + data.stats["eval_pairs"] == 8
    rows[1]["chosen"] = "long " * 200
    _write(tmp_path / "train.jsonl", rows)
    assert load_preferences(_cfg(tmp_path, "data.max_length=64"), tokenizer).stats["overlong"] == 2


def test_custom_preference_fields_and_chat_adapters_are_refused(tmp_path, tokenizer):
    _write(tmp_path / "train.jsonl", [{"q": f"q{i}", "good": "yes", "bad": "no"} for i in range(8)])
    cfg = _cfg(tmp_path, "data.format=custom", "data.fields={prompt: q, chosen: good, rejected: bad}")
    assert load_preferences(cfg, tokenizer).train[0]["chosen"] == [{"role": "assistant", "content": "yes"}]
    with pytest.raises(TunelabError, match="data.format: 'samsum' gives chat examples, not preference pairs"):
        load_preferences(_cfg(tmp_path, "data.format=samsum"), tokenizer)


def test_preference_config_errors_name_the_field():
    with pytest.raises(TunelabError) as err:
        load_config(None, ["data.source=x", "preference.beta=0", "preference.loss_type=kto",
                           "preference.num_generations=1"])
    for field in ("preference.beta", "preference.loss_type", "preference.num_generations"):
        assert field in str(err.value)
