"""`tunelab eval`: token-weighted perplexity, generation metrics, lm-eval harness parity, outputs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_model, shared_data
from tunelab.config import load_config
from tunelab.data.synthetic import write_task
from tunelab.errors import TunelabError
from tunelab.evals.tasks import Rows, perplexity
from tunelab.stages import evaluate, sft

HOSTILE = "<script>alert('x')</script> & \"quotes\""


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_perplexity_is_token_weighted_not_a_mean_of_batch_means(tokenizer):
    from tunelab.data.templates import IGNORE_INDEX, tokenize_example

    model = make_tiny_model(tokenizer).eval()
    with torch.no_grad():  # sharper random logits, so the two rows' mean losses differ clearly (near-uniform ones tie)
        model.lm_head.weight.mul_(20)
    # a 1-word answer and a ~230-token one: averaging per row would weight the 1-word row like the long one
    examples = [_chat("Say one word.", "Yes"), _chat("Count.", " ".join(str(i) for i in range(1, 80)))]
    sums, counts = [], []
    for messages in examples:  # by hand: one row at a time, summed negative log-likelihood of the label tokens
        sample = tokenize_example(tokenizer, messages)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([sample["input_ids"]])).logits[0, :-1].double(), -1)
        targets = torch.tensor(sample["labels"][1:])
        mask = targets != IGNORE_INDEX
        sums.append(-logp[mask, targets[mask]].sum().item())
        counts.append(int(mask.sum()))
    token_weighted = sum(sums) / sum(counts)
    mean_of_batch_means = sum(s / c for s, c in zip(sums, counts)) / len(sums)  # batch size 1
    assert abs(token_weighted - mean_of_batch_means) > 0.01

    for batch_size in (1, 2):
        ours = perplexity(model, tokenizer, Rows(examples, "test"), batch_size)
        assert ours["tokens"] == sum(counts)
        assert ours["loss"] == pytest.approx(token_weighted, rel=1e-6)
        assert ours["perplexity"] == pytest.approx(math.exp(token_weighted), rel=1e-5)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A tiny LoRA run with a held-out test split (test.jsonl)."""
    folder = tmp_path_factory.mktemp("eval-run")
    write_task(folder / "data", seed=0)
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.source={folder / 'data'}", "data.format=custom",
        "data.fields={messages: messages}", f"run.dir={folder / 'run'}", "data.max_length=256",
        "data.max_train_samples=16", "data.max_eval_samples=4", "data.test_fraction=0.05", "train.batch_size=4",
        "train.lr=3e-3", "train.max_steps=2", "eval.before=false", "eval.generation_samples=1",
        "eval.max_new_tokens=2",
    ])
    return sft.run(cfg).run_dir


