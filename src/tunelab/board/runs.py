"""What the board shows of the run folders under its folder, read fresh on every request (a run
that trains changes them; the board never writes).

A run folder is one with config.yaml and something a run writes (status.json, metrics.jsonl or
summary.json); its own subfolders (checkpoints, eval results) are not searched for more runs.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evals.intervals import add_run_intervals
from tunelab.evals.metrics import current_names
from tunelab.tracking.compare import read_config
from tunelab.tracking.metrics import read_jsonl
from tunelab.tracking.stat_tables import before_after_rows, scores
from tunelab.tracking.status import read_json_object, read_status

MAX_DEPTH = 4
"""Folder levels searched below the board's folder (a k-fold's folds are at depth 2 or 3)."""
_RUN_FILES = ("status.json", "metrics.jsonl", "summary.json")


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any((path / f).is_file() for f in _RUN_FILES)


def find_runs(root: Path) -> list[Path]:
    """Every run folder under `root`, newest activity first."""
    found = []
    for folder, subfolders, _files in os.walk(root):
        path = Path(folder)
        depth = len(path.relative_to(root).parts)
        if is_run(path):
            found.append(path)
            subfolders.clear()
        elif depth >= MAX_DEPTH:
            subfolders.clear()
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
    return sorted(found, key=_activity, reverse=True)


def _activity(path: Path) -> float:
    times = [p.stat().st_mtime for p in (path / f for f in (*_RUN_FILES, "config.yaml")) if p.is_file()]
    return max(times, default=0.0)


def resolve(root: Path, name: str) -> Path | None:
    """The folder `name` (a path relative to root) if it lies inside root, else None."""
    path = (root / name).resolve()
    return path if path.is_relative_to(root.resolve()) and path.is_dir() else None


def _method(path: Path, config: dict) -> str | None:
    """The method as the summary names it (Config.method), for a run without a summary yet; the
    config's peft.method when it no longer validates (written by another tunelab version)."""
    from tunelab.config import load_config

    try:
        return load_config(str(path / "config.yaml")).method
    except TunelabError:
        return (config.get("peft") or {}).get("method")


def last_value(records: list[dict], key: str) -> Any:
    return next((r[key] for r in reversed(records) if isinstance(r.get(key), (int, float))), None)


def run_row(root: Path, path: Path) -> dict:
    """One line of the runs list: name, state, model, method, step, key metrics, tokens/s."""
    summary, config, status = current_names(read_json_object(path / "summary.json")), read_config(path), read_status(path)
    after = scores((summary.get("eval") or {}).get("after"))
    records = [] if summary else current_names(read_jsonl(path / "metrics.jsonl"))
    train = summary.get("train") or {}
    metrics = dict(list(after.items())[:4]) if after else {
        k: v for k in ("loss", "eval_loss") if (v := last_value(records, k)) is not None}
    return {
        "name": path.relative_to(root).as_posix(),
        "state": status["state"],
        "updated": status.get("updated"),
        "model": summary.get("model") or (config.get("model") or {}).get("name"),
        "method": summary.get("method") or _method(path, config),
        "step": train.get("steps") or status.get("step") or last_value(records, "step"),
        "metrics": metrics,
        "tokens_per_s": train.get("tokens_per_s") or status.get("tokens_per_s"),
    }


def run_page(root: Path, path: Path) -> dict:
    """Everything the run page shows except the curves (board.js fetches those)."""
    summary = current_names(read_json_object(path / "summary.json"))  # old folders: rouge1 → rouge_1
    samples = read_jsonl(path / "samples.jsonl")
    ev = add_run_intervals(copy.deepcopy(summary), samples)["eval"] if summary else {}
    checkpoints = sorted((p for p in (path / "checkpoints").glob("checkpoint-*") if p.is_dir()),
                         key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1)
    evals = sorted(p for p in (path / "eval").glob("*") if (p / "results.json").is_file())
    config = path / "config.yaml"
    return {
        **run_row(root, path),
        "status": read_status(path),
        "summary": summary,
        "before_after": before_after_rows(ev) if ev.get("before") or ev.get("after") else [],
        "samples": samples,
        "checkpoints": [p.name for p in checkpoints],
        "best_checkpoint": (summary.get("train") or {}).get("best_checkpoint"),
        "report": (path / "report.html").is_file(),
        "evals": [p.relative_to(root).as_posix() for p in evals],
        "config": config.read_text(encoding="utf-8") if config.is_file() else "",
        "warnings": summary.get("warnings") or [],
    }
