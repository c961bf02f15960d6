"""Run and eval folders written the way `tunelab train` and `tunelab eval` write them, without
training anything: for the compare and board tests."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from tunelab.evals.metrics import score
from tunelab.tracking.metrics import append_jsonl, write_json

METRICS = ["exact_match", "field_accuracy", "rouge_l"]
REFERENCES = [f"WHO: Ann | WHEN: {day} | WHERE: Cafe {i}" for i, day in enumerate(["Mon", "Tue", "Wed", "Thu"] * 3)]


def outputs(right: int) -> list[str]:
    """The first `right` rows answered exactly, the others with the wrong day and place."""
    return [ref if i < right else "WHO: Ann | WHEN: Sun | WHERE: <home>" for i, ref in enumerate(REFERENCES)]


def prompts() -> list[str]:
    return [f"<|user|>Plan meetup {i} & tell me</s>" for i in range(len(REFERENCES))]


def make_run(root: Path, name: str, *, r: int, right: int, steps: int = 6, finished: bool = True) -> Path:
    """A LoRA run folder of `steps` logged steps (validation every 3rd) whose after-training outputs
    get `right` of the 12 sample rows exact; without `finished`, no summary/samples (still training)."""
    run = root / name
    run.mkdir(parents=True)
    config = {"run": {"name": name, "seed": 0}, "model": {"name": "embedded"},
              "peft": {"method": "lora", "r": r, "alpha": 2 * r},
              "data": {"format": "custom", "fields": {"messages": "messages"}, "source": "synthetic:meetup"},
              "train": {"lr": 1e-3, "batch_size": 3}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    data = {"train_samples": 240, "eval_samples": 24, "packing_efficiency": 0.93}
    write_json(run / "data_stats.json", data)
    for step in range(1, steps + 1):
        append_jsonl(run / "metrics.jsonl", {"step": step, "loss": 3.0 / step + 0.01 * r, "learning_rate": 1e-3})
        if step % 3 == 0:
            append_jsonl(run / "metrics.jsonl", {"step": step, "eval_loss": 2.0 / step + 0.01 * r,
                                                 "eval_rouge_l": 0.1 * step / (1 + r / 16)})
    (run / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    if not finished:
        return run
    before, after = outputs(0), outputs(right)
    for p, ref, b, a in zip(prompts(), REFERENCES, before, after):
        append_jsonl(run / "samples.jsonl", {"prompt": p, "reference": ref, "before": b, "after": a})
    write_json(run / "summary.json", {
        "model": "embedded", "method": "lora", "data": data,
        "train": {"steps": steps, "tokens_per_s": 1234.5 + r, "runtime_s": 60.0, "final_loss": 3.0 / steps},
        "eval": {"before": {"loss": 2.0, "perplexity": math.exp(2.0), **score(before, REFERENCES, METRICS)},
                 "after": {"loss": 1.0 + 0.01 * r, "perplexity": math.exp(1.0 + 0.01 * r),
                           **score(after, REFERENCES, METRICS)}},
        "warnings": [],
    })
    return run


def make_eval(root: Path, name: str, *, right: int, baseline_right: int = 0) -> Path:
    """An eval folder of task `rouge` (exact_match, rouge metrics) with a baseline."""
    out = root / name
    out.mkdir(parents=True)
    rows, tasks = [], {}
    for model, k in (("target", right), ("baseline", baseline_right)):
        answers = outputs(k)
        rows += [{"task": "rouge", "model": model, "prompt": p, "reference": ref, "prediction": y}
                 for p, ref, y in zip(prompts(), REFERENCES, answers)]
        tasks[model] = {"rouge": {**score(answers, REFERENCES, ["rouge", "exact_match"]), "n": len(answers)}}
    write_json(out / "results.json", {"target": f"runs/{name}", "tasks": tasks["target"],
                                      "baseline": {"model": "embedded", "tasks": tasks["baseline"]},
                                      "data": {"rouge": "test.jsonl"}})
    for row in rows:
        append_jsonl(out / "predictions.jsonl", row)
    return out
