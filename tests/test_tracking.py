"""Run-folder tracking: metrics.jsonl, plots, report.html, before/after table, W&B offline."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.tracking.live import MetricsCallback
from tunelab.tracking.metrics import append_jsonl, read_jsonl, write_json
from tunelab.tracking.plots import plot_metrics
from tunelab.tracking.report import write_report
from tunelab.tracking.stat_tables import format_before_after
from tunelab.tracking.wandb_setup import finish_wandb, wandb_report_to

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Shaped like what MetricsCallback writes: train logs every step, eval every 2nd step.
RECORDS = [
    *({"step": s, "loss": 3.0 / s, "train_perplexity": math.exp(3.0 / s)} for s in range(1, 7)),
    *({"step": s, "eval_loss": 2.0 / s, "perplexity": math.exp(2.0 / s)} for s in (2, 4, 6)),
]

SUMMARY = {
    "model": "SmolLM2-135M",
    "method": "lora",
    "data": {
        "train_samples": 1200, "eval_samples": 100, "dropped": 3, "packing_efficiency": 0.9312,
    },
    "train": {"steps": 50, "tokens_per_s": 1523.25, "peak_memory_gb": None, "final_loss": 1.2345},
    "eval": {
        "before": {"loss": 2.5, "perplexity": 12.1825, "exact_match": 0.1, "rouge_l": 0.3},
        "after": {"loss": 1.25, "perplexity": 3.4903, "exact_match": 0.45, "bleu": 0.2},
    },
}


def _state(step, epoch=0.5, main=True):
    return SimpleNamespace(global_step=step, epoch=epoch, is_world_process_zero=main)


def _log(cb, step, main=True, **logs):
    cb.on_log(args=None, state=_state(step, main=main), control=None, logs=logs)


# --- metrics ---------------------------------------------------------------------------


def test_metrics_callback_writes_one_line_per_log_with_perplexity(tmp_path):
    path = tmp_path / "metrics.jsonl"
    cb = MetricsCallback(path)
    _log(cb, 1, loss=2.0, learning_rate=1e-4)
    _log(cb, 2, eval_loss=1.5)
    _log(cb, 3, main=False, loss=9.0)  # not the main process: must not write

    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 1 and first["epoch"] == 0.5 and first["loss"] == 2.0
    assert first["learning_rate"] == 1e-4 and isinstance(first["time"], float)
    assert first["train_perplexity"] == pytest.approx(math.exp(2.0))
    assert "perplexity" not in first
    assert second["step"] == 2 and second["perplexity"] == pytest.approx(math.exp(1.5))
    assert "train_perplexity" not in second


def test_metrics_callback_huge_loss_does_not_overflow(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log(MetricsCallback(path), 1, eval_loss=1e6)
    assert read_jsonl(path)[0]["perplexity"] is None  # inf is stored as JSON null


def test_resume_keeps_steps_up_to_checkpoint_and_drops_later(tmp_path):
    path = tmp_path / "metrics.jsonl"
    cb = MetricsCallback(path)
    for step in range(1, 7):
        _log(cb, step, loss=float(step))

    resumed = MetricsCallback(path, resume_step=4)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    _log(resumed, 5, loss=0.5)
    _log(resumed, 6, loss=0.25)
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] == 0.25  # the re-logged step, not the stale one


def test_write_json_handles_nan_inf_numpy_and_torch(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {
        "nan": float("nan"),
        "inf": float("-inf"),
        "np_float": np.float32(0.5),
        "np_nan": np.float64("nan"),
        "np_int": np.int64(7),
        "torch_scalar": torch.tensor(1.5),
        "torch_nan": torch.tensor(float("nan")),
        "nested": [np.arange(2), {"p": Path("a/b")}],
    })
    text = path.read_text()
    obj = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert obj == {
        "nan": None, "inf": None, "np_float": 0.5, "np_nan": None, "np_int": 7,
        "torch_scalar": 1.5, "torch_nan": None, "nested": [[0, 1], {"p": "a/b"}],
    }
    assert text.startswith('{\n  "nan"')  # indent=2
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_read_jsonl_drops_truncated_last_line_but_rejects_corruption(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    path.write_text(path.read_text() + '{"step": 2, "lo')  # crash mid-append
    assert read_jsonl(path) == [{"step": 1}]

    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(TunelabError, match=r"metrics.jsonl:2"):
        read_jsonl(path)


# --- plots -----------------------------------------------------------------------------


def test_plot_metrics_writes_valid_pngs(tmp_path):
    paths = plot_metrics(RECORDS, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["loss.png", "perplexity.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_plot_metrics_without_eval_points(tmp_path):
    train_only = [r for r in RECORDS if "loss" in r]
    paths = plot_metrics(train_only, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "perplexity.png"]


def test_plot_metrics_skips_plots_without_points(tmp_path):
    assert plot_metrics([{"step": 1, "learning_rate": 1e-4, "loss": None}], tmp_path) == []
    assert plot_metrics([], tmp_path) == []
    assert not list(tmp_path.glob("*.png"))


# --- report ----------------------------------------------------------------------------


def _full_run_dir(tmp_path) -> Path:
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "config.yaml").write_text("model: SmolLM2-135M\nlr: 2.0e-4  # <tuned>\n")
    write_json(run / "summary.json", SUMMARY)
    plot_metrics(RECORDS, run / "plots")
    for i in range(12):
        append_jsonl(run / "samples.jsonl", {
            "prompt": f"question {i}",
            "reference": "ref & more",
            "before": "<script>alert(1)</script>",
            "after": f"answer-{i}",
        })
    return run


def test_report_is_self_contained_escaped_and_complete(tmp_path):
    run = _full_run_dir(tmp_path)
    html = write_report(run).read_text()
    assert (run / "report.html").exists()

    # Self-contained: no external resources, plots inline.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<link" not in html and "<script" not in html
    assert html.count('src="data:image/png;base64,') == 2

    # Escaped: the model output is text, not markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ref &amp; more" in html
    assert "# &lt;tuned&gt;" in html  # config verbatim, escaped

    assert "my-run" in html and "SmolLM2-135M" in html and "lora" in html
    assert "1,200" in html and "0.9312" in html and "1523" in html  # data and train stats
    # Before/after: every metric from either side, with deltas.
    for metric in ("loss", "perplexity", "exact_match", "rouge_l", "bleu"):
        assert f"<th>{metric}</th>" in html
    assert "12.18" in html and "3.49" in html and "-8.692 (better)" in html
    assert "+0.35 (better)" in html  # exact_match went up
    # Samples: first 10 only.
    assert "answer-9" in html and "answer-10" not in html


def test_report_survives_missing_files(tmp_path):
    run = tmp_path / "empty-run"
    run.mkdir()
    html = write_report(run).read_text()
    assert "empty-run" in html
    assert html.count("not available") == 6  # data, train, eval, plots, samples, config


def test_report_survives_partial_and_broken_files(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    truncated = '{"model": "m", "data": null, "eval": {"after": {"loss": 1.0}'
    (run / "summary.json").write_text(truncated)
    (run / "samples.jsonl").write_text("garbage\nmore garbage\n")
    (run / "plots").mkdir()
    html = write_report(run).read_text()
    assert html.count("not available") == 6

    write_json(run / "summary.json", {"model": "m", "eval": {"after": {"loss": None, "f1": 0.5}}})
    html = write_report(run).read_text()
    assert "<th>f1</th>" in html and "n/a" in html


def test_format_before_after_lists_every_metric_and_delta():
    ev = SUMMARY["eval"]
    table = format_before_after(ev)
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "metric"
    assert len({len(line) for line in lines}) == 1  # fixed width
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in lines[2:]}
    assert set(rows) == {"loss", "perplexity", "exact_match", "rouge_l", "bleu"}
    assert rows["loss"] == ["loss", "2.5", "1.25", "-1.25 (better)"]
    assert rows["perplexity"] == ["perplexity", "12.18", "3.49", "-8.692 (better)"]
    assert rows["exact_match"] == ["exact_match", "0.1", "0.45", "+0.35 (better)"]
    assert rows["rouge_l"] == ["rouge_l", "0.3", "n/a", "n/a"]
    assert rows["bleu"] == ["bleu", "n/a", "0.2", "n/a"]
    assert "(worse)" in format_before_after({"before": {"loss": 1.0}, "after": {"loss": 2.0}})


# --- W&B -------------------------------------------------------------------------------

WANDB_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR",
             "WANDB_QUIET", "WANDB_BASE_URL", "NETRC")


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    """No W&B key anywhere; every variable wandb_report_to sets is restored afterwards."""
    for var in WANDB_ENV:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_wandb_disabled_passes_extra_through(clean_wandb_env, tmp_path):
    report_to = wandb_report_to(False, "p", "r", tmp_path, ["tensorboard", "none", "tensorboard"])
    assert report_to == ["tensorboard"]
    assert "WANDB_PROJECT" not in os.environ and "WANDB_MODE" not in os.environ


@pytest.mark.parametrize("enabled, extra", [(True, ["tensorboard", "tensorboard"]),
                                            (False, ["wandb", "tensorboard", "wandb"])])
def test_wandb_offline_without_key(clean_wandb_env, tmp_path, caplog, enabled, extra):
    with caplog.at_level(logging.INFO, logger="tunelab.tracking.wandb_setup"):
        report_to = wandb_report_to(enabled, "proj", "run-1", tmp_path, extra)
    assert report_to == ["tensorboard", "wandb"]
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_PROJECT"] == "proj" and os.environ["WANDB_NAME"] == "run-1"
    assert os.environ["WANDB_DIR"] == str(tmp_path.resolve())
    assert "wandb sync" in caplog.text


@pytest.mark.parametrize("key_source", ["env", "netrc"])
def test_wandb_online_with_key(clean_wandb_env, monkeypatch, tmp_path, key_source):
    if key_source == "env":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    else:
        netrc = f"machine api.wandb.ai\n  login user\n  password {'x' * 40}\n"
        (clean_wandb_env / ".netrc").write_text(netrc)
    wandb_report_to(True, "p", "r", tmp_path, [])
    assert "WANDB_MODE" not in os.environ


def test_wandb_respects_user_mode(clean_wandb_env, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_report_to(True, "p", "r", tmp_path, []) == ["wandb"]
    assert os.environ["WANDB_MODE"] == "disabled"


def test_trainer_with_wandb_offline_writes_local_run(clean_wandb_env, tmp_path):
    """End to end: a real Trainer, no key, no network -> an offline run in run_dir/wandb/."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    ))
    ids = torch.randint(0, 64, (8, 12)).tolist()
    dataset = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to=wandb_report_to(True, "tunelab-test", "tiny", run_dir, []),
    )
    metrics = MetricsCallback(run_dir / "metrics.jsonl")
    try:
        Trainer(model=model, args=args, train_dataset=dataset, callbacks=[metrics]).train()
    finally:
        finish_wandb()  # flushes the offline run and stops wandb's service process

    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb"))
    train_logs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2]


