"""The run report: one self-contained report.html per run folder (and kfold.html, and an eval's
report.html), plus the terminal tables the CLI prints.

The pages are Jinja2 templates (`templates/report/`) rendered with autoescaping, so prompts,
outputs and config values are shown as text, never as markup; plots are embedded as base64 and
the CSS is inline, so a page can be mailed or archived alone. Every piece is optional: a missing
or unreadable file turns its section into "not available" instead of failing the run at its end.
The before/after table comes first: it is what a run is for.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.templates import render
from tunelab.tracking.metrics import atomic_write_text, read_jsonl
from tunelab.tracking.stat_tables import before_after_rows, eval_rows
from tunelab.tracking.tables import fmt_value, text_table

MAX_SAMPLES = 10
_TURNS = (
    re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S),  # ChatML (SmolLM2, Qwen)
    re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S),  # Llama 3
)
"""Chat-template markers a rendered prompt is split back into turns by, for samples.jsonl rows
written before they kept their `messages`."""


def _read_optional(path: Path, reader) -> Any | None:
    """reader(path), or None when the file is missing or unreadable (the section says so)."""
    try:
        return reader(path)
    except (OSError, ValueError, TunelabError):
        return None


def _kv_rows(d: Any) -> list[tuple[str, str]]:
    return [(str(k), fmt_value(v)) for k, v in d.items()] if isinstance(d, dict) else []


def _figures(pngs: list[Path]) -> list[tuple[str, str]]:
    """(name, base64 PNG) of each readable file."""
    found = ((png.stem, _read_optional(png, Path.read_bytes)) for png in pngs)
    return [(name, base64.b64encode(data).decode("ascii")) for name, data in found if data is not None]


def _plots(plot_dir: Path) -> list[tuple[str, str]]:
    return _figures(sorted(plot_dir.glob("*.png"))) if plot_dir.is_dir() else []


def _content(message: dict) -> str:
    """A message's text, with its tool calls (as JSON) where it has any."""
    text = message.get("content") if isinstance(message.get("content"), str) else ""
    calls = message.get("tool_calls")
    return "\n".join(filter(None, [text, json.dumps(calls, ensure_ascii=False) if calls else ""]))


def conversation(sample: dict) -> list[dict] | None:
    """A sample's prompt as turns [{role, content}]: its `messages` where samples.jsonl kept them,
    else split back out of the rendered prompt by ChatML or Llama-3 markers, else None (the
    prompt is shown as the text it is)."""
    messages = sample.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return [{"role": str(m.get("role", "?")), "content": _content(m)} for m in messages]
    prompt = sample.get("prompt")
    for pattern in _TURNS if isinstance(prompt, str) else ():
        turns = [{"role": role, "content": text.strip()} for role, text in pattern.findall(prompt)]
        while turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns.pop()  # the generation prompt: the answer starts here
        if turns:
            return turns
    return None


def _samples(samples: list | None) -> list[dict]:
    return [{"turns": conversation(s), **{c: str(s.get(c) or "") for c in ("prompt", "reference", "before", "after")}}
            for s in (samples or [])[:MAX_SAMPLES] if isinstance(s, dict)]


def mixture_rows(data: dict, ev: dict) -> list[tuple[str, ...]]:
    """Header, then one row per source of a mixture: its weight and target share, the share of the
    training tokens it got, its samples, and its validation loss before → after; [] for one source."""
    sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
    if not sources:
        return []
    before, after = ev.get("before") or {}, ev.get("after") or {}
    rows = [("source", "weight", "target share", "token share", "loss-token share", "train samples (of available)",
             "repeated", "validation loss before", "after")]
    for name, s in sources.items():
        rows.append((name, fmt_value(s.get("weight")), fmt_value(s.get("target_share")), fmt_value(s.get("token_share")),
                     fmt_value(s.get("loss_token_share")),
                     f"{s.get('train_samples')} ({s.get('available_train_samples')})", fmt_value(s.get("repeated")),
                     fmt_value(before.get(f"loss_{name}")), fmt_value(after.get(f"loss_{name}"))))
    return rows


def write_report(run_dir: str | os.PathLike) -> Path:
    """Build run_dir/report.html from the run folder's files and return its path."""
    run_dir = Path(run_dir)
    summary = _read_optional(run_dir / "summary.json", lambda p: json.loads(p.read_text("utf-8")))
    summary = summary if isinstance(summary, dict) else {}
    samples = _read_optional(run_dir / "samples.jsonl", read_jsonl)
    ev = summary.get("eval") if isinstance(summary.get("eval"), dict) else {}
    warnings = summary.get("warnings") if isinstance(summary.get("warnings"), list) else []
    name = run_dir.resolve().name
    data = summary.get("data") if isinstance(summary.get("data"), dict) else {}
    mixture = mixture_rows(data, ev)
    page = render(
        "report/run.html", title=f"tunelab run {name}", heading=name, model=summary.get("model"),
        method=summary.get("method"), warnings=[str(w) for w in warnings],
        rows=before_after_rows(ev), plots=_plots(run_dir / "plots"),
        samples=_samples(samples), total=len(samples or []), train=_kv_rows(summary.get("train")),
        data=_kv_rows({k: v for k, v in data.items() if not (mixture and k == "sources")}), mixture=mixture,
        config=_read_optional(run_dir / "config.yaml", lambda p: p.read_text("utf-8")),
    )
    return atomic_write_text(run_dir / "report.html", page)


