"""Sources → validated examples → splits → tokens with loss masks → a mixture → packed or padded rows, with stats.

Each source (`data.source`, or each of `data.sources`) is read, split and tokenized alone, so its
rows kept and dropped are counted apart and its validation rows stay apart (a mixture's
validation loss can be read per source); the training samples are then mixed by weight
(`data/mixture.py`). Every step runs on `datasets` (Arrow; each `map` is cached by its
fingerprint, so re-running a recipe, or `tunelab data prepare` ahead of it, reuses the work).
Nothing is dropped silently: overlong samples, samples left with no loss tokens and exact
duplicates are counted in `stats` and warned about.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, concatenate_datasets

from tunelab.config import DataConfig, SourceConfig
from tunelab.data.batching import pack_batch
from tunelab.data.mixture import mix
from tunelab.data.templates import IGNORE_INDEX, tokenize_example, tokenize_within
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

SMALL = 2000  # below this many rows, worker processes cost more than they save
TOKENIZED = ("input_ids", "labels", "length", "loss_tokens", "index")
"""Columns of a tokenized sample; `index` is its row in the source's split of examples."""


@dataclass
class PreparedData:
    train: Dataset  # rows for the Trainer: packs (input_ids, labels, position_ids) or samples (+ length)
    eval: Dataset  # validation rows, batched the same way (a mixture: each source's rows batched apart)
    eval_examples: Dataset  # validation `messages`, for generation metrics (a mixture: the sources in turn)
    test_examples: Dataset | None  # held out for `tunelab eval`; never used in training
    stats: dict = field(default_factory=dict)
    eval_parts: dict[str, Dataset] = field(default_factory=dict)
    """A mixture's validation rows per source name (`eval` is their concatenation, in this order), so
    the trainer can report each source's loss; empty for one source."""


@dataclass
class Part:
    """One source, read, split and tokenized on its own."""

    config: SourceConfig
    train_examples: Dataset
    eval_examples: Dataset
    test_examples: Dataset | None
    train_rows: Dataset  # TOKENIZED columns, after the overlong and no-loss filters
    eval_rows: Dataset
    stats: dict

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class Samples:
    """The tokenized training samples as trained, before batching: what `prepare` batches and
    `tunelab data inspect` shows. `train` holds the mixture, source by source: `bounds[k]` is the
    (start, stop) of `parts[k]`'s drawn samples in it."""

    parts: list[Part]
    train: Dataset
    bounds: list[tuple[int, int]]
    stats: dict


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


def column(rows: Dataset, name: str) -> list:
    """A column as a list (`rows[name]` is a lazy Column in datasets 4+, slow to iterate item by item)."""
    return rows[name][:]


def _tokenize(row: dict, index: int, tokenizer, train_on: str, fit_length: int | None) -> dict:
    """Tokens and loss mask of one example; with fit_length, the prompt is shortened to fit
    (`length` 0 marks a sample that cannot fit even so)."""
    tools = row.get("tools")
    try:
        if fit_length is None:
            out = tokenize_example(tokenizer, row["messages"], train_on, tools)
        else:
            out = tokenize_within(tokenizer, row["messages"], fit_length, train_on, tools)
            out = out or {"input_ids": [], "labels": [], "truncated": 0}
    except ValueError as err:
        raise TunelabError(f"data: cannot render a sample with the chat template: {err}") from None
    out["length"] = len(out["input_ids"])
    out["loss_tokens"] = sum(label != IGNORE_INDEX for label in out["labels"])
    out["index"] = index
    return out


def _usable(length: int, loss_tokens: int, max_length: int) -> bool:
    return 0 < length <= max_length and loss_tokens > 0


