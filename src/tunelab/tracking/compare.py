"""Run folders and/or eval folders side by side, in one self-contained compare.html (inline CSS,
curves as base64 PNGs) and compare.json: `tunelab compare` and the board's compare view.

read each folder (a run: config.yaml, summary.json, metrics.jsonl, samples.jsonl,
data_stats.json; an eval: results.json, predictions.jsonl) → the config keys that differ → data
stats → curves overlaid → each folder's results with 95% intervals → for every later folder
against the first, on the rows both answered (matched by prompt, same reference): paired
differences with intervals and p-values, and the rows where the two differ most.

A run folder's rows are its samples.jsonl (after training, task "validation"); an eval folder's
are its target's predictions, per task. Folders are paired on the tasks they share.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError
from tunelab.evals.intervals import add_eval_intervals, add_run_intervals, differences, row_values
from tunelab.evals.metrics import current_names, result_keys
from tunelab.tracking.metrics import atomic_write_text, read_jsonl, write_json
from tunelab.tracking.status import read_json_object, read_status

RUN_TASK = "validation"
MOST_DIFFERENT = 5
_ROW_METRICS = result_keys(["exact_match", "field_accuracy", "rouge"])
CURVES = {
    "loss": "training loss", "eval_loss": "validation loss",
    **{f"eval_{key}": f"validation {key}" for key in _ROW_METRICS},
}
"""metrics.jsonl keys overlaid, one figure each (the board draws the same ones)."""


@dataclass
class Folder:
    """One compared folder, read once."""

    name: str
    path: Path
    kind: str  # "run" or "eval"
    config: dict[str, Any]  # flattened: {"peft.r": 16, ...}
    data: dict[str, Any]  # flattened data stats
    records: list[dict] = field(default_factory=list)  # metrics.jsonl
    results: dict = field(default_factory=dict)  # a run's summary["eval"], an eval's results.json, with intervals
    rows: dict[str, list[dict]] = field(default_factory=dict)  # task → [{prompt, reference, prediction}]
    scores: dict[str, dict] = field(default_factory=dict)  # task → the metrics its rows were scored on
    info: dict[str, Any] = field(default_factory=dict)  # model, method, status for the header


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def read_config(path: Path) -> dict:
    """A run folder's config.yaml as a dict; {} when missing or unreadable."""
    try:
        data = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def kind_of(path: Path) -> str | None:
    """"run" (config.yaml with summary.json or metrics.jsonl), "eval" (results.json), or None."""
    if (path / "results.json").is_file():
        return "eval"
    if (path / "config.yaml").is_file() and ((path / "summary.json").is_file() or (path / "metrics.jsonl").is_file()):
        return "run"
    return None


def read_run(path: Path, name: str) -> Folder:
    summary = current_names(read_json_object(path / "summary.json"))  # old folders: rouge1 → rouge_1
    samples = read_jsonl(path / "samples.jsonl")
    ev = add_run_intervals(copy.deepcopy(summary), samples)["eval"]
    config = read_config(path)
    rows = [{"prompt": s["prompt"], "reference": s["reference"], "prediction": s["after"]}
            for s in samples if isinstance(s.get("after"), str)]
    info = {"model": summary.get("model") or (config.get("model") or {}).get("name"),
            "method": summary.get("method") or (config.get("peft") or {}).get("method"),
            "status": read_status(path)["state"]}
    return Folder(name, path, "run", flatten(config), flatten(read_json_object(path / "data_stats.json") or summary.get("data")),
                  current_names(read_jsonl(path / "metrics.jsonl")), ev, {RUN_TASK: rows} if rows else {},
                  {RUN_TASK: ev.get("after") or {}}, info)


