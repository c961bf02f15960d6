"""The run report: one self-contained report.html per run folder, plus the terminal
before/after table the CLI prints.

The HTML embeds its plots as base64 and uses only inline CSS, so it can be mailed or
archived alone. Every piece is optional: a missing or unreadable file turns its section
into "not available" instead of failing the run at its very end.
"""

from __future__ import annotations

import base64
import json
import math
import os
from html import escape
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.tracking.metrics import atomic_write_text, read_jsonl

MAX_SAMPLES = 10
_NA = '<p class="na">not available</p>'
_LOWER_IS_BETTER = ("loss", "perplexity")

_CSS = """
.warn { background: #fff4e5; border-left: 4px solid #e08a00; padding: .5em .8em; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.meta { color: #555; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 22rem; font-size: .9rem; }
.better { color: #1a7f37; } .worse { color: #cf222e; }
pre { background: #f6f8fa; padding: 1rem; overflow-x: auto; }
.na { color: #888; font-style: italic; }
figure { display: inline-block; margin: 0 1rem 1rem 0; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def fmt_value(v: Any) -> str:
    """Numbers to 4 significant digits (big ones as grouped integers); None as "n/a"."""
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v if isinstance(v, str) else json.dumps(v)
    if isinstance(v, int):
        return f"{v:,}"
    if math.isfinite(v) and abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def lower_is_better(metric: str) -> bool:
    """Loss and perplexity (and their variants) fall as a model improves; task metrics rise."""
    return any(k in metric for k in _LOWER_IS_BETTER)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _before_after_rows(before: dict | None, after: dict | None) -> list[tuple[str, ...]]:
    """(metric, before, after, change, verdict) as text, one row per metric in either dict.

    change is after - before plus the verdict, "better"/"worse" by lower-is-better for loss
    and perplexity and higher-is-better otherwise; "n/a" unless both sides are numbers.
    """
    before, after = (d if isinstance(d, dict) else {} for d in (before, after))
    rows = []
    for metric in dict.fromkeys([*before, *after]):
        b, a = _number(before.get(metric)), _number(after.get(metric))
        change, verdict = "n/a", ""
        if b is not None and a is not None and math.isfinite(a - b):
            change = f"{a - b:+.4g}"
            if a != b:
                verdict = "better" if (a < b) == lower_is_better(metric) else "worse"
                change += f" ({verdict})"
        shown = fmt_value(before.get(metric)), fmt_value(after.get(metric))
        rows.append((metric, *shown, change, verdict))
    return rows


def _text_table(rows: list[tuple[str, ...]], labels: int = 1) -> str:
    """Fixed-width terminal table; rows[0] is the header, the first `labels` columns are
    left-aligned text and the rest right-aligned numbers."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(c.ljust(w) if i < labels else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _html_table(rows: list[tuple[str, ...]]) -> str:
    """HTML version of `_text_table` (escaped): rows[0] is the header, column 0 labels each row."""
    head = "".join(f"<th>{escape(c)}</th>" for c in rows[0])
    body = "".join(
        f"<tr><th>{escape(row[0])}</th>" + "".join(f'<td class="num">{escape(c)}</td>' for c in row[1:]) + "</tr>"
        for row in rows[1:]
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def format_before_after(before: dict | None, after: dict | None) -> str:
    """Fixed-width terminal table: metric | before | after | change (after - before)."""
    rows = [("metric", "before", "after", "change"), *(row[:4] for row in _before_after_rows(before, after))]
    return _text_table(rows)


def _read_optional(path: Path, reader) -> Any | None:
    """reader(path), or None when the file is missing or unreadable (the section says so)."""
    try:
        return reader(path)
    except (OSError, ValueError, TunelabError):
        return None


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>\n{body}\n</section>"


def _kv_table(d: Any) -> str:
    if not isinstance(d, dict) or not d:
        return _NA
    rows = "".join(
        f'<tr><th>{escape(str(k))}</th><td class="num">{escape(fmt_value(v))}</td></tr>'
        for k, v in d.items()
    )
    return f"<table>{rows}</table>"


def _before_after_html(ev: Any) -> str:
    ev = ev if isinstance(ev, dict) else {}
    rows = _before_after_rows(ev.get("before"), ev.get("after"))
    if not rows:
        return _NA
    body = "".join(
        f'<tr><th>{escape(m)}</th><td class="num">{escape(b)}</td><td class="num">{escape(a)}</td>'
        f'<td class="num {v}">{escape(c)}</td></tr>'
        for m, b, a, c, v in rows
    )
    return (
        "<table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>"
        f"{body}</table>"
    )


def _figure_html(png: Path) -> str:
    """The PNG embedded as base64 with its name as caption; "" when it cannot be read."""
    data = _read_optional(png, Path.read_bytes)
    if data is None:
        return ""
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img alt="{escape(png.stem)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{escape(png.stem)}</figcaption></figure>"
    )