@pytest.fixture(scope="module")
def hostile_task(tmp_path_factory) -> Path:
    """A task YAML whose rows carry HTML, to check that the report escapes it."""
    folder = tmp_path_factory.mktemp("custom-task")
    rows = [{"q": f"Repeat: {HOSTILE} #{i}", "a": f"{HOSTILE} #{i}"} for i in range(3)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(
        "name: echo\nadapter: custom\nsource: rows.jsonl\nfields: {prompt: q, completion: a}\n"
        "metrics: [exact_match, rouge_l]\nmax_new_tokens: 6\n"
    )
    return folder / "task.yaml"


def _eval(target: str, tasks: list[str], **settings) -> dict:
    """`tunelab eval TARGET --tasks ... --key value`: every option is an EvalRunConfig key."""
    from tunelab.config import EvalRunConfig, build_config

    return evaluate.run(build_config({"target": target, "tasks": tasks, **settings}, "test", EvalRunConfig)).summary


@pytest.fixture(scope="module")
def run_eval(lora_run, hostile_task):
    results = _eval(str(lora_run), ["perplexity", "rouge", "exact_match", "bleu", str(hostile_task)],
                    limit=5, max_new_tokens=8, batch_size=4, export_manual=3)
    return results, Path(results["output"])


def test_run_folder_eval_writes_results_against_its_base_model(run_eval, lora_run, tiny_model_dir):
    results, out = run_eval
    assert out.parent == lora_run / "eval"
    assert {p.name for p in out.iterdir()} == {"results.json", "predictions.jsonl", "comparison.png", "report.html",
                                               "manual.jsonl", "curves"}
    assert (out / "curves" / "loss.png").is_file() and 'alt="loss"' in (out / "report.html").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["target"] == str(lora_run)
    assert saved["baseline"]["model"] == str(tiny_model_dir)  # the run's model.name
    assert "test.jsonl" in saved["data"]["perplexity"]  # the run's held-out rows
    expected = {  # per-row metrics also get their 95% intervals (ci95); loss and corpus BLEU have no rows to resample
        "perplexity": {"loss", "perplexity", "tokens", "n"},
        "rouge": {"rouge_1", "rouge_2", "rouge_l", "rouge_lsum", "n", "ci95"},
        "exact_match": {"exact_match", "n", "ci95"},
        "bleu": {"bleu", "n"},
        "echo": {"exact_match", "rouge_l", "n", "ci95"},
    }
    for side in (saved["tasks"], saved["baseline"]["tasks"]):
        assert list(side) == list(expected)  # the order asked for
        assert {task: set(metrics) for task, metrics in side.items()} == expected
        assert side["rouge"]["n"] == 5 and side["echo"]["n"] == 3
    assert saved["tasks"]["perplexity"] != saved["baseline"]["tasks"]["perplexity"]  # training changed the model
    assert set(saved["comparison"]) == {"rouge", "exact_match", "echo"}  # paired target − baseline on the same rows
    assert set(saved["comparison"]["rouge"]["rouge_l"]) == {"diff", "ci95", "p_value", "n"}

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert list(predictions[0]) == ["task", "model", "prompt", "reference", "prediction"]
    per_task = {(p["task"], p["model"]) for p in predictions}
    assert per_task == {(t, m) for t in ("rouge", "exact_match", "bleu", "echo") for m in ("target", "baseline")}

    table = evaluate.format_results(results)
    assert [c.strip() for c in table.splitlines()[0].split("|")] == [
        "task", "metric", "target [95% CI]", "baseline [95% CI]", "target − baseline [95% CI]"]
    assert re.search(r"^perplexity \(n=5\) +\| perplexity +\| ", table, re.M)
    assert re.search(r"\| rouge_l +\| +\S+ \[\S+, \S+\] +\| .* p[=<]", table)  # intervals and the paired p


def test_export_manual_sets_aside_prompts_with_both_models_outputs(run_eval, lora_run, tiny_model_dir):
    results, out = run_eval
    manual = [json.loads(line) for line in (out / "manual.jsonl").read_text().splitlines()]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    rouge = {m: [p for p in predictions if p["task"] == "rouge" and p["model"] == m] for m in ("target", "baseline")}
    assert len(manual) == 3 and results["manual"] == str(out / "manual.jsonl")
    for i, row in enumerate(manual):
        assert row["id"] == f"rouge-{i}" and row["messages"][-1]["role"] == "user"
        assert row["reference"] == rouge["target"][i]["reference"]
        assert row["outputs"] == [{"model": str(lora_run), "text": rouge["target"][i]["prediction"]},
                                  {"model": str(tiny_model_dir), "text": rouge["baseline"][i]["prediction"]}]


def test_export_manual_needs_a_generation_task(tmp_path):
    write_task(tmp_path, seed=0)
    with pytest.raises(TunelabError, match="--export-manual: needs a generation task"):  # before any model loads
        _eval("embedded", ["perplexity"], dataset=str(tmp_path), format="custom",
                     fields={"messages": "messages"}, export_manual=2)


def test_rouge_in_results_equals_rouge_score_on_saved_predictions(tmp_path):
    """On the embedded model: the tiny random Llamas only generate newlines, which would score 0 everywhere."""
    from rouge_score.rouge_scorer import RougeScorer

    write_task(tmp_path / "data", seed=1)
    results = _eval("embedded", ["rouge"], baseline="none", dataset=str(tmp_path / "data"), format="custom",
                           fields={"messages": "messages"}, limit=3, max_new_tokens=12, output=str(tmp_path / "out"))
    assert results["baseline"] is None and "validation" in results["data"]["rouge"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["rouge"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == saved["n"] == 3

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    lines = lambda text: "\n".join(s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s)  # noqa: E731
    scores = [scorer.score(lines(r["reference"]), lines(r["prediction"])) for r in rows]
    for ours, theirs in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL"), ("rouge_lsum", "rougeLsum")):
        assert saved[ours] == pytest.approx(sum(s[theirs].fmeasure for s in scores) / len(scores), abs=1e-12)
    assert saved["rouge_1"] > 0.05  # real overlap, not an all-zero comparison


def test_report_escapes_content_and_links_predictions(run_eval):
    _results, out = run_eval
    html = (out / "report.html").read_text()
    assert "<script>" not in html  # the hostile row is text (markupsafe writes ' as &#39;)
    assert re.search(r"&lt;script&gt;alert\((&#x27;|&#39;)x(&#x27;|&#39;)\)&lt;/script&gt; &amp;", html)
    assert '<a href="predictions.jsonl">' in html and "data:image/png;base64," in html
    assert "target − baseline" in html and "echo" in html


def test_task_file_with_a_bad_key_fails_naming_it(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nadapter: samsum\nsource: rows.jsonl\nmetrics: [rouge]\nmetricz: [bleu]\n")
    with pytest.raises(TunelabError, match=r"metricz: unknown key"):
        _eval(str(tiny_model_dir), [str(bad)], output=str(tmp_path / "out"))
    bad.write_text("name: x\nadapter: samsum\nsource: rows.jsonl\nmetrics: [rogue]\n")
    with pytest.raises(TunelabError, match=r"metrics\.0: Input should be 'perplexity'"):
        _eval(str(tiny_model_dir), [str(bad)], output=str(tmp_path / "out"))


def test_unknown_task_and_missing_rows_are_user_errors(tmp_path, tiny_model_dir):
    with pytest.raises(TunelabError, match=r"unknown task 'hellaswg'; did you mean hellaswag\? \(tasks: perplexity, rouge, .*truthfulqa_mc2"):
        _eval(str(tiny_model_dir), ["hellaswg"], output=str(tmp_path))
    with pytest.raises(TunelabError, match="pass --dataset SOURCE --format NAME"):
        _eval(str(tiny_model_dir), ["rouge"], output=str(tmp_path))


def test_a_path_like_target_that_does_not_exist_is_no_such_folder(tmp_path, monkeypatch):
    """`tunelab eval runs/nope` said the target was not a run folder and asked for --dataset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for target in ("runs/nope", "./nope", "runs/nope/adapter"):
        with pytest.raises(TunelabError, match=f"no such folder {target} "):
            _eval(target, ["rouge"], output=str(tmp_path / "out"))


# --- lm-evaluation-harness --------------------------------------------------------------

# Original HellaSwag validation rows (rowanz/hellaswag): our rows keep `ctx` whole, preprocessed.
ORIGINAL_HELLASWAG = [
    {"activity_label": "Pole vault", "ctx_b": "a few women",
     "ctx_a": "Pole vault is a sport where you run with a pole and stop and swing your body."},
    {"activity_label": "Snow tubing", "ctx_a": ".", "ctx_b": "the boy in the red hat and the blue coat"},
    {"activity_label": "Sports and Fitness", "ctx_b": "",
     "ctx_a": "[header] How to bowl the leg spinner's variations [title] To bowl a googly, you grip the ball the same "
              "as you would for a leg break. [step] As you bowl, you bring your elbow close to your head. You spin "
              "the ball by rotating the fingers."},
]


def test_hellaswag_prompts_from_whole_contexts_match_lm_eval():
    from datasets import Dataset
    from lm_eval.tasks.hellaswag.utils import preprocess, process_docs

    from tunelab.evals.harness import hellaswag_docs

    original = [{**row, "endings": ["a", "b", "c", "d"], "label": "0"} for row in ORIGINAL_HELLASWAG]
    local = [{"activity_label": r["activity_label"], "ctx": preprocess(f"{r['ctx_a']} {r['ctx_b']}"),
              "endings": r["endings"], "label": 0} for r in original]
    ours = hellaswag_docs(Dataset.from_list(local))["query"]
    assert ours == process_docs(Dataset.from_list(original))["query"]
    assert ours[0].endswith("swing your body. A few women")


def test_harness_tasks_equal_lm_eval_builtin_tasks_on_the_same_rows(tmp_path, embedded_dir):
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml
    from transformers import AutoModelForCausalLM

    from tunelab.evals import harness
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import ModelSource

    data_dir = shared_data("hellaswag").parent
    shared_data("truthfulqa")
    limit, names = 3, ["hellaswag", "truthfulqa_mc1", "truthfulqa_mc2"]
    tokenizer = load_tokenizer(ModelSource(str(embedded_dir)))
    # The embedded model's first 4 of 30 layers: the same requests at a fraction of the CPU time
    # (TruthfulQA's 250-token few-shot prompt is scored once per answer choice).
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32, num_hidden_layers=4).eval()
    ours, rows = harness.evaluate(model, tokenizer, names, limit=limit, batch_size=8, data_dir=data_dir)

    # lm-eval's own definitions, only the data source swapped for the same local rows; HellaSwag
    # gets the ctx_a/ctx_b columns its built-in process_docs reads (the Hub rows have them).
    with (data_dir / "hellaswag" / "validation.jsonl").open() as f:
        head = [json.loads(next(f)) for _ in range(limit)]
    split = [harness.split_context(r["ctx"]) for r in head]
    (tmp_path / "hellaswag.jsonl").write_text("".join(
        json.dumps({**r, "ctx_a": a, "ctx_b": b}) + "\n" for r, (a, b) in zip(head, split)))
    builtin = Path(lm_eval.__file__).parent / "tasks"
    files = {"hellaswag": tmp_path / "hellaswag.jsonl", "truthfulqa_mc1": data_dir / "truthfulqa" / "mc_task.jsonl",
             "truthfulqa_mc2": data_dir / "truthfulqa" / "mc_task.jsonl"}
    configs = [
        {**load_yaml(builtin / folder / f"{name}.yaml"), "dataset_path": "json", "dataset_name": None,
         "training_split": None, "dataset_kwargs": {"data_files": {"validation": str(files[name])}}}
        for folder, name in (("hellaswag", "hellaswag"), *(("truthfulqa", n) for n in names[1:]))
    ]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    theirs = simple_evaluate(model=lm, tasks=configs, limit=limit, task_manager=TaskManager(include_defaults=False))

    for name in names:
        expected = {k.split(",")[0]: v for k, v in theirs["results"][name].items() if "," in k}
        assert ours[name] == {**expected, "n": limit}, name  # exactly equal, stderr included
    assert {r["task"] for r in rows} == set(names) and len(rows) == 3 * limit


def test_a_single_file_is_labelled_with_the_split_it_was_given_as(tmp_path):
    from tunelab.evals.tasks import load_rows

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"messages": _chat("q?", "a")}) + "\n")
    rows = load_rows(str(held_out), "custom", {"messages": "messages"}, "test", None)
    assert rows.examples == [_chat("q?", "a")]
    assert "[test]" in rows.origin and "train" not in rows.origin
