"""Adapters: row checks name the field, conversions give [system?] + user + assistant."""

import pickle

import pytest
from datasets.fingerprint import Hasher

from tunelab.data.formats import FORMATS, SAMSUM_TEMPLATE, get_format
from tunelab.errors import TunelabError


def test_samsum_converts_and_strips():
    row = {"id": "1", "dialogue": " A: hi\nB: hey ", "summary": "A greets B. "}
    assert get_format("samsum").convert(row) == {
        "messages": [
            {"role": "user", "content": SAMSUM_TEMPLATE.format("A: hi\nB: hey")},
            {"role": "assistant", "content": "A greets B."},
        ]
    }


def test_cnn_dailymail_uses_article_and_highlights():
    messages = get_format("cnn_dailymail").convert({"article": "Text.", "highlights": "Short."})["messages"]
    assert messages[0]["content"] == "Summarize this news article in a few sentences:\n\nText."
    assert messages[1] == {"role": "assistant", "content": "Short."}


@pytest.mark.parametrize(
    ("system", "roles"), [("Be brief.", ["system", "user", "assistant"]), ("", ["user", "assistant"])]
)
def test_openorca_system_prompt_is_optional(system, roles):
    data_format = get_format("openorca")
    row = {"system_prompt": system, "question": "Q?", "response": "A."}
    assert data_format.problems(row) == []
    assert [m["role"] for m in data_format.convert(row)["messages"]] == roles
    assert data_format.problems({"question": "Q?", "response": "A."}) == []  # absent, not just empty


@pytest.mark.parametrize(("context", "user"), [("", "Add."), ("2 3", "Add.\n\n2 3")])
def test_alpaca_appends_input_only_when_present(context, user):
    messages = get_format("alpaca").convert({"instruction": "Add.", "input": context, "output": "5"})["messages"]
    assert messages == [{"role": "user", "content": user}, {"role": "assistant", "content": "5"}]


def test_alpaca_empty_output_is_a_problem():
    assert get_format("alpaca").problems({"instruction": "Say it.", "input": "", "output": ""}) == [
        "field 'output' is empty"
    ]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"summary": "s"}, "field 'dialogue' is missing"),
        ({"dialogue": None, "summary": "s"}, "field 'dialogue' is missing"),
        ({"dialogue": "  \n", "summary": "s"}, "field 'dialogue' is empty"),
        ({"dialogue": "d", "summary": 3}, "field 'summary' should be a string, got int"),
    ],
)
def test_problems_name_the_field(row, problem):
    assert get_format("samsum").problems(row) == [problem]


def test_guanaco_multi_turn_alternates():
    text = "### Human: Hi?### Assistant: Hello.### Human: How are you?### Assistant: Fine, thanks."
    data_format = get_format("guanaco")
    assert data_format.problems({"text": text}) == []
    assert data_format.convert({"text": text})["messages"] == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("### Human: Hi?", "field 'text' does not end with an '### Assistant:' turn"),
        ("### Human: Hi?### Assistant: Hello.### Human: And?", "does not end with an '### Assistant:' turn"),
        ("Hello### Human: Hi?### Assistant: Hi.", "field 'text' does not start with a '### Human:' turn"),
        ("### Assistant: Hi.", "does not start with a '### Human:' turn"),
        ("### Human: a### Human: b### Assistant: c", "two '### Human:' turns in a row (turn 2)"),
        ("### Human: Hi?### Assistant:  ", "empty '### Assistant:' turn (turn 2)"),
    ],
)
def test_guanaco_problems(text, problem):
    (found,) = get_format("guanaco").problems({"text": text})
    assert problem in found


def test_custom_prompt_completion_mapping():
    data_format = get_format("custom", {"prompt": "q", "completion": "a", "system": "sys"})
    assert data_format.required == {"q": str, "a": str} and data_format.optional == {"sys": str}
    assert data_format.convert({"q": "2+2?", "a": "4", "sys": "Math."})["messages"] == [
        {"role": "system", "content": "Math."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert data_format.problems({"q": "2+2?"}) == ["field 'a' is missing"]


def test_custom_messages_mapping_validates_roles_and_last_turn():
    data_format = get_format("custom", {"messages": "conv"})
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "name": "bot"}]
    assert data_format.problems({"conv": good}) == []
    assert data_format.convert({"conv": good}) == {"messages": [good[0], {"role": "assistant", "content": "Hello"}]}
    assert data_format.problems({"conv": good[:1]}) == ["field 'conv' does not end with an assistant message"]
    assert data_format.problems({"conv": [{"role": "bot", "content": "x"}]}) == [
        "field 'conv' item 1 has role 'bot'; allowed: system, user, assistant"
    ]
    assert data_format.problems({"conv": [*good, {"role": "assistant", "content": 1}]}) == [
        "field 'conv' item 3 content should be a string, got int"
    ]
    assert data_format.problems({"conv": ["hi"]}) == ["field 'conv' item 1 should be a {role, content} object, got str"]
    assert data_format.problems({"conv": []}) == ["field 'conv' is empty"]
    assert data_format.problems({"conv": "hi"}) == ["field 'conv' should be a list, got str"]


@pytest.mark.parametrize(
    "fields", [None, {}, {"prompt": "q"}, {"messages": "m", "prompt": "q"}, {"input": "q", "output": "a"}]
)
def test_custom_rejects_unusable_mapping(fields):
    with pytest.raises(TunelabError, match="prompt: <column>, completion: <column>.*messages: <column"):
        get_format("custom", fields)


def test_unknown_format_lists_valid_names():
    with pytest.raises(TunelabError, match="unknown format 'samsun'") as error:
        get_format("samsun")
    for name in ["samsum", "cnn_dailymail", "openorca", "guanaco", "alpaca", "custom"]:
        assert name in str(error.value)


def test_fields_are_only_for_custom():
    with pytest.raises(TunelabError, match="only used by data.format=custom"):
        get_format("samsum", {"prompt": "dialogue"})


@pytest.mark.parametrize("name", [*FORMATS, "custom"])
def test_convert_pickles_and_hashes_deterministically(name):
    """datasets fingerprints `convert` to find its cache: equal formats must hash equal."""
    fields = {"prompt": "q", "completion": "a"} if name == "custom" else None
    convert = get_format(name, fields).convert
    assert pickle.loads(pickle.dumps(convert)).__self__ == convert.__self__
    assert Hasher.hash(convert) == Hasher.hash(get_format(name, fields and dict(fields)).convert)
    assert Hasher.hash(get_format("custom", {"prompt": "q", "completion": "b"}).convert) != Hasher.hash(
        get_format("custom", {"prompt": "q", "completion": "a"}).convert
    )