def _plots_html(plot_dir: Path) -> str:
    pngs = sorted(plot_dir.glob("*.png")) if plot_dir.is_dir() else []
    return "\n".join(filter(None, map(_figure_html, pngs))) or _NA


def _samples_html(samples: list[dict] | None) -> str:
    if not samples:
        return _NA
    cols = ("prompt", "reference", "before", "after")
    head = "<tr><th>#</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><td>{i}</td>"
        + "".join(f'<td class="text">{escape(str(s.get(c) or ""))}</td>' for c in cols)
        + "</tr>"
        for i, s in enumerate(samples[:MAX_SAMPLES], start=1)
        if isinstance(s, dict)
    )
    shown = f"first {MAX_SAMPLES} of " if len(samples) > MAX_SAMPLES else ""
    note = f'<p class="meta">{shown}{len(samples)} samples</p>'
    return f"{note}<table>{head}{body}</table>"


def write_report(run_dir: str | os.PathLike) -> Path:
    """Build run_dir/report.html from the run folder's files and return its path."""
    run_dir = Path(run_dir)
    summary = _read_optional(run_dir / "summary.json", lambda p: json.loads(p.read_text("utf-8")))
    summary = summary if isinstance(summary, dict) else {}
    config = _read_optional(run_dir / "config.yaml", lambda p: p.read_text("utf-8"))
    samples = _read_optional(run_dir / "samples.jsonl", read_jsonl)

    name = escape(run_dir.resolve().name)
    meta = " · ".join(
        f"{label}: <b>{escape(fmt_value(summary.get(key)))}</b>"
        for label, key in (("model", "model"), ("method", "method"))
    )
    warnings = "".join(f'<p class="warn">{escape(w)}</p>' for w in summary.get("warnings", []))
    sections = [
        warnings,
        _section("Data", _kv_table(summary.get("data"))),
        _section("Training", _kv_table(summary.get("train"))),
        _section("Before / after fine-tuning", _before_after_html(summary.get("eval"))),
        _section("Plots", _plots_html(run_dir / "plots")),
        _section("Sample generations", _samples_html(samples)),
        _section("Config", f"<pre>{escape(config)}</pre>" if config is not None else _NA),
    ]
    return atomic_write_text(run_dir / "report.html", _page(f"tunelab run {name}", name, meta, sections))


def _page(title: str, heading: str, meta: str, sections: list[str]) -> str:
    """A whole self-contained HTML document (inline CSS); the arguments are HTML, already escaped."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{_CSS}</style></head><body>\n"
        f'<header><h1>{heading}</h1><p class="meta">{meta}</p></header>\n'
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


# ---- k-fold cross-validation (`tunelab kfold`): one report over all folds and grid points ----


def _mean_std(agg: dict | None) -> str:
    if not agg or agg.get("mean") is None:
        return "n/a"
    return f"{fmt_value(agg['mean'])} ± {fmt_value(agg['std'])}"


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
    parts = [_kfold_headline(result), _text_table(_kfold_ranking(result))]
    for point in result["points"]:
        parts += [f"{point['name']} (after training, per fold; before = the untouched model):",
                  _text_table(_kfold_point_rows(point))]
    return "\n\n".join(parts)


def write_kfold_report(result: dict) -> Path:
    """Write kfold.html (self-contained, like report.html) into the k-fold folder and return its path."""
    parent = Path(result["dir"])
    sections = [_section("Grid points", _html_table(_kfold_ranking(result)))]
    for point in result["points"]:
        links = " · ".join(f'<a href="{escape(run)}/report.html">{escape(run)}</a>' for run in point["runs"])
        sections.append(_section(point["name"], _html_table(_kfold_point_rows(point))
                                 + f'<p class="meta">after training, per fold; run reports: {links}</p>'))
    if result["sweep"]:
        sections.append(_section("Sweep", _kv_table(result["sweep"])))
    name = escape(parent.resolve().name)
    page = _page(f"tunelab k-fold {name}", name, escape(_kfold_headline(result)), sections)
    return atomic_write_text(parent / "kfold.html", page)


# ---- evaluation (`tunelab eval`): the target model against a baseline, per task metric ----

_COUNTS = ("n", "tokens")


def eval_scores(metrics: dict | None) -> dict:
    """A task's comparable metrics from results.json: not its row/token counts, not standard errors."""
    return {k: v for k, v in (metrics or {}).items() if k not in _COUNTS and not k.endswith("_stderr")}


