"""The tasks `tunelab eval` runs, by name.

- `perplexity`: token-weighted, on chat examples (completion tokens only by default);
- `rouge`, `exact_match`, `bleu`: greedy generations for the examples' prompts, scored against
  their last (assistant) turn;
- `hellaswag`, `truthfulqa_mc1`, `truthfulqa_mc2`: lm-evaluation-harness (`evals/harness.py`);
- a path to a task YAML: the user's own dataset, data format and metrics (`TaskSpec`).

Dataset tasks share their examples (`Rows`), and generations are made once per model and row
set (`Generations`), so asking for rouge, exact_match and bleu generates once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.config import read_yaml, renamed_format
from tunelab.errors import TunelabError, did_you_mean
from tunelab.evals.harness import HARNESS_TASKS

GENERATION_METRICS = ("rouge", "exact_match", "bleu")
TASKS = ("perplexity", *GENERATION_METRICS, *HARNESS_TASKS)
"""Task names `--tasks` accepts (besides task YAML files)."""
Metric = Literal["perplexity", "rouge", "rouge_l", "exact_match", "field_accuracy", "bleu"]


@dataclass(frozen=True, eq=False)  # hashed by identity: the generation cache key
class Rows:
    """Chat examples to evaluate on (each ends on its reference answer) and where they came from."""

    examples: list[list[dict]]
    origin: str
    completion_only: bool = True


@dataclass(frozen=True)
class DatasetTask:
    """Perplexity and/or generation metrics on one set of examples."""

    name: str
    metrics: tuple[str, ...]
    rows: Rows
    max_new_tokens: int | None = None  # None: the command's --max-new-tokens

    def run(self, model, tokenizer, generations: Generations, batch_size: int) -> tuple[dict, list[dict]]:
        """({metric: value, "n": rows}, prediction rows)."""
        result, predictions = {}, []
        if "perplexity" in self.metrics:
            result.update(perplexity(model, tokenizer, self.rows, batch_size))
        scored = [m for m in self.metrics if m != "perplexity"]
        if scored:
            prompts, outputs = generations(self.rows, self.max_new_tokens)
            references = [messages[-1]["content"] for messages in self.rows.examples]
            result.update(score_generations(outputs, references, scored))
            predictions = [
                {"task": self.name, "prompt": p, "reference": r, "prediction": y}
                for p, r, y in zip(prompts, references, outputs)
            ]
        return {**result, "n": len(self.rows.examples)}, predictions


def perplexity(model, tokenizer, rows: Rows, batch_size: int) -> dict:
    """{loss, perplexity, tokens}: the loss summed over every label token, divided once.

    Rows are sorted by length and right-padded (little padding, none of it in the loss); the
    result does not depend on how rows were batched.
    """
    from tunelab.data.batching import Collator
    from tunelab.data.templates import tokenize_example
    from tunelab.evals.loss import loss_sums, summarize

    samples = sorted(
        (tokenize_example(tokenizer, messages, rows.completion_only) for messages in rows.examples),
        key=lambda sample: len(sample["input_ids"]),
    )
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    total, count = loss_sums(model, batches, desc="perplexity")
    return summarize(total.item(), count.item())


class Generations:
    """Greedy completions per (row set, length limit), made once per model and shared by the
    tasks that score them. Prompts are generated shortest first, so a batch pads little."""

    def __init__(self, model, tokenizer, batch_size: int, max_new_tokens: int, label: str):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens, self.label = batch_size, max_new_tokens, label
        self._made: dict[tuple[Rows, int], tuple[list[str], list[str]]] = {}

    def __call__(self, rows: Rows, max_new_tokens: int | None) -> tuple[list[str], list[str]]:
        """(prompts, completions) in the rows' order."""
        from tunelab.data.templates import prompt_text
        from tunelab.evals.generation import generate

        key = (rows, max_new_tokens or self.max_new_tokens)
        if key not in self._made:
            prompts = [prompt_text(self.tokenizer, messages) for messages in rows.examples]
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            made = generate(self.model, self.tokenizer, [prompts[i] for i in order], key[1], self.batch_size,
                            desc=f"generating ({self.label})")
            outputs = [""] * len(prompts)
            for i, text in zip(order, made):
                outputs[i] = text
            self._made[key] = (prompts, outputs)
        return self._made[key]


