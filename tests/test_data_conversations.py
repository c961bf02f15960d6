"""ShareGPT and tool-call conversations render through real chat templates (tunelab's chatml and
llama-3, the Hermes/Qwen2.5 and Llama 3.1 tool layouts) with the loss exactly on the turns that
data.train_on chooses; a template without tool support is refused."""

from __future__ import annotations

import json

import pytest

from tunelab.config import load_config
from tunelab.data.formats import get_format
from tunelab.data.prepare import tokenized
from tunelab.data.templates import IGNORE_INDEX, tokenize_example
from tunelab.errors import TunelabError
from tunelab.models.build import load_tokenizer
from tunelab.models.loading import ModelSource

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ROW = {  # two requests; the second is answered with a tool call, its result, then the answer
    "conversations": [
        {"from": "system", "value": "You are brief."},
        {"from": "human", "value": "Hi there, who are you?"},
        {"from": "gpt", "value": "A weather helper."},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 C in Paris."},
    ],
    "tools": json.dumps(TOOLS),
}
CALL = {"chatml": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "llama-3": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'}
END = {"chatml": "<|im_end|>\n", "llama-3": "<|eot_id|>"}


@pytest.fixture(scope="module", params=["chatml", "llama-3"])
def templated(request, embedded_dir):
    return request.param, load_tokenizer(ModelSource(str(embedded_dir)), request.param)


def loss_pieces(tokenizer, out: dict) -> list[str]:
    """The decoded runs of consecutive loss tokens."""
    pieces, run = [], []
    for token, label in zip(out["input_ids"], out["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return pieces + ([tokenizer.decode(run)] if run else [])


@pytest.mark.parametrize("train_on, turns", [
    ("assistant", ["A weather helper.", "call", "It is 21 C in Paris."]),
    ("completion", ["call", "It is 21 C in Paris."]),  # after the last user turn: the call and the answer
    ("last_assistant", ["It is 21 C in Paris."]),
])
def test_sharegpt_tool_row_loss_is_exactly_the_chosen_turns(templated, train_on, turns):
    name, tokenizer = templated
    example = get_format("sharegpt").convert(ROW)
    out = tokenize_example(tokenizer, example["messages"], train_on, example["tools"])
    expected = [CALL[name] if t == "call" else t + END[name] for t in turns]
    assert loss_pieces(tokenizer, out) == expected


def test_train_on_all_learns_every_token(templated):
    name, tokenizer = templated
    example = get_format("sharegpt").convert(ROW)
    out = tokenize_example(tokenizer, example["messages"], "all", example["tools"])
    text = tokenizer.decode(out["input_ids"])
    assert "Weather now in a city" in text and CALL[name] in text  # the tool definitions are rendered
    assert [label for label in out["labels"] if label != IGNORE_INDEX] == out["input_ids"][-len(
        [label for label in out["labels"] if label != IGNORE_INDEX]):]
    assert sum(label == IGNORE_INDEX for label in out["labels"]) <= 1  # at most a leading BOS


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_arrow_structs_of_tool_arguments_lose_the_other_rows_keys():
    """Arrow gives every row's arguments the union of all rows' keys (null where missing, as a Hub
    dataset has them); each call keeps its own."""
    import datasets

    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "search", "arguments": {"query": "tides"}}]
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Q?"}, {
        "role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]}]} for call in calls])
    assert rows[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": None, "query": "tides"}
    converted = get_format("messages").convert(rows[1])["messages"][1]["tool_calls"]
    assert json.loads(converted) == [calls[1]]


def test_openai_messages_through_the_pipeline_keep_each_calls_own_arguments(tmp_path, templated):
    name, tokenizer = templated
    rows = []
    for i, (fn, args) in enumerate([("get_weather", {"city": "Paris"}), ("search", {"query": "tides", "limit": 3})] * 3):
        rows.append({"messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": fn, "arguments": args}}]},
            {"role": "tool", "content": f"result {i}"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]})
    write_jsonl(tmp_path / "train.jsonl", rows[:4])
    write_jsonl(tmp_path / "validation.jsonl", rows[4:])
    cfg = load_config(None, [f"data.source={tmp_path}", "data.format=messages", "data.train_on=completion"]).data
    samples = tokenized(cfg, tokenizer, seed=0)
    row = samples.train[1]
    pieces = loss_pieces(tokenizer, row)
    key = "arguments" if name == "chatml" else "parameters"
    assert pieces[0].startswith(('<tool_call>\n{"name": "search", "' + key + '": {"query": "tides", "limit": 3}}',
                                 '{"name": "search", "' + key + '": {"query": "tides", "limit": 3}}'))
    assert pieces[1] == "Answer 1." + END[name] and "null" not in tokenizer.decode(row["input_ids"])


def test_a_template_without_tool_support_is_refused(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [ROW] * 4)
    cfg = load_config(None, [f"data.source={tmp_path}", "data.format=sharegpt"]).data
    with pytest.raises(TunelabError, match="tool calls, but the chat template cannot show them: it renders no tool "
                                           "definitions, no tool calls.*model.chat_template=chatml or llama-3"):
        tokenized(cfg, tokenizer, seed=0)  # SmolLM2's own template ignores tools and tool_calls


def test_sharegpt_keys_are_configurable_and_problems_name_the_turn():
    fmt = get_format("sharegpt", {"conversations": "dialog", "from": "speaker", "value": "text"})
    row = {"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "gpt", "text": "Hello"}]}
    assert fmt.problems(row) == []
    assert [m["role"] for m in fmt.convert(row)["messages"]] == ["user", "assistant"]
    assert fmt.problems({"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "observation", "text": "x"},
                                    {"speaker": "gpt", "text": "y"}]}) == [
        "field 'dialog' turn 2 is a tool result that follows no tool call"]
    assert fmt.problems({"dialog": [{"speaker": "human", "text": "Hi"},
                                    {"speaker": "function_call", "text": "{not json"}]}) == [
        "field 'dialog' item 2 is a function_call whose text is not JSON"]
    with pytest.raises(TunelabError, match="sharegpt renames only conversations, from, value, tools, system; not role"):
        get_format("sharegpt", {"role": "x"})