def _eval_rows(results: dict) -> list[tuple[str, ...]]:
    """(task (n=rows), metric, target, baseline, delta, verdict) as text; delta = target - baseline."""
    baseline = (results.get("baseline") or {}).get("tasks", {})
    rows = []
    for task, metrics in results["tasks"].items():
        label = f"{task} (n={metrics.get('n', '?')})"
        for metric, b, a, delta, verdict in _before_after_rows(eval_scores(baseline.get(task)), eval_scores(metrics)):
            rows.append((label, metric, a, b, delta, verdict))
    return rows


def format_eval(results: dict) -> str:
    """Terminal table of an eval's results: task | metric | target | baseline | delta."""
    return _text_table([("task", "metric", "target", "baseline", "delta"), *(r[:5] for r in _eval_rows(results))],
                       labels=2)


def _eval_table_html(results: dict) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("task", "metric", "target", "baseline", "delta (target − baseline)"))
    body = "".join(
        f'<tr><th>{escape(t)}</th><td>{escape(m)}</td><td class="num">{escape(a)}</td>'
        f'<td class="num">{escape(b)}</td><td class="num {v}">{escape(d)}</td></tr>'
        for t, m, a, b, d, v in _eval_rows(results)
    )
    return f"<table><tr>{head}</tr>{body}</table>" if body else _NA


def _eval_samples_html(predictions: list[dict]) -> str:
    """The first MAX_SAMPLES rows of each task: prompt, reference, and both models' answers."""
    by_task: dict[str, dict[str, list[dict]]] = {}
    for row in predictions:
        by_task.setdefault(row["task"], {}).setdefault(row["model"], []).append(row)
    parts = []
    for task, models in by_task.items():
        target, baseline = models.get("target", []), models.get("baseline", [])
        cols = ("prompt", "reference", "target", "baseline")[: 4 if baseline else 3]
        cells = [
            (row["prompt"], row["reference"], row["prediction"], *(b["prediction"] for b in baseline[i : i + 1]))
            for i, row in enumerate(target[:MAX_SAMPLES])
        ]
        body = "".join("<tr>" + "".join(f'<td class="text">{escape(c)}</td>' for c in row) + "</tr>" for row in cells)
        head = "".join(f"<th>{c}</th>" for c in cols)
        parts.append(f"<h3>{escape(task)}</h3><p class=\"meta\">first {len(cells)} of {len(target)}</p>"
                     f"<table><tr>{head}</tr>{body}</table>")
    return "\n".join(parts)


def write_eval_report(out_dir: str | os.PathLike, results: dict, predictions: list[dict], chart: Path | None) -> Path:
    """Write out_dir/report.html: metrics side by side with the delta, the chart, the data each
    task used, and sample predictions (all of them are in predictions.jsonl, linked)."""
    out_dir = Path(out_dir)
    baseline = results.get("baseline")
    base = baseline["model"] if baseline else "none"
    meta = f"target: <b>{escape(results['target'])}</b> · baseline: <b>{escape(base)}</b>"
    link = '<p>Every prediction next to its reference: <a href="predictions.jsonl">predictions.jsonl</a></p>'
    sections = [
        _section("Results", _eval_table_html(results)),
        _section("Chart", (_figure_html(chart) if chart else "") or _NA),
        _section("Training curves", _plots_html(out_dir / "curves")) if (out_dir / "curves").is_dir() else "",
        _section("Data", _kv_table(results.get("data"))),
        _section("Predictions", link + _eval_samples_html(predictions)),
    ]
    heading = f"Evaluation of {escape(results['target'])}"
    return atomic_write_text(out_dir / "report.html", _page("tunelab eval", heading, meta, sections))