def score_generations(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Row-averaged metrics (`evals.metrics.score`) plus corpus-level `bleu`."""
    from tunelab.evals.metrics import corpus_bleu, score

    per_row = [name for name in names if name != "bleu"]
    result = score(predictions, references, per_row) if per_row else {}
    if "bleu" in names:
        result["bleu"] = corpus_bleu(predictions, references)
    return result


def load_rows(source: str, data_format: str, fields: dict[str, str] | None, split: str, limit: int | None, *,
              subset: str | None = None, system_prompt: str | None = None) -> Rows:
    """The first `limit` examples of one split of a dataset. A single local file is read whole as the
    split asked for (`--dataset test.jsonl --split test` is labelled test, whatever the loader calls it)."""
    from tunelab.data.formats import get_format
    from tunelab.data.sources import load_examples

    examples, _stats = load_examples(source, get_format(data_format, fields), subset=subset)
    if Path(source).is_file():
        rows = examples[next(iter(examples))]
    elif split in examples:
        rows = examples[split]
    else:
        raise TunelabError(f"{source}: has no '{split}' split; choose one of {', '.join(examples)}")
    rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    messages = list(rows["messages"])
    if system_prompt is not None:
        messages = [[{"role": "system", "content": system_prompt}, *(m for m in turns if m["role"] != "system")]
                    for turns in messages]
    return Rows(messages, f"{source} [{split}] ({data_format} format)")


def run_rows(run_dir: Path, limit: int | None) -> Rows:
    """A run's held-out examples: its test.jsonl if it has one, else the validation rows it was
    evaluated on during training (same source, split and seed)."""
    from tunelab.config import load_config
    from tunelab.data.prepare import validation_examples

    cfg = load_config(str(run_dir / "config.yaml"), [])
    completion_only = cfg.data.completion_only_loss
    test = run_dir / "test.jsonl"
    if test.is_file():
        rows = load_rows(str(test), "custom", {"messages": "messages"}, "test", limit)
        return Rows(rows.examples, f"{test} (the run's test split)", completion_only)
    validation = validation_examples(cfg.data, cfg.run.seed)
    validation = validation.select(range(min(limit, len(validation)))) if limit else validation
    source = cfg.data.source or " + ".join(s.name for s in cfg.data.mixture)
    return Rows(list(validation["messages"]), f"{source} (the run's validation rows)", completion_only)


class TaskSpec(BaseModel):
    """A task YAML file: `tunelab eval TARGET --tasks my-task.yaml`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Shown in results.json and the report."""
    format: str
    """Data format (samsum, cnn_dailymail, openorca, guanaco, alpaca, custom)."""
    source: str
    """Hub dataset id, or a local file/folder (relative paths: from the YAML's folder if it exists there)."""
    fields: dict[str, str] | None = None
    """Column mapping for the custom format."""
    subset: str | None = None
    """Hub dataset config name."""
    split: str = "validation"
    """Which split to evaluate."""
    metrics: list[Metric] = Field(min_length=1)
    """perplexity and/or generation metrics (rouge, rouge_l, exact_match, field_accuracy, bleu)."""
    system_prompt: str | None = None
    """Replaces the examples' system message (prompt style); null keeps the format's."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Generation length limit; null = the command's --max-new-tokens."""

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data):
        return renamed_format(data, "task")


def read_task_file(path: Path) -> TaskSpec:
    """Parse and validate a task YAML; every problem is reported with its field."""
    data = read_yaml(path, "task file")
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as err:
        problems = [
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: "
            + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
            for e in err.errors()
        ]
        keys = ", ".join(TaskSpec.model_fields)
        raise TunelabError(f"task file {path}:\n  - " + "\n  - ".join(problems) + f"\n(allowed keys: {keys})") from None


def is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def check_names(names: list[str]) -> None:
    """Stop on an unknown task name before any model or data loads."""
    for name in names:
        if is_task_file(name):
            if not Path(name).is_file():
                raise TunelabError(f"--tasks: task file {name} does not exist")
        elif name not in TASKS:
            raise TunelabError(f"--tasks: unknown task '{name}'{did_you_mean(name, TASKS)} (tasks: {', '.join(TASKS)}, "
                               "or a task YAML file)")


def custom_task(path: Path, limit: int | None) -> DatasetTask:
    spec = read_task_file(path)
    source = path.parent / spec.source
    rows = load_rows(str(source) if source.exists() else spec.source, spec.format, spec.fields, spec.split, limit,
                     subset=spec.subset, system_prompt=spec.system_prompt)
    return DatasetTask(spec.name, tuple(spec.metrics), rows, spec.max_new_tokens)
