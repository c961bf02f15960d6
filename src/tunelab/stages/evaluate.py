"""`tunelab eval`: score a model on tasks next to a baseline; write results, predictions, a chart and a report.

where the outputs go → which tasks, on which rows (checked before any model loads) → the
target model → the baseline, the same way → results.json, predictions.jsonl, comparison.png,
report.html.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

from tunelab.config import EvalRunConfig
from tunelab.errors import TunelabError
from tunelab.evals.intervals import add_eval_intervals
from tunelab.evals.tasks import GENERATION_METRICS, DatasetTask, Rows
from tunelab.lifecycle import RunResult

log = logging.getLogger(__name__)

ROW_TASKS = ("perplexity", *GENERATION_METRICS)
"""Built-in tasks that need evaluation rows: the run's own, or --dataset."""


def run(cfg: EvalRunConfig) -> RunResult:
    """Evaluate cfg.target (and the baseline) on cfg.tasks; the summary is the results.json content.

    Rows for perplexity and generation tasks come from cfg.dataset/format/fields/split, else the
    run folder's test split, else its validation rows; cfg.limit takes the first N per task.
    cfg.export_manual also writes the first N prompts of the first generation task, with the
    target's and the baseline's outputs, to manual.jsonl (`tunelab review add-task --import`).
    """
    start = time.time()
    check_target(cfg.target)
    run_dir = run_folder(cfg.target)
    out = output_dir(cfg.output, run_dir)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    planned = plan(cfg.tasks, run_dir, dataset=cfg.dataset, data_format=cfg.format, fields=cfg.fields,
                   split=cfg.split, limit=cfg.limit)
    data = data_origins(planned, data_dir)
    manual_task = manual_source(planned) if cfg.export_manual else None
    baseline = {"auto": base_model(run_dir), "none": None}.get(cfg.baseline.lower(), cfg.baseline)

    evaluate_one = functools.partial(evaluate_model, planned=planned, limit=cfg.limit, data_dir=data_dir,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    metrics, predictions = evaluate_one(cfg.target, "target")
    results = {"target": cfg.target, "tasks": metrics, "baseline": None, "data": data}
    if baseline is not None:
        metrics, more = evaluate_one(baseline, "baseline")
        results["baseline"] = {"model": baseline, "tasks": metrics}
        predictions += more
    add_eval_intervals(results, predictions)  # 95% intervals per metric, paired target − baseline tests
    results["runtime_s"] = time.time() - start
    results["output"] = str(out)
    write_outputs(out, results, predictions, run_dir)
    if manual_task is not None:
        results["manual"] = str(write_manual(out / "manual.jsonl", manual_task, predictions, cfg.export_manual,
                                             {"target": cfg.target, "baseline": baseline}))
    return RunResult(out, results)


def format_results(results: dict) -> str:
    """Terminal table: task | metric | target | baseline | delta (target - baseline)."""
    from tunelab.tracking.stat_tables import format_eval

    return format_eval(results)


def check_target(target: str) -> None:
    """A target that can only be a local path must exist (else the rows check would ask for
    --dataset, as if the folder were there but no run folder)."""
    from tunelab.models.loading import looks_like_path

    path = Path(target).expanduser()
    if looks_like_path(target) and not path.exists():
        raise TunelabError(f"target: no such folder {target} ({path.absolute()} does not exist)")


def run_folder(target: str) -> Path | None:
    """`target` as a tunelab run folder (config.yaml plus adapter/ or model/), else None."""
    path = Path(target)
    trained = (path / "adapter" / "adapter_config.json").is_file() or (path / "model" / "config.json").is_file()
    return path if trained and (path / "config.yaml").is_file() else None


def output_dir(output: str | None, run_dir: Path | None) -> Path:
    """--output, else `<run>/eval/<timestamp>/` for a run folder, else `evals/<timestamp>/`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(output) if output else (run_dir / "eval" if run_dir else Path("evals")) / stamp


def base_model(run_dir: Path | None) -> str | None:
    """The model a run started from (its config's model.name): the default baseline."""
    if run_dir is None:
        return None
    from tunelab.config import load_config

    return load_config(str(run_dir / "config.yaml")).model.name


def plan(names: list[str], run_dir: Path | None, *, dataset: str | None, data_format: str | None,
         fields: dict[str, str] | None, split: str, limit: int | None) -> list[DatasetTask | str]:
    """The tasks in the order asked, with their rows loaded and checked: DatasetTasks, and
    harness task names (run together in one lm-eval pass)."""
    from tunelab.evals.tasks import check_names, custom_task, is_task_file

    check_names(names)
    rows = None
    if any(name in ROW_TASKS for name in names):
        rows = default_rows(run_dir, dataset=dataset, data_format=data_format, fields=fields, split=split, limit=limit)
    planned: list[DatasetTask | str] = []
    for name in dict.fromkeys(names):
        if is_task_file(name):
            planned.append(custom_task(Path(name), limit))
        elif name in ROW_TASKS:
            planned.append(DatasetTask(name, (name,), rows))
        else:
            planned.append(name)
    keys = [task_key(task) for task in planned]
    if len(set(keys)) < len(keys):
        raise TunelabError(f"--tasks: two tasks share a name ({', '.join(keys)}); rename the task file's `name`")
    return planned


def default_rows(run_dir: Path | None, *, dataset: str | None, data_format: str | None,
                 fields: dict[str, str] | None, split: str, limit: int | None) -> Rows:
    """--dataset/--format rows when given, else the run folder's held-out rows."""
    from tunelab.evals.tasks import load_rows, run_rows

    if dataset is not None:
        return load_rows(dataset, data_format, fields, split, limit)
    if run_dir is None:
        raise TunelabError(
            f"tasks {', '.join(ROW_TASKS)} need evaluation rows: the target is not a run folder, "
            "so pass --dataset SOURCE --format NAME (e.g. --dataset ../shared/data/samsum --format samsum)"
        )
    return run_rows(run_dir, limit)


def task_key(task: DatasetTask | str) -> str:
    return task if isinstance(task, str) else task.name


def data_origins(planned: list[DatasetTask | str], data_dir: Path | None) -> dict[str, str]:
    """Where each task's rows come from, for results.json and the report (local harness files are
    checked here, before any model loads)."""
    from tunelab.evals.harness import local_file

    def origin(task: DatasetTask | str) -> str:
        if not isinstance(task, str):
            return task.rows.origin
        return str(local_file(task, data_dir)) if data_dir else "lm-eval built-in task (Hugging Face Hub)"

    return {task_key(task): origin(task) for task in planned}


def evaluate_model(name: str, label: str, *, planned: list[DatasetTask | str], limit: int | None,
                   data_dir: Path | None, max_new_tokens: int, batch_size: int) -> tuple[dict, list[dict]]:
    """({task: metrics} in the planned order, prediction rows tagged with `label`) for one model."""
    from tunelab.evals import harness
    from tunelab.evals.tasks import Generations
    from tunelab.models.build import load_for_eval

    log.info("evaluating the %s model %s", label, name)
    model, tokenizer = load_for_eval(name)
    generations = Generations(model, tokenizer, batch_size, max_new_tokens, label)
    metrics, predictions = {}, []
    for task in planned:
        if isinstance(task, DatasetTask):
            metrics[task.name], rows = task.run(model, tokenizer, generations, batch_size)
            predictions += rows
    names = [task for task in planned if isinstance(task, str)]
    if names:
        found, rows = harness.evaluate(model, tokenizer, names, limit=limit, batch_size=batch_size, data_dir=data_dir)
        metrics.update(found)
        predictions += rows
    ordered = {task_key(task): metrics[task_key(task)] for task in planned}
    return ordered, [{"task": row["task"], "model": label, **row} for row in predictions]


def manual_source(planned: list[DatasetTask | str]) -> DatasetTask:
    """The task whose prompts --export-manual sets aside: the first one that generates."""
    for task in planned:
        if isinstance(task, DatasetTask) and any(m != "perplexity" for m in task.metrics):
            return task
    raise TunelabError("--export-manual: needs a generation task in --tasks (rouge, exact_match, bleu, "
                       "or a task YAML with generation metrics) to take prompts and outputs from")


def write_manual(path: Path, task: DatasetTask, predictions: list[dict], n: int, models: dict[str, str | None]) -> Path:
    """Held-out prompts with every evaluated model's output, one JSON row each:
    {id, messages (the prompt turns), reference, outputs: [{model, text}]} — the review app's import format."""
    from tunelab.tracking.metrics import atomic_write_text

    outputs = {label: [row["prediction"] for row in predictions if row["task"] == task.name and row["model"] == label]
               for label, name in models.items() if name is not None}
    rows = []
    for i, messages in enumerate(task.rows.examples[:n]):
        rows.append({
            "id": f"{task.name}-{i}",
            "messages": messages[:-1],
            "reference": messages[-1]["content"],
            "outputs": [{"model": models[label], "text": texts[i]} for label, texts in outputs.items()],
        })
    if len(rows) < n:
        log.warning("--export-manual %d: the task has only %d rows; exported all of them", n, len(rows))
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    log.info("%d prompts for human review written to %s", len(rows), path)
    return path


def write_outputs(out: Path, results: dict, predictions: list[dict], run_dir: Path | None) -> None:
    """results.json, predictions.jsonl, the comparison chart, the training curves of a run folder
    (curves/), and report.html showing them."""
    from tunelab.evals.metrics import current_names
    from tunelab.tracking.metrics import atomic_write_text, read_jsonl, write_json
    from tunelab.tracking.plots import plot_comparison, plot_metrics
    from tunelab.tracking.report import write_eval_report

    write_json(out / "results.json", results)
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
    atomic_write_text(out / "predictions.jsonl", "".join(lines))
    chart = plot_comparison(results, out / "comparison.png")
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        plot_metrics(current_names(read_jsonl(run_dir / "metrics.jsonl")), out / "curves")  # old: eval_rouge1
    write_eval_report(out, results, predictions, chart)
    log.info("evaluation written to %s", out)
