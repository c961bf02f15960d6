"""Preference pairs for `tunelab reward | dpo | rl`: load, validate, split, and drop what cannot fit.

Rows come through the same data formats and checks as SFT data (`sources.load_examples`: every bad
row reported as `file:line: field …`), in trl's conversational shape — `prompt` messages ending
on a user turn, `chosen` and `rejected` one assistant message each — so trl renders them with
the model's own chat template. Pairs longer than `data.max_length` are dropped here and counted,
instead of trl filtering (reward) or truncating (DPO) them without a word.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict

from tunelab.config import Config
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


@dataclass
class PreferenceData:
    train: Dataset  # prompt, chosen, rejected
    eval: Dataset
    stats: dict = field(default_factory=dict)
    test_examples: None = None  # nothing is held out for `tunelab eval` (SFT's PreparedData has it)

    def generation_rows(self) -> list[dict]:
        """Validation pairs as chat examples ending on the chosen answer (the reference to compare with)."""
        return [{"messages": p + c} for p, c in zip(self.eval["prompt"], self.eval["chosen"])]


def pair_lengths(batch: dict[str, list], tokenizer) -> dict[str, list[int]]:
    """Tokens of prompt + chosen and of prompt + rejected, rendered as the trainers render them."""
    render = functools.partial(tokenizer.apply_chat_template, tokenize=True, return_dict=False)
    return {f"{side}_tokens": [len(ids) for ids in render([p + a for p, a in zip(batch["prompt"], batch[side])])]
            for side in ("chosen", "rejected")}


def _fits(chosen_tokens: int, rejected_tokens: int, max_length: int) -> bool:
    return max(chosen_tokens, rejected_tokens) <= max_length


def drop_overlong(rows: Dataset, tokenizer, max_length: int, name: str) -> tuple[Dataset, int]:
    """Pairs whose longer side fits in max_length tokens, and how many were dropped (warned)."""
    measured = rows.map(pair_lengths, batched=True, fn_kwargs={"tokenizer": tokenizer}, desc=f"measuring {name} pairs")
    kept = measured.filter(_fits, input_columns=["chosen_tokens", "rejected_tokens"],
                           fn_kwargs={"max_length": max_length}, desc=f"dropping overlong {name} pairs")
    dropped = len(rows) - len(kept)
    if dropped:
        log.warning("%s: %d of %d preference pairs are longer than data.max_length=%d tokens and were dropped "
                    "(raise data.max_length to keep them)", name, dropped, len(rows), max_length)
    return kept.remove_columns(["chosen_tokens", "rejected_tokens"]), dropped


def _agreeing(rows: Dataset, min_agreement: float | None) -> tuple[Dataset, int]:
    """Without pairs whose reviewer agreement is below min_agreement (pairs without one stay)."""
    if "agreement" not in rows.column_names:
        return rows, 0
    kept = rows
    if min_agreement is not None:
        kept = rows.filter(lambda a: a is None or a >= min_agreement, input_columns="agreement",
                           desc="dropping pairs below preference.min_agreement")
    return kept.remove_columns("agreement"), len(rows) - len(kept)


def load_preferences(cfg: Config, tokenizer) -> PreferenceData:
    """Validated, split, length-checked preference pairs for the data.* and preference.* settings."""
    from tunelab.data.formats import PREFERENCE_COLUMNS, get_format
    from tunelab.data.prepare import split
    from tunelab.data.sources import load_examples

    data = cfg.data
    data_format = get_format(data.format, data.fields)
    if data_format.columns[:3] != PREFERENCE_COLUMNS:
        raise TunelabError(
            f"data.format: '{data.format}' gives chat examples, not preference pairs; use hh_rlhf, orca_dpo, "
            "preferences (a `tunelab review export` file) or custom with data.fields {prompt, chosen, rejected}"
        )
    if data.overlong != "drop":
        raise TunelabError("data.overlong: preference pairs are never truncated (a cut answer would be judged "
                           "unfairly); set data.overlong=drop and raise data.max_length to keep long pairs")
    examples, source_stats = load_examples(data.source, data_format, bad_rows=data.bad_rows, subset=data.subset,
                                           num_proc=data.num_proc)
    if "train" not in examples:  # a single file (hh-rlhf's test.jsonl) is the data to split, not a test set
        examples = DatasetDict({"train": examples[next(iter(examples))]})
    # Filter before splitting, so that data.max_train_samples / max_eval_samples count usable pairs.
    dropped = {"overlong": 0, "below_min_agreement": 0}
    for name in examples:
        examples[name], disagree = _agreeing(examples[name], cfg.preference.min_agreement)
        examples[name], overlong = drop_overlong(examples[name], tokenizer, data.max_length, name)
        dropped["below_min_agreement"] += disagree
        dropped["overlong"] += overlong
    train, validation, test = split(examples, data, cfg.run.seed)
    if len(train) == 0 or len(validation) == 0:
        raise TunelabError(f"data: no {'training' if len(train) == 0 else 'validation'} pairs left after filtering "
                           f"(data.max_length={data.max_length}, preference.min_agreement="
                           f"{cfg.preference.min_agreement})")
    stats = {
        "source": data.source,
        "format": data.format,
        "train_pairs": len(train),
        "eval_pairs": len(validation),
        "test_pairs": len(test) if test is not None else 0,
        "bad_rows": source_stats["bad_rows"],
        **dropped,
        "dropped": source_stats["bad_rows"] + sum(dropped.values()),
        "max_length": data.max_length,
    }
    return PreferenceData(train, validation, stats)