def tokenize(examples: Dataset, tokenizer, cfg: DataConfig, name: str) -> tuple[Dataset, dict]:
    """Tokenize with loss masks and apply the overlong policy; returns rows and what was dropped.

    `drop` removes samples longer than max_length; `truncate` shortens their prompt (the
    completion stays whole) and drops only those whose completion alone does not fit.
    """
    procs = (cfg.num_proc or os.cpu_count() or 1) if len(examples) >= SMALL else None
    fit = cfg.max_length if cfg.overlong == "truncate" else None
    rows = examples.map(
        functools.partial(_tokenize, tokenizer=tokenizer, train_on=cfg.train_on, fit_length=fit),
        with_indices=True,
        remove_columns=examples.column_names,
        num_proc=procs,
        desc=f"tokenizing {name}",
    )
    # Under `truncate`, a sample that could not fit comes back empty (length 0): overlong too.
    lengths, loss = column(rows, "length"), column(rows, "loss_tokens")
    overlong = sum(not 0 < n <= cfg.max_length for n in lengths)
    empty = sum(0 < n <= cfg.max_length and not k for n, k in zip(lengths, loss))
    if overlong or empty:
        rows = rows.filter(functools.partial(_usable, max_length=cfg.max_length), input_columns=["length", "loss_tokens"],
                           desc=f"dropping {name} samples that are too long or have no loss tokens")
    if overlong:
        log.warning(
            "%s: %d of %d samples are longer than data.max_length=%d tokens and were dropped (%s)", name, overlong,
            len(examples), cfg.max_length, "their completion alone does not fit; raise data.max_length" if fit else
            "raise data.max_length, or set data.overlong=truncate to shorten their prompts",
        )
    if empty:
        log.warning("%s: %d samples were dropped: nothing to learn from (an empty completion, or no turn that "
                    "data.train_on=%s chooses)", name, empty, cfg.train_on)
    truncated = 0
    if fit:
        truncated = sum(column(rows, "truncated"))
        rows = rows.remove_columns("truncated")
    if truncated:
        log.warning("%s: the prompts of %d samples were shortened to fit data.max_length=%d (data.overlong=truncate)",
                    name, truncated, cfg.max_length)
    return rows, {"overlong": overlong, "truncated": truncated, "no_loss": empty, "dropped": overlong + empty}


def batch_rows(rows: Dataset, cfg: DataConfig, name: str) -> Dataset:
    if cfg.batching == "padding":
        return rows.remove_columns(["loss_tokens", "index"])
    # One batch = the whole split, so best-fit sees every sample (a few seconds for 52k rows).
    return rows.map(
        functools.partial(pack_batch, max_length=cfg.max_length),
        batched=True,
        batch_size=None,
        remove_columns=rows.column_names,
        desc=f"packing {name}",
    )


def _keys(examples: Dataset | None) -> list[bytes]:
    """A digest of each example's conversation (and tools), to find exact duplicates."""
    if examples is None or len(examples) == 0:
        return []
    columns = [c for c in ("messages", "tools") if c in examples.column_names]
    keys = []
    for batch in examples.select_columns(columns).iter(batch_size=1024):
        for values in zip(*batch.values()):
            keys.append(hashlib.blake2b(json.dumps(values, sort_keys=True).encode(), digest_size=16).digest())
    return keys


def duplicates(train: list[Dataset], validation: list[Dataset], test: list[Dataset | None]) -> dict:
    """Exact duplicates (same conversation) within each split and across them, all sources together;
    warned about, kept (whether to train on a repeated sample is the data's owner's call)."""
    keys = {name: [k for part in parts for k in _keys(part)] for name, parts in
            (("train", train), ("validation", validation), ("test", test))}
    found = {f"{name}": len(ks) - len(set(ks)) for name, ks in keys.items()}
    seen = {name: set(ks) for name, ks in keys.items()}
    for inner, outer in (("validation", "train"), ("test", "train"), ("test", "validation")):
        found[f"{inner}_in_{outer}"] = sum(k in seen[outer] for k in keys[inner])
    for name, n in found.items():
        split = name.split("_in_")[0]
        if not n:
            continue
        if "_in_" in name:
            log.warning("data: %d of %d %s samples also appear in %s%s", n, len(keys[split]), split, name.split("_in_")[1],
                        " (every one: are the two files the same?); its loss will not show overfitting"
                        if n == len(keys[split]) else "")
        else:
            log.warning("data: %d of %d %s samples are exact duplicates of others in %s", n, len(keys[split]), split, split)
    return found


