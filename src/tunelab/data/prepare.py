"""Source → validated examples → splits → tokens with loss masks → packed or padded rows, with stats.

Every step runs on `datasets` (Arrow; each `map` is cached by its fingerprint, so re-running a
recipe reuses the work). Nothing is dropped silently: overlong samples and samples left with no
loss tokens are counted in `stats` and warned about.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict

from tunelab.config import DataConfig
from tunelab.data.batching import pack_batch
from tunelab.data.templates import IGNORE_INDEX, tokenize_example, tokenize_within
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

SMALL = 2000  # below this many rows, worker processes cost more than they save


@dataclass
class PreparedData:
    train: Dataset  # rows for the Trainer: packs (input_ids, labels, position_ids) or samples (+ length)
    eval: Dataset  # validation rows, batched the same way
    eval_examples: Dataset  # validation `messages`, for generation metrics
    test_examples: Dataset | None  # held out for `tunelab eval`; never used in training
    stats: dict = field(default_factory=dict)


def split(examples: DatasetDict, cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, Dataset | None]:
    """Use the source's validation/test splits; carve seeded holdouts from train where missing.

    Under k-fold (data.folds/fold) the validation set is always a fold of train, so that the
    k runs together validate on every training row exactly once; the test set stays out of it.
    """
    train = examples["train"] if "train" in examples else examples[next(iter(examples))]
    test = examples.get("test")
    if test is None and cfg.test_fraction:
        parts = train.train_test_split(test_size=cfg.test_fraction, seed=seed)
        train, test = parts["train"], parts["test"]
    validation = examples.get("validation")
    if cfg.folds is not None:
        train, validation = fold_split(train, cfg.folds, cfg.fold, seed)
    elif validation is None:
        parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
        train, validation = parts["train"], parts["test"]
    if cfg.max_train_samples and len(train) > cfg.max_train_samples:
        train = train.shuffle(seed=seed).select(range(cfg.max_train_samples))
    if cfg.max_eval_samples and len(validation) > cfg.max_eval_samples:
        validation = validation.shuffle(seed=seed).select(range(cfg.max_eval_samples))
    return train, validation, test


def fold_split(rows: Dataset, folds: int, fold: int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): part `fold` of the seeded shuffle cut into `folds` contiguous parts
    (sizes differ by at most one) is the validation set, the other parts are the training set."""
    if len(rows) < folds:
        raise TunelabError(f"data.folds={folds}: the training split has only {len(rows)} rows")
    shuffled = rows.shuffle(seed=seed)
    start, stop = fold * len(rows) // folds, (fold + 1) * len(rows) // folds
    rest = [*range(start), *range(stop, len(rows))]
    return shuffled.select(rest), shuffled.select(range(start, stop))


def _tokenize(row: dict, tokenizer, completion_only: bool, fit_length: int | None) -> dict:
    """Tokens and loss mask of one example; with fit_length, the prompt is shortened to fit
    (`length` 0 marks a sample that cannot fit even so)."""
    try:
        if fit_length is None:
            out = tokenize_example(tokenizer, row["messages"], completion_only)
        else:
            out = tokenize_within(tokenizer, row["messages"], fit_length, completion_only)
            out = out or {"input_ids": [], "labels": [], "truncated": 0}
    except ValueError as err:
        raise TunelabError(f"data: cannot render a sample with the model's chat template: {err}") from None
    out["length"] = len(out["input_ids"])
    out["loss_tokens"] = sum(label != IGNORE_INDEX for label in out["labels"])
    return out