def read_eval(path: Path, name: str) -> Folder:
    results = current_names(read_json_object(path / "results.json"))
    if not isinstance(results.get("tasks"), dict):
        raise TunelabError(f"{path / 'results.json'}: not a `tunelab eval` result (no `tasks`); re-run tunelab eval")
    predictions = read_jsonl(path / "predictions.jsonl")
    results = add_eval_intervals(copy.deepcopy(results), predictions)
    rows: dict[str, list[dict]] = {}
    for row in predictions:
        if row.get("model") == "target" and isinstance(row.get("prediction"), str):
            rows.setdefault(row["task"], []).append(row)
    baseline = results.get("baseline") or {}
    config = {"target": results.get("target"), "baseline": baseline.get("model"), "data": results.get("data")}
    info = {"model": results.get("target"), "method": "eval", "status": "finished"}
    return Folder(name, path, "eval", flatten(config), flatten(results.get("data")), [], results, rows,
                  dict(results["tasks"]), info)


def read_folders(paths: list[str | os.PathLike]) -> list[Folder]:
    """Every folder read, named by its path below their common folder; an unusable path stops
    everything before any output is written."""
    resolved = [Path(p).resolve() for p in paths]
    if len(resolved) < 2:
        raise TunelabError("compare: give at least two run or eval folders")
    if len(set(resolved)) < len(resolved):
        raise TunelabError("compare: a folder is given twice")
    for given, path in zip(paths, resolved):
        if kind_of(path) is None:
            raise TunelabError(f"compare: {given} is neither a run folder (config.yaml with summary.json or "
                               "metrics.jsonl) nor an eval folder (results.json)")
    names = [p.name for p in resolved]
    if len(set(names)) < len(names):
        common = Path(os.path.commonpath(resolved))
        names = [p.relative_to(common).as_posix() for p in resolved]
    return [(read_eval if kind_of(p) == "eval" else read_run)(p, n) for p, n in zip(resolved, names)]


def _table(folders: list[Folder], attribute: str, only_different: bool) -> dict[str, dict]:
    """{key: {"values": [one per folder, None when missing], "differs": bool}}. Values differ when
    two folders of the same kind disagree (a run's config has no eval keys, and the reverse)."""
    keys = dict.fromkeys(k for f in folders for k in getattr(f, attribute))
    out = {}
    for key in keys:
        values = [getattr(f, attribute).get(key) for f in folders]
        by_kind: dict[str, set[str]] = {}
        for f, v in zip(folders, values):
            by_kind.setdefault(f.kind, set()).add(json.dumps(v, sort_keys=True, default=str))
        differs = any(len(seen) > 1 for seen in by_kind.values())
        if differs or not only_different:
            out[key] = {"values": values, "differs": differs}
    return out