def test_missing_report_to_integration_fails_early(tmp_path, monkeypatch):
    import importlib.util

    from tunelab.errors import TunelabError
    from tunelab.tracking.wandb_setup import wandb_report_to

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TunelabError, match="tracking.report_to: mlflow is not installed"):
        wandb_report_to(False, "p", "r", tmp_path, ["mlflow"])


def test_tensorboard_and_wandb_get_the_results_and_samples(clean_wandb_env, tmp_path, tiny_model_dir, task_dir,
                                                           monkeypatch, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_sft import _cfg
    from tunelab.stages import sft

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "restored-after-the-test")
    cfg = _cfg(tmp_path, tiny_model_dir, task_dir, "train.max_steps=2", "tracking.wandb=true",
               "tracking.report_to=[tensorboard]")
    with caplog.at_level(logging.INFO, logger="tunelab"):
        run = sft.run(cfg).run_dir
    assert f"TensorBoard: {run / 'tensorboard'}" in caplog.text
    assert not (run / "checkpoints" / "runs").exists()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]  # the trainer's own numbers, in the same place
    texts = {tag.removesuffix("/text_summary"): events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
             for tag in events.Tags()["tensors"]}
    assert "before" in texts["results/before_after"] and "loss" in texts["results/before_after"]
    assert "after" in texts["results/samples"] and "reference" in texts["results/samples"]

    offline = next((run / "wandb").glob("offline-run-*"))  # offline W&B: tables as files, the rest in the .wandb log
    tables = offline / "files" / "media" / "table" / "results"
    before_after = json.loads(next(tables.glob("before_after_*.table.json")).read_text())
    loss = json.loads((run / "summary.json").read_text())["eval"]["after"]["loss"]
    assert before_after["columns"] == ["metric", "before", "after", "change"]
    assert before_after["data"][0][0] == "loss" and before_after["data"][0][2] == pytest.approx(loss)
    samples = json.loads(next(tables.glob("samples_*.table.json")).read_text())
    assert samples["columns"] == ["prompt", "reference", "before", "after"] and samples["data"]
    assert b"after/loss" in next(offline.glob("*.wandb")).read_bytes()  # the summary's before/after numbers


