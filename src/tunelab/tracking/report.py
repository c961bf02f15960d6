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
                lower_better = any(k in metric for k in _LOWER_IS_BETTER)
                verdict = "better" if (a < b) == lower_better else "worse"
                change += f" ({verdict})"
        shown = fmt_value(before.get(metric)), fmt_value(after.get(metric))
        rows.append((metric, *shown, change, verdict))
    return rows


def format_before_after(before: dict | None, after: dict | None) -> str:
    """Fixed-width terminal table: metric | before | after | change (after - before)."""
    rows = [("metric", "before", "after", "change")]
    rows += [row[:4] for row in _before_after_rows(before, after)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        " | ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


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


def _plots_html(plot_dir: Path) -> str:
    pngs = sorted(plot_dir.glob("*.png")) if plot_dir.is_dir() else []
    figures = []
    for png in pngs:
        data = _read_optional(png, Path.read_bytes)
        if data is not None:
            b64 = base64.b64encode(data).decode("ascii")
            figures.append(
                f'<figure><img alt="{escape(png.stem)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{escape(png.stem)}</figcaption></figure>"
            )
    return "\n".join(figures) or _NA


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
    sections = [
        _section("Data", _kv_table(summary.get("data"))),
        _section("Training", _kv_table(summary.get("train"))),
        _section("Before / after fine-tuning", _before_after_html(summary.get("eval"))),
        _section("Plots", _plots_html(run_dir / "plots")),
        _section("Sample generations", _samples_html(samples)),
        _section("Config", f"<pre>{escape(config)}</pre>" if config is not None else _NA),
    ]
    html_doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>tunelab run {name}</title><style>{_CSS}</style></head><body>\n"
        f'<header><h1>{name}</h1><p class="meta">{meta}</p></header>\n'
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    return atomic_write_text(run_dir / "report.html", html_doc)
