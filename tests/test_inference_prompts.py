"""Prompt styles (YAML, through the chat template) and the generate command."""

from __future__ import annotations

import json

import pytest

from tunelab.cli import main
from tunelab.data.templates import render
from tunelab.errors import TunelabError
from tunelab.inference.prompts import load_examples, load_style, prompt_ids, style_names


def test_builtin_styles_render_through_the_chat_template(tokenizer):
    assert style_names() == ["cot", "few_shot", "grounded", "plain", "role"]
    q = "Which day suits everyone?"
    texts = {
        "plain": render(tokenizer, load_style("plain").messages(q), True),
        "role": render(tokenizer, load_style("role").messages(q, variables={"persona": "a event planner"}), True),
        "cot": render(tokenizer, load_style("cot").messages(q), True),
        "grounded": render(tokenizer, load_style("grounded").messages(q, context="Anna: Friday works."), True),
        "few_shot": render(tokenizer, load_style("few_shot").messages(q, examples=[("1+1?", "2"), ("2+2?", "4")]), True),
    }
    for text in texts.values():
        assert text.endswith("<|im_start|>assistant\n") and q in text
    assert "You are a event planner." in texts["role"]
    assert "\n1. Restate" in texts["cot"] and "\n5. Write the final answer" in texts["cot"]
    assert "Anna: Friday works." in texts["grounded"] and "The context does not say." in texts["grounded"]
    assert texts["few_shot"].count("<|im_start|>assistant\n") == 3 and "<|im_start|>assistant\n4<|im_end|>" in texts["few_shot"]
    ids = prompt_ids(tokenizer, load_style("plain").messages(q))
    assert tokenizer.decode(ids) == texts["plain"]


def test_missing_inputs_name_the_fix():
    with pytest.raises(TunelabError, match="--context FILE"):
        load_style("grounded").messages("q")
    with pytest.raises(TunelabError, match="--examples"):
        load_style("few_shot").messages("q")
    with pytest.raises(TunelabError, match="unknown style; built in: cot, few_shot"):
        load_style("socratic")


def test_user_style_file_and_its_errors(tmp_path, tokenizer):
    good = tmp_path / "pirate.yaml"
    good.write_text('system: "You are a {who}."\ndefaults: {who: pirate}\nuser: "Arr! {prompt}"\n')
    messages = load_style(str(good)).messages("Where is the gold?")
    assert messages == [{"role": "system", "content": "You are a pirate."},
                        {"role": "user", "content": "Arr! Where is the gold?"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text('user: "no placeholder"\ntone: grumpy\n')
    with pytest.raises(TunelabError) as err:
        load_style(str(bad))
    assert "unknown key 'tone'" in str(err.value) and "must be a string containing {prompt}" in str(err.value)
    odd = tmp_path / "odd.yaml"
    odd.write_text('user: "{prompt} in {city}"\n')
    with pytest.raises(TunelabError, match="--var city=VALUE"):
        load_style(str(odd)).messages("Weather")


def test_examples_from_jsonl(tmp_path):
    path = tmp_path / "shots.jsonl"
    path.write_text('{"prompt": "a?", "completion": "A"}\n'
                    '{"messages": [{"role": "user", "content": "b?"}, {"role": "assistant", "content": "B"}]}\n'
                    '{"prompt": "c?", "completion": "C"}\n')
    assert load_examples(str(path), k=2) == [("a?", "A"), ("b?", "B")]
    path.write_text('{"prompt": "a?", "completion": "A"}\n{"question": "b?"}\n')
    with pytest.raises(TunelabError, match=r"shots.jsonl:2:"):
        load_examples(str(path), k=3)


def test_generate_command_prompt_and_file(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", str(tiny_model_dir), "--prompt", "Hello", "--max-new-tokens", "4", "--backend", "paged",
                 "--kv-budget-tokens", "512", "--style", "role"]) == 0
    assert len(capsys.readouterr().out) > 1  # streamed text (a random tiny model: often whitespace), then a newline
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is said?", "context": "Nothing."}\n{"prompt": "Again?"}\n')
    out = tmp_path / "outputs.jsonl"
    assert main(["generate", str(tiny_model_dir), "--input", str(prompts), "--output", str(out), "--style", "grounded",
                 "--context", str(prompts), "--max-new-tokens", "3", "--backend", "static"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is said?", "Again?"]
    assert all(r["completion_tokens"] <= 3 and r["finish_reason"] in ("stop", "length") for r in rows)
    prompts.write_text('{"text": "no prompt field"}\n')
    assert main(["generate", str(tiny_model_dir), "--input", str(prompts)]) == 2
    assert "prompts.jsonl:1: field 'prompt' is missing" in capsys.readouterr().err