# ---- k-fold cross-validation (`tunelab kfold`): one report over all folds and grid points ----


def _mean_std(agg: dict | None) -> str:
    """mean ± sample std over the folds, with the t interval of the mean where kfold.json has it."""
    if not agg or agg.get("mean") is None:
        return "n/a"
    shown = f"{fmt_value(agg['mean'])} ± {fmt_value(agg['std'])}"
    return f"{shown} [{fmt_value(agg['ci95'][0])}, {fmt_value(agg['ci95'][1])}]" if agg.get("ci95") else shown


def _kfold_headline(result: dict) -> str:
    direction = "lower" if result["lower_is_better"] else "higher"
    best = (result["best"] or {}).get("name", "none (no grid point has the metric on every fold)")
    return (f"{result['folds']}-fold cross-validation (seed {result['seed']}) in {result['dir']}; "
            f"best by mean {result['metric']} ({direction} is better): {best}")


def _kfold_ranking(result: dict) -> list[tuple[str, ...]]:
    """grid point | chosen metric as mean ± std over folds | best marker."""
    best = (result["best"] or {}).get("name")
    rows = [("grid point", f"{result['metric']} (mean ± std)", "")]
    rows += [(p["name"], _mean_std(p["after"].get(result["metric"])), "best" if p["name"] == best else "")
             for p in result["points"]]
    return rows


def _kfold_point_rows(point: dict) -> list[tuple[str, ...]]:
    """metric | before (mean ± std over folds) | after, per fold | after, mean ± std."""
    before, after, k = point["before"], point["after"], len(point["runs"])
    rows = [("metric", "before", *(f"fold-{i}" for i in range(k)), "after")]
    for metric in dict.fromkeys([*after, *before]):
        per_fold = after.get(metric, {}).get("folds", [None] * k)
        rows.append((metric, _mean_std(before.get(metric)), *map(fmt_value, per_fold), _mean_std(after.get(metric))))
    return rows


def format_kfold(result: dict) -> str:
    """Terminal summary of a k-fold result: the grid ranked by the chosen metric, then every metric per fold."""
    parts = [_kfold_headline(result), text_table(_kfold_ranking(result))]
    for point in result["points"]:
        parts += [f"{point['name']} (after training, per fold; before = the untouched model):",
                  text_table(_kfold_point_rows(point))]
    return "\n\n".join(parts)


def write_kfold_report(result: dict) -> Path:
    """Write kfold.html (self-contained, like report.html) into the k-fold folder and return its path."""
    parent = Path(result["dir"])
    name = parent.resolve().name
    page = render(
        "report/kfold.html", title=f"tunelab k-fold {name}", heading=name, headline=_kfold_headline(result),
        ranking=_kfold_ranking(result), sweep=_kv_rows(result["sweep"]),
        points=[{"name": p["name"], "rows": _kfold_point_rows(p), "runs": p["runs"]} for p in result["points"]],
    )
    return atomic_write_text(parent / "kfold.html", page)


# ---- evaluation (`tunelab eval`): the target model against a baseline, per task metric ----

def _eval_tasks(predictions: list[dict]) -> list[dict]:
    """Per task, the first MAX_SAMPLES rows: prompt, reference, and both models' answers."""
    by_task: dict[str, dict[str, list[dict]]] = {}
    for row in predictions:
        by_task.setdefault(row["task"], {}).setdefault(row["model"], []).append(row)
    tasks = []
    for task, models in by_task.items():
        target, baseline = models.get("target", []), models.get("baseline", [])
        cells = [(row["prompt"], row["reference"], row["prediction"], *(b["prediction"] for b in baseline[i : i + 1]))
                 for i, row in enumerate(target[:MAX_SAMPLES])]
        tasks.append({"name": task, "columns": ("prompt", "reference", "target", "baseline")[: 4 if baseline else 3],
                      "cells": cells, "total": len(target)})
    return tasks


def write_eval_report(out_dir: str | os.PathLike, results: dict, predictions: list[dict], chart: Path | None) -> Path:
    """Write out_dir/report.html: metrics side by side with the delta, the chart, the data each
    task used, and sample predictions (all of them are in predictions.jsonl, linked)."""
    out_dir = Path(out_dir)
    baseline = results.get("baseline")
    curves = out_dir / "curves"
    page = render(
        "report/eval.html", title="tunelab eval", heading=f"Evaluation of {results['target']}",
        target=results["target"], baseline=baseline["model"] if baseline else "none", rows=eval_rows(results),
        chart=_figures([chart]) if chart else [], curves=_plots(curves) if curves.is_dir() else None,
        data=_kv_rows(results.get("data")), tasks=_eval_tasks(predictions),
    )
    return atomic_write_text(out_dir / "report.html", page)