def read_part(source: SourceConfig, cfg: DataConfig, tokenizer, seed: int) -> Part:
    """One source: validated examples, split (its own validation/test or seeded holdouts), tokenized."""
    from tunelab.data.formats import get_format
    from tunelab.data.sources import load_examples

    data_format = get_format(source.format, source.fields)
    if data_format.columns[0] != "messages":
        raise TunelabError(f"data.format: '{source.format}' gives preference pairs, not chat examples; it is for "
                           "tunelab reward, dpo, kto and rl (for SFT use samsum, alpaca, sharegpt, messages, custom, ...)")
    examples, source_stats = load_examples(source.source, data_format, bad_rows=cfg.bad_rows, subset=source.subset,
                                           splits=source.splits, num_proc=cfg.num_proc)
    train_ex, eval_ex, test_ex = split(examples, cfg.model_copy(update={"max_train_samples": source.max_samples}), seed)
    alone = not cfg.sources
    train_rows, train_drop = tokenize(train_ex, tokenizer, cfg, "train" if alone else f"train ({source.name})")
    eval_rows, eval_drop = tokenize(eval_ex, tokenizer, cfg, "validation" if alone else f"validation ({source.name})")
    stats = {
        "source": source.source,
        "format": source.format,
        "train_samples": len(train_rows),
        "eval_samples": len(eval_rows),
        "test_samples": len(test_ex) if test_ex is not None else 0,
        "bad_rows": source_stats["bad_rows"],
        **{key: train_drop[key] + eval_drop[key] for key in ("overlong", "truncated", "no_loss")},
        "dropped": source_stats["bad_rows"] + train_drop["dropped"] + eval_drop["dropped"],
    }
    return Part(source, train_ex, eval_ex, test_ex, train_rows, eval_rows, stats)


def tokenized(cfg: DataConfig, tokenizer, seed: int) -> Samples:
    """Every source read and tokenized, the training samples mixed by weight, and the stats."""
    parts = [read_part(source, cfg, tokenizer, seed) for source in cfg.mixture]
    lengths = [column(part.train_rows, "length") for part in parts]
    drawn = mix(lengths, [part.config.weight for part in parts], cfg.mix, seed)
    chosen = [part.train_rows if picks == list(range(len(part.train_rows))) else part.train_rows.select(picks)
              for part, picks in zip(parts, drawn)]
    train = chosen[0] if len(chosen) == 1 else concatenate_datasets(chosen)
    stops = list(itertools.accumulate(len(c) for c in chosen))
    bounds = list(zip([0, *stops[:-1]], stops))
    found = duplicates([p.train_examples for p in parts], [p.eval_examples for p in parts],
                       [p.test_examples for p in parts])
    tokens = [sum(ls[i] for i in picks) for ls, picks in zip(lengths, drawn)]
    loss = [sum(ls[i] for i in picks) for ls, picks in zip((column(p.train_rows, "loss_tokens") for p in parts), drawn)]
    return Samples(parts, train, bounds, _stats(cfg, parts, drawn, tokens, loss, found))


