"""k-fold cross-validation: every point of the recipe's `sweep` grid × K folds of the training data,
one ordinary SFT run each, then every metric per fold with mean ± std, and the best grid point.

The k-fold folder is `run.dir`, or `runs/<run.name>-kfold` when unset (so it never collides with a
`tunelab train` of the same recipe). It holds kfold.json, kfold.html and one run folder per fold:
`fold-<i>/` without a sweep, `<point>/fold-<i>/` with one (e.g. `peft.r=8,train.lr=0.0001/fold-0/`).
A fold whose folder already has summary.json is reused, so re-running a killed k-fold trains only
what is missing; a fold killed after a checkpoint continues from it.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from statistics import fmean, stdev

import yaml

from tunelab.config import Config, build_config, set_path
from tunelab.errors import TunelabError
from tunelab.evals.intervals import add_kfold_intervals
from tunelab.evals.metrics import current_names
from tunelab.lifecycle import RunResult, last_checkpoint
from tunelab.stages import sft
from tunelab.tracking.metrics import write_json
from tunelab.tracking.report import write_kfold_report
from tunelab.tracking.tables import lower_is_better

log = logging.getLogger(__name__)

NO_SWEEP = "recipe"  # the name of the only grid point when the recipe has no sweep


def kfold_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / f"{cfg.run.name}-kfold"


def grid(sweep: dict[str, list] | None) -> list[dict]:
    """Every combination of the sweep's values as {dotted key: value}; one empty point without a sweep."""
    sweep = sweep or {}
    return [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]


def point_name(params: dict) -> str:
    """Readable and safe as a folder name, e.g. `peft.r=8,train.lr=0.0001`."""
    text = ",".join(f"{key}={value}" for key, value in params.items())
    return re.sub(r"[^\w.,=+-]+", "", text) or NO_SWEEP


def fold_config(cfg: Config, params: dict, folds: int, fold: int, parent: Path) -> Config:
    """The recipe with this grid point's values and this fold, in its own run folder
    (resuming the checkpoint a killed k-fold left there)."""
    relative = Path(point_name(params) if params else "", f"fold-{fold}")
    folder = parent / relative
    data = cfg.model_dump()
    data["sweep"] = None  # each fold's config.yaml says exactly what it trained
    settings = {
        **params, "data.folds": folds, "data.fold": fold, "run.dir": str(folder),
        "run.name": f"{cfg.run.name}-{relative.as_posix().replace('/', '-')}",
        "train.resume": last_checkpoint(folder) is not None,
    }
    for key, value in settings.items():
        set_path(data, key.split("."), value)
    return build_config(data, f"k-fold grid point {point_name(params)}, fold {fold}")


def produced_metrics(cfg: Config) -> list[str]:
    """The keys of a run's summary["eval"]["after"], known before anything trains."""
    from tunelab.evals.metrics import result_keys

    return ["loss", "perplexity", *(result_keys(cfg.eval.metrics) if cfg.eval.generation_samples else [])]


def check_metric(metric: str, configs: list[Config]) -> None:
    for cfg in configs:
        if metric not in (allowed := produced_metrics(cfg)):
            raise TunelabError(f"--metric: got {metric!r}; the runs produce {', '.join(allowed)}")


def check_folder(cfg: Config) -> None:
    """Refuse to reuse (or continue) a fold folder that holds a run of another config."""
    saved = cfg.run.path / "config.yaml"
    if not saved.exists():
        return
    if _without_resume(yaml.safe_load(saved.read_text())) != _without_resume(cfg.model_dump(mode="json")):
        raise TunelabError(
            f"{cfg.run.path} holds a run of a different config (the recipe changed since); "
            "delete that k-fold folder or choose another run.dir"
        )


def _without_resume(data: dict) -> dict:
    """A resumed fold differs from a fresh one only in train.resume."""
    data["train"].pop("resume", None)
    return data


def fold_summary(cfg: Config) -> dict:
    summary = cfg.run.path / "summary.json"
    if summary.exists():
        log.info("k-fold: reusing the finished run in %s", cfg.run.path)
        return current_names(json.loads(summary.read_text()))  # a fold from before the snake_case names
    log.info("k-fold: training %s", cfg.run.path)
    return sft.run(cfg).summary


def aggregate(per_fold: list[dict]) -> dict[str, dict]:
    """{metric: {folds, mean, std}} for every metric any fold reports; mean and sample std (ddof=1)
    only when every fold has a number (a missing or NaN value makes them null, not a partial mean)."""
    out = {}
    for metric in dict.fromkeys(key for values in per_fold for key in values):
        values = [fold.get(metric) for fold in per_fold]
        complete = all(isinstance(v, (int, float)) for v in values)
        out[metric] = {"folds": values, "mean": fmean(values) if complete else None,
                       "std": stdev(values) if complete else None}
    return out


def best_point(points: list[dict], metric: str) -> dict | None:
    """The grid point with the best mean of `metric` after training (the first of ties)."""
    scored = [p for p in points if p["after"].get(metric, {}).get("mean") is not None]
    if not scored:
        return None
    pick = min if lower_is_better(metric) else max
    best = pick(scored, key=lambda p: p["after"][metric]["mean"])
    return {"name": best["name"], "params": best["params"],
            "mean": best["after"][metric]["mean"], "std": best["after"][metric]["std"]}


def run(cfg: Config) -> RunResult:
    """Train and evaluate every fold (cfg.kfold.folds) of every grid point; write kfold.json and
    kfold.html; the summary is kfold.json's content. Every config, the metric (cfg.kfold.metric)
    and the existing fold folders are checked before anything trains.
    """
    folds, metric = cfg.kfold.folds, cfg.kfold.metric
    parent = kfold_dir(cfg)
    grid_points = grid(cfg.sweep)
    if len({point_name(params) for params in grid_points}) < len(grid_points):
        raise TunelabError("sweep: two grid points get the same folder name; make the values differ in letters/digits")
    plan = [(params, [fold_config(cfg, params, folds, i, parent) for i in range(folds)]) for params in grid_points]
    check_metric(metric, [configs[0] for _, configs in plan])  # folds differ only in their data
    for _, configs in plan:
        for fold_cfg in configs:
            check_folder(fold_cfg)
    points = []
    for params, configs in plan:
        summaries = [fold_summary(fold_cfg) for fold_cfg in configs]
        points.append({
            "name": point_name(params),
            "params": params,
            "runs": [fold_cfg.run.path.relative_to(parent).as_posix() for fold_cfg in configs],
            "before": aggregate([s["eval"]["before"] for s in summaries]),
            "after": aggregate([s["eval"]["after"] for s in summaries]),
        })
    result = {
        "dir": str(parent), "folds": folds, "seed": cfg.run.seed, "metric": metric,
        "lower_is_better": lower_is_better(metric), "sweep": cfg.sweep or {},
        "points": points, "best": best_point(points, metric),
    }
    add_kfold_intervals(result)  # t intervals over folds, paired after − before and point − best
    write_json(parent / "kfold.json", result)
    write_kfold_report(result)
    return RunResult(parent, result)
