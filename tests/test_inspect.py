"""`tunelab data inspect`: it marks exactly the label positions that training uses, shows a packed
row as training packs it, and each loud check fires on a constructed bad case (a template given
as model.chat_template=PATH.jinja, or a row)."""

from __future__ import annotations

import json
import re

import pytest

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.data.inspect import page
from tunelab.data.prepare import prepare
from tunelab.data.templates import IGNORE_INDEX
from tunelab.errors import TunelabError
from tunelab.models.build import load_tokenizer
from tunelab.models.loading import ModelSource
from tunelab.stages import data as stage

CHECKS = ("no loss tokens", "loss on the prompt", "assistant markers", "pad token", "stop token")
TEMPLATES = {  # each breaks one thing that response-only training relies on
    "no loss tokens": "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}\n{% endif %}{% endfor %}",
    "loss on the prompt": ("{% for m in messages %}{% if m.role == 'assistant' %}### Answer to: "
                           "{{ messages[loop.index0 - 1].content }}\n{{ m.content }}{{ eos_token }}\n"
                           "{% else %}### User:\n{{ m.content }}\n{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}{% endif %}"),
    "assistant markers": ("{% for m in messages %}{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
                          "{% endif %}\n{% endfor %}"),
    "stop token": ("{% for m in messages %}{% if m.role == 'user' %}### User:\n{{ m.content }}\n\n{% else %}"
                   "### Assistant:\n{{ m.content }}\n\n{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}### Assistant:\n{% endif %}"),
}


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, n in (("train", 24), ("validation", 4)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps({"q": f"Where is the meeting number {i} held this week?",
                                    "a": f"In room {i}, on the {'second' if i % 2 else 'third'} floor."}) + "\n")
    return folder


def config(source, model_dir, *extra):
    return load_config(None, [f"data.source={source}", "data.format=custom", "data.fields={prompt: q, completion: a}",
                              f"model.name={model_dir}", "data.max_length=128", *extra])


def marked(html: str) -> list[set[int]]:
    """Per sample shown in the page: the token positions inside its `loss` spans."""
    samples = []
    for pre in re.findall(r"<h2>[^<]*train row.*?</h2><pre>(.*?)</pre>", html, flags=re.S):
        positions = set()
        for a, b in re.findall(r'<span class="loss" data-tokens="(\d+)-(\d+)"', pre):
            positions |= set(range(int(a), int(b)))
        samples.append(positions)
    return samples


def unpacked(rows) -> list[tuple[list[int], list[int]]]:
    """The samples of packed rows: cut where position_ids restart at 0."""
    out = []
    for ids, labels, positions in zip(rows["input_ids"], rows["labels"], rows["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        out += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
    return out


def test_inspect_marks_exactly_the_labels_training_uses(source, tiny_model_dir):
    cfg = config(source, tiny_model_dir)
    report = stage.inspect(cfg, n=5)
    trained = unpacked(prepare(cfg.data, load_tokenizer(ModelSource(str(tiny_model_dir))), cfg.run.seed).train)
    assert len(report.samples) == 5 and not report.failed
    for sample, positions in zip(report.samples, marked(page(report))):
        labels = next(labels for ids, labels in trained if ids == sample.input_ids)  # the same sample, as packed
        assert positions == {i for i, label in enumerate(labels) if label != IGNORE_INDEX} != set()
    assert [c.name for c in report.checks] == list(CHECKS)


def test_the_packed_row_shown_is_the_row_training_gets(source, tiny_model_dir):
    cfg = config(source, tiny_model_dir, "data.max_length=256")
    report = stage.inspect(cfg, n=1)
    row, count = re.match(r"packed row (\d+) of (\d+)", report.layout[0]).groups()
    train = prepare(cfg.data, load_tokenizer(ModelSource(str(tiny_model_dir))), cfg.run.seed).train
    assert int(count) == len(train)
    positions = train[int(row)]["position_ids"]
    restarts = [i for i, p in enumerate(positions) if p == 0]
    shown = [int(a) for a in re.findall(r"tokens\s+(\d+)–", "\n".join(report.layout[1:]))]
    assert shown == restarts and len(shown) > 1


@pytest.mark.parametrize("check", TEMPLATES)
def test_each_check_fires_on_a_template_that_breaks_it(check, source, tiny_model_dir, tmp_path):
    template = tmp_path / "bad.jinja"
    template.write_text(TEMPLATES[check])
    report = stage.inspect(config(source, tiny_model_dir, f"model.chat_template={template}"), n=1)
    assert check in [c.name for c in report.failed]


def test_the_pad_check_fires_on_a_row_holding_the_pad_token(source, tiny_model_dir, tokenizer):
    with (source / "train.jsonl").open("a") as f:
        f.write(json.dumps({"q": f"What does {tokenizer.pad_token} mean?", "a": "A pad token."}) + "\n")
    report = stage.inspect(config(source, tiny_model_dir), n=1)
    assert [c.name for c in report.failed] == ["pad token"] and "occurs in 1 samples" in report.failed[0].detail


def test_cli_prints_plain_marks_writes_html_and_fails_on_a_check(source, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "inspect.html"
    args = ["data", "inspect", "--n", "1", "--ids", "--html", str(out), f"data.source={source}", "data.format=custom",
            "data.fields={prompt: q, completion: a}", f"model.name={tiny_model_dir}"]
    assert main(args[:2] + [str(tmp_path / "none.yaml")] + args[2:]) == 2  # a missing recipe: a clear error
    template = tmp_path / "bad.jinja"
    template.write_text(TEMPLATES["stop token"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: x}\n")
    assert main([*args[:2], str(recipe), *args[2:]]) == 0
    text = capsys.readouterr().out
    assert "⟦In room 0, on the third floor.<|im_end|>\n⟧" in text and "labels:    [-100," in text
    assert 'class="loss"' in out.read_text()
    assert main([*args[:2], str(recipe), *args[2:], f"model.chat_template={template}"]) == 2
    assert "FAIL stop token" in capsys.readouterr().out


def test_preference_pairs_are_not_sft_data(tmp_path, tiny_model_dir):
    cfg = load_config(None, [f"data.source={tmp_path}", "data.format=hh_rlhf", f"model.name={tiny_model_dir}"])
    with pytest.raises(TunelabError, match="'hh_rlhf' gives preference pairs, not chat examples"):
        stage.inspect(cfg)