def _stats(cfg: DataConfig, parts: list[Part], drawn: list[list[int]], tokens: list[int], loss: list[int],
           found: dict) -> dict:
    """The data section of summary.json: totals, and for a mixture each source's rows and its shares
    of the training tokens (`tokens`) and of the loss tokens (`loss`)."""
    totals = {key: sum(p.stats[key] for p in parts) for key in
              ("eval_samples", "test_samples", "dropped", "bad_rows", "overlong", "truncated", "no_loss")}
    stats = {
        "source": cfg.source if not cfg.sources else " + ".join(p.name for p in parts),
        "format": cfg.format if not cfg.sources else " + ".join(p.config.format for p in parts),
        "train_on": cfg.train_on,
        "batching": cfg.batching,
        "train_samples": sum(len(picks) for picks in drawn),
        **totals,
        "train_tokens": sum(tokens),
        "train_loss_tokens": sum(loss),
        "max_length": cfg.max_length,
        "duplicates": found,
    }
    if cfg.sources:
        weights = sum(p.config.weight for p in parts)
        stats["mix"] = cfg.mix
        stats["sources"] = {part.name: {
            **part.stats,
            "weight": part.config.weight,
            "target_share": part.config.weight / weights,
            "available_train_samples": part.stats["train_samples"],
            "train_samples": len(picks),
            "repeated": len(picks) - len(set(picks)),
            "train_tokens": t,
            "token_share": t / sum(tokens) if sum(tokens) else None,
            "loss_token_share": lt / sum(loss) if sum(loss) else None,
        } for part, picks, t, lt in zip(parts, drawn, tokens, loss)}
    return stats


def _interleaved(datasets: list[Dataset]) -> Dataset:
    """The sources' examples in turn (one of each, then the next of each, ...), `messages` only, so
    the first N validation rows that generation scores cover every source."""
    columns = [ds["messages"] for ds in datasets]
    rows = [c[i] for i in range(max(map(len, columns))) for c in columns if i < len(c)]
    return Dataset.from_dict({"messages": rows})


def prepare(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    samples = tokenized(cfg, tokenizer, seed)
    parts = samples.parts
    if len(samples.train) == 0:
        raise TunelabError(f"data: no training samples left after filtering (max_length={cfg.max_length}, "
                           f"train_on={cfg.train_on}); `tunelab data inspect` shows why")
    for part in parts:
        if len(part.eval_rows) == 0:
            raise TunelabError(f"data: no validation samples of {part.config.source} left after filtering "
                               f"(max_length={cfg.max_length}, train_on={cfg.train_on})")
    from tunelab.data.inspect import pad_check

    if not (found := pad_check(samples.train, tokenizer)).ok:  # the pad token is reused, so its text must be absent
        raise TunelabError(f"data: the pad token {found.detail}")
    train = batch_rows(samples.train, cfg, "train")
    stats = samples.stats
    stats["train_rows"] = len(train)
    stats["packing_efficiency"] = (stats["train_tokens"] / (len(train) * cfg.max_length)
                                   if cfg.batching == "packing" else None)
    if len(parts) == 1:
        part = parts[0]
        return PreparedData(train, batch_rows(part.eval_rows, cfg, "validation"), part.eval_examples,
                            part.test_examples, stats)
    eval_parts = {p.name: batch_rows(p.eval_rows, cfg, f"validation ({p.name})") for p in parts}
    tests = [p.test_examples for p in parts if p.test_examples is not None]
    return PreparedData(train, concatenate_datasets(list(eval_parts.values())),
                        _interleaved([p.eval_examples for p in parts]), _interleaved(tests) if tests else None,
                        stats, eval_parts)


def validation_examples(cfg: DataConfig, seed: int) -> Dataset:
    """The validation examples a run of `cfg` was evaluated on (same sources, splits and seed),
    without tokenizing: what `tunelab eval RUN` scores when the run kept no test split."""
    from tunelab.data.formats import get_format
    from tunelab.data.sources import load_examples

    parts = []
    for source in cfg.mixture:
        examples, _stats = load_examples(source.source, get_format(source.format, source.fields), bad_rows=cfg.bad_rows,
                                         subset=source.subset, splits=source.splits)
        parts.append(split(examples, cfg.model_copy(update={"max_train_samples": source.max_samples}), seed)[1])
    return parts[0] if len(parts) == 1 else _interleaved(parts)