def match_rows(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """(row of a, row of b) for the prompts both answered with the same reference (first of repeats)."""
    by_prompt: dict[str, dict] = {}
    for row in b:
        by_prompt.setdefault(row["prompt"], row)
    pairs, seen = [], set()
    for row in a:
        other = by_prompt.get(row["prompt"])
        if other is not None and other["reference"] == row["reference"] and row["prompt"] not in seen:
            seen.add(row["prompt"])
            pairs.append((row, other))
    return pairs


def compare_pair(a: Folder, b: Folder) -> list[dict]:
    """b − a on every task both have rows for: paired differences and the most different rows."""
    out = []
    for task in a.rows.keys() & b.rows.keys():
        pairs = match_rows(a.rows[task], b.rows[task])
        keys = [k for k in a.scores.get(task, {}) if k in b.scores.get(task, {})]
        if len(pairs) < 2 or not keys:
            continue
        values_a = row_values([p for p, _ in pairs], keys)
        values_b = row_values([q for _, q in pairs], keys)
        tests = differences(values_b, values_a)
        if not tests:
            continue
        metric = next(iter(tests))
        score_a, score_b = values_a[metric][0], values_b[metric][0]
        ranked = sorted(range(len(pairs)), key=lambda i: -abs(score_b[i] - score_a[i]))
        rows = [{"prompt": pairs[i][0]["prompt"], "reference": pairs[i][0]["reference"],
                 "a": pairs[i][0]["prediction"], "b": pairs[i][1]["prediction"],
                 "score_a": score_a[i], "score_b": score_b[i]}
                for i in ranked[:MOST_DIFFERENT] if score_b[i] != score_a[i]]
        means = {k: [sum(values_a[k][0]) / len(pairs), sum(values_b[k][0]) / len(pairs)] for k in tests}
        out.append({"a": a.name, "b": b.name, "task": task, "n": len(pairs), "metrics": tests, "means": means,
                    "rows_by": metric, "rows": rows})
    return sorted(out, key=lambda c: c["task"])


def _curve_png(folders: list[Folder], key: str, title: str) -> str | None:
    """One metrics.jsonl key of every run on one axis, as a base64 PNG; None when no run has it."""
    from matplotlib.figure import Figure

    from tunelab.tracking.plots import _points

    lines = [(f.name, *_points(f.records, key)) for f in folders]
    lines = [line for line in lines if line[1]]
    if not lines:
        return None
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    for name, steps, values in lines:
        ax.plot(steps, values, "o-" if key.startswith("eval_") else "-", label=name, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build(paths: list[str | os.PathLike]) -> tuple[dict, list[tuple[str, str]]]:
    """(compare.json's content, [(curve title, base64 PNG)])."""
    folders = read_folders(paths)
    first = folders[0]
    result = {
        "folders": [{"name": f.name, "path": str(f.path), "kind": f.kind, **f.info} for f in folders],
        "config_diff": _table(folders, "config", only_different=True),
        "data": _table(folders, "data", only_different=False),
        "results": {f.name: f.results for f in folders},
        "pairs": [pair for other in folders[1:] for pair in compare_pair(first, other)],
    }
    figures = [(title, png) for key, title in CURVES.items() if (png := _curve_png(folders, key, title))]
    return result, figures


def render_html(result: dict, figures: list[tuple[str, str]], back: str | None = None) -> str:
    """compare.html; `back`: a link shown at the top (the board's runs list)."""
    from tunelab.templates import render

    runs = [f for f in result["folders"] if f["kind"] == "run"]
    evals = [f for f in result["folders"] if f["kind"] == "eval"]
    run_metrics = list(dict.fromkeys(m for f in runs for side in ("before", "after")
                                     for m in _scores(result["results"][f["name"]].get(side))))
    eval_metrics = list(dict.fromkeys((task, m) for f in evals for task, metrics in result["results"][f["name"]]["tasks"].items()
                                      for m in _scores(metrics)))
    return render("compare/compare.html", result=result, figures=figures, runs=runs, evals=evals,
                  run_metrics=run_metrics, eval_metrics=eval_metrics, back=back)


def _scores(metrics: dict | None) -> list[str]:
    from tunelab.tracking.stat_tables import scores

    return list(scores(metrics))


def format_pairs(result: dict) -> str:
    """Terminal table of the paired differences: b − a (task, rows) | metric | a | b | b − a [95% CI] p."""
    from tunelab.tracking.tables import fmt_value, text_table
    from tunelab.tracking.stat_tables import fmt_difference, verdict

    rows = [("pair (rows)", "metric", "first", "second", "second − first [95% CI]")]
    for pair in result["pairs"]:
        label = f"{pair['b']} − {pair['a']}, {pair['task']} ({pair['n']})"
        for metric, test in pair["metrics"].items():
            shown = fmt_difference(test) + (f" ({v})" if (v := verdict(metric, test)) else "")
            rows.append((label, metric, *map(fmt_value, pair["means"][metric]), shown))
    if len(rows) == 1:
        return "no two folders answered the same rows: no paired differences"
    return text_table(rows, labels=2)


def write(paths: list[str | os.PathLike], output: str | os.PathLike) -> dict:
    """Write output/compare.html and output/compare.json; returns compare.json's content plus
    `output` (the folder)."""
    result, figures = build(paths)
    output = Path(output)
    write_json(output / "compare.json", result)
    atomic_write_text(output / "compare.html", render_html(result, figures))
    return {**result, "output": str(output)}