def test_report_leads_with_before_after_and_shows_prompts_as_conversations(tmp_path):
    run = _full_run_dir(tmp_path)
    (run / "samples.jsonl").write_text("\n".join(json.dumps(s) for s in [
        {"prompt": "<|im_start|>user\nWhen?<|im_end|>\n<|im_start|>assistant\n", "reference": "Friday",
         "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "When?"}],
         "before": "hm", "after": "Friday"},
        # a run folder from before samples kept their messages: the turns are split out of the template
        {"prompt": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere & how?<|im_end|>\n"
                   "<|im_start|>assistant\n", "reference": "Cafe", "before": "", "after": "Cafe"},
        {"prompt": "### User:\nplain template\n\n### Assistant:\n", "reference": "x", "before": "", "after": "x"},
    ]) + "\n")
    lr = [{"step": s, "learning_rate": 2e-4 * (1 - s / 6), "loss": 3.0 / s} for s in range(1, 7)]
    plot_metrics(RECORDS + lr, run / "plots")
    html = write_report(run).read_text()

    assert html.index("Before / after") < min(html.index("<h2>Training"), html.index("<h2>Data"), html.index("<h2>Plots"))
    assert 'alt="learning_rate"' in html and html.count('src="data:image/png;base64,') == 3
    assert "im_start" not in html  # no raw template markers
    assert '<div class="turn user"><span class="role">user</span>When?</div>' in html
    assert '<div class="turn system"><span class="role">system</span>Be brief.</div>' in html
    assert '<span class="role">user</span>Where &amp; how?</div>' in html
    assert '<span class="role">prompt</span>### User:\nplain template' in html  # no known markers: the text as is
