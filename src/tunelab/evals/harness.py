"""lm-evaluation-harness tasks (HellaSwag, TruthfulQA MC1/MC2) on an in-memory model.

lm-eval's built-in tasks download their data from the Hugging Face Hub. With a data folder
(`../shared/data` layout) tunelab runs its own copies of those task definitions instead
(`harness_tasks/*.yaml`, same prompts, choices and metrics), pointed at the local files: each
run writes a small YAML per task that includes the packaged one and adds the file path.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import yaml

from tunelab.errors import TunelabError

LOCAL_FILES = {
    "hellaswag": "hellaswag/validation.jsonl",
    "truthfulqa_mc1": "truthfulqa/mc_task.jsonl",
    "truthfulqa_mc2": "truthfulqa/mc_task.jsonl",
}
"""Harness task → its rows, relative to --data-dir."""
HARNESS_TASKS = tuple(LOCAL_FILES)
_SENTENCE_END = re.compile(r"[.!?][\"']?\s+")


def split_context(ctx: str) -> tuple[str, str]:
    """HellaSwag's (ctx_a, ctx_b) from a context stored whole.

    lm-eval builds its prompt as `ctx_a + " " + ctx_b.capitalize()`: ctx_b is the unfinished
    sentence the endings complete (ActivityNet rows); WikiHow rows end on a full sentence and
    have an empty ctx_b. In the local rows every ActivityNet context ends without . ! ? and
    every WikiHow context ends with one, so the last unfinished sentence is ctx_b.
    """
    if ctx.rstrip().endswith((".", "!", "?")):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    cut = ends[-1].end() if ends else 0
    return ctx[:cut].rstrip(), ctx[cut:]


def _with_ctx_parts(row: dict) -> dict:
    ctx_a, ctx_b = split_context(row["ctx"])
    return {"ctx_a": ctx_a, "ctx_b": ctx_b}


def hellaswag_docs(dataset):
    """lm-eval's own hellaswag `process_docs`, after rebuilding the ctx_a/ctx_b it reads."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset.map(_with_ctx_parts))


def local_file(name: str, data_dir: Path) -> Path:
    """The rows of harness task `name` under --data-dir (which must hold them)."""
    path = (data_dir / LOCAL_FILES[name]).resolve()
    if not path.is_file():
        raise TunelabError(f"--data-dir {data_dir}: task {name} needs {LOCAL_FILES[name]}, which is missing")
    return path


def write_local_tasks(names: list[str], data_dir: Path, folder: Path) -> None:
    """One YAML per task in `folder`: the packaged definition plus the local data file."""
    packaged = Path(__file__).parent / "harness_tasks"
    for name in names:
        config = {
            "include": str(packaged / f"{name}.yaml"),
            "dataset_kwargs": {"data_files": {"validation": str(local_file(name, data_dir))}},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))


def evaluate(model, tokenizer, names: list[str], *, limit: int | None, batch_size: int,
             data_dir: Path | None) -> tuple[dict[str, dict], list[dict]]:
    """Run harness tasks on `model`: ({task: {metric: value, metric_stderr: …, "n": rows}}, prediction rows)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # Passing a model object is what this module is for; lm-eval warns about it on every call.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="tunelab-harness-") as folder:
        if data_dir is not None:
            write_local_tasks(names, data_dir, Path(folder))
            manager = TaskManager(include_path=folder, include_defaults=False)
        else:
            manager = TaskManager()
        try:
            out = simple_evaluate(model=lm, tasks=list(names), limit=limit, task_manager=manager)
        except OSError as err:  # datasets' offline (ConnectionError) and not-found errors
            raise TunelabError(
                f"harness tasks {', '.join(names)}: cannot load their data ({type(err).__name__}: {err}); "
                "without Hub access pass --data-dir with the local files "
                f"({', '.join(sorted(set(LOCAL_FILES[n] for n in names)))})"
            ) from None
    metrics = {name: _metrics(out["results"][name], len(out["samples"][name])) for name in names}
    rows = [row for name in names for row in _prediction_rows(name, out["samples"][name])]
    return metrics, rows


def _metrics(result: dict, n: int) -> dict:
    """lm-eval's `acc,none` / `acc_stderr,none` keys → `acc` / `acc_stderr`, plus the row count."""
    found = {key.split(",")[0]: value for key, value in result.items() if "," in key}
    return {**found, "n": n}


def _prediction_rows(task: str, samples: list[dict]) -> list[dict]:
    """Per question: the prompt, the gold choice, and the choice the model scored highest."""
    rows = []
    for sample in samples:
        choices = [continuation for _context, continuation in sample["arguments"]]
        loglikelihoods = [ll for ll, _greedy in sample["filtered_resps"]]
        best = max(range(len(choices)), key=loglikelihoods.__getitem__)
        rows.append({
            "task": task,
            "prompt": sample["arguments"][0][0],
            "reference": choices[int(sample["target"])].strip(),
            "prediction": choices[best].strip(),
        })
    return rows