def tokenize(examples: Dataset, tokenizer, cfg: DataConfig, name: str) -> tuple[Dataset, dict]:
    """Tokenize with loss masks and apply the overlong policy; returns rows and what was dropped.

    `drop` removes samples longer than max_length; `truncate` shortens their prompt (the
    completion stays whole) and drops only those whose completion alone does not fit.
    """
    procs = (cfg.num_proc or os.cpu_count() or 1) if len(examples) >= SMALL else None
    fit = cfg.max_length if cfg.overlong == "truncate" else None
    rows = examples.map(
        functools.partial(_tokenize, tokenizer=tokenizer, completion_only=cfg.completion_only_loss, fit_length=fit),
        remove_columns=examples.column_names,
        num_proc=procs,
        desc=f"tokenizing {name}",
    )
    # Under `truncate`, a sample that could not fit comes back empty (length 0, no loss tokens).
    overlong = sum(n > cfg.max_length for n in rows["length"])
    if overlong:
        rows = rows.filter(
            functools.partial(operator.ge, cfg.max_length), input_columns="length", desc=f"dropping overlong {name}"
        )
        log.warning(
            "%s: %d of %d samples are longer than data.max_length=%d tokens and were dropped "
            "(raise data.max_length, or set data.overlong=truncate to shorten their prompts)",
            name, overlong, len(examples), cfg.max_length,
        )
    empty = sum(n == 0 for n in rows["loss_tokens"])
    if empty:
        rows = rows.filter(bool, input_columns="loss_tokens", desc=f"dropping {name} rows without loss")
        log.warning(
            "%s: %d samples were dropped: nothing to learn from (an empty completion, or one that alone "
            "exceeds data.max_length=%d)", name, empty, cfg.max_length,
        )
    truncated = 0
    if fit:
        truncated = sum(rows["truncated"])
        rows = rows.remove_columns("truncated")
    if truncated:
        log.warning("%s: the prompts of %d samples were shortened to fit data.max_length=%d (data.overlong=truncate)",
                    name, truncated, cfg.max_length)
    return rows, {"overlong": overlong, "truncated": truncated, "dropped": overlong + empty}


def batch_rows(rows: Dataset, cfg: DataConfig, name: str) -> Dataset:
    if cfg.batching == "padding":
        return rows.remove_columns(["loss_tokens"])
    # One batch = the whole split, so best-fit sees every sample (a few seconds for 52k rows).
    return rows.map(
        functools.partial(pack_batch, max_length=cfg.max_length),
        batched=True,
        batch_size=None,
        remove_columns=rows.column_names,
        desc=f"packing {name}",
    )


def prepare(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    from tunelab.data.formats import get_format
    from tunelab.data.sources import load_examples

    examples, source_stats = load_examples(cfg.source, get_format(cfg.format, cfg.fields), bad_rows=cfg.bad_rows, subset=cfg.subset,
                                           num_proc=cfg.num_proc)
    train_ex, eval_ex, test_ex = split(examples, cfg, seed)
    train_rows, train_drop = tokenize(train_ex, tokenizer, cfg, "train")
    eval_rows, eval_drop = tokenize(eval_ex, tokenizer, cfg, "validation")
    if len(train_rows) == 0:
        raise TunelabError(f"data: no training samples left after filtering (max_length={cfg.max_length})")
    if len(eval_rows) == 0:
        raise TunelabError(f"data: no validation samples left after filtering (max_length={cfg.max_length})")
    train = batch_rows(train_rows, cfg, "train")
    train_tokens = int(sum(train_rows["length"]))
    stats = {
        "source": cfg.source,
        "format": cfg.format,
        "batching": cfg.batching,
        "train_samples": len(train_rows),
        "eval_samples": len(eval_rows),
        "test_samples": len(test_ex) if test_ex is not None else 0,
        "dropped": source_stats["bad_rows"] + train_drop["dropped"] + eval_drop["dropped"],
        "bad_rows": source_stats["bad_rows"],
        "overlong": train_drop["overlong"] + eval_drop["overlong"],
        "truncated": train_drop["truncated"] + eval_drop["truncated"],
        "train_tokens": train_tokens,
        "train_loss_tokens": int(sum(train_rows["loss_tokens"])),
        "train_rows": len(train),
        "max_length": cfg.max_length,
        "packing_efficiency": train_tokens / (len(train) * cfg.max_length) if cfg.batching == "packing" else None,
    }
    return PreparedData(train, batch_rows(eval_rows, cfg, "validation"), eval_ex, test_ex, stats)
