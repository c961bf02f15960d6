"""Feedback data for `tunelab reward | dpo | kto | rl`: load, validate, split, and drop what cannot fit.

Rows come through the same data formats and checks as SFT data (`sources.load_examples`: every bad
row reported as `file:line: field …`), in trl's conversational shape — `prompt` messages ending
on a user turn, each answer one assistant message — so trl renders them with the model's own chat
template. Rows longer than `data.max_length` are dropped here and counted, instead of trl filtering
(reward) or truncating (DPO) them without a word. Four shapes:

- pairs (`load_preferences`): prompt, chosen, rejected — reward (pairwise), dpo, and rl's prompts;
- rankings (`load_rankings`): prompt, outputs, rankings, weight — reward with preference.loss=listwise;
- ratings (`load_ratings`): prompt, completion, label — kto; pairs become two ratings each;
- prompts (`load_prompts`): prompt, reference — rl, from pairs (the chosen answer is the
  reference) or from chat examples (the last assistant turn is).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict

from tunelab.config import Config
from tunelab.data import feedback  # noqa: F401 - registers the rankings and ratings formats
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

PAIR_FORMATS = "hh_rlhf, orca_dpo, preferences (`tunelab review export`) or custom with data.fields {prompt, chosen, rejected}"


@dataclass
class PreferenceData:
    train: Dataset  # prompt, chosen, rejected
    eval: Dataset
    stats: dict = field(default_factory=dict)
    test_examples: None = None  # nothing is held out for `tunelab eval` (SFT's PreparedData has it)

    def generation_rows(self) -> list[dict]:
        """Validation pairs as chat examples ending on the chosen answer (the reference to compare with)."""
        return [{"messages": p + c} for p, c in zip(self.eval["prompt"], self.eval["chosen"])]


class RankingData(PreferenceData):
    """prompt, outputs (texts), rankings (one list of ranks per reviewer), weight."""


class RatingData(PreferenceData):
    """prompt, completion ([assistant message]), label (True = desirable)."""

    def generation_rows(self) -> list[dict]:
        """Validation prompts ending on a desirable answer (the reference to compare with)."""
        return [{"messages": p + c} for p, c, good in zip(self.eval["prompt"], self.eval["completion"], self.eval["label"])
                if good]


class PromptData(PreferenceData):
    """prompt, reference (the answer text that reward functions such as exact_match compare with)."""

    def generation_rows(self) -> list[dict]:
        return [{"messages": p + [{"role": "assistant", "content": r}]}
                for p, r in zip(self.eval["prompt"], self.eval["reference"])]


def _render_lengths(tokenizer, chats: list[list[dict]]) -> list[int]:
    render = functools.partial(tokenizer.apply_chat_template, tokenize=True, return_dict=False)
    return [len(ids) for ids in render(chats)]


def pair_lengths(batch: dict[str, list], tokenizer) -> dict[str, list[int]]:
    """Tokens of prompt + chosen and of prompt + rejected, rendered as the trainers render them."""
    return {f"{side}_tokens": _render_lengths(tokenizer, [p + a for p, a in zip(batch["prompt"], batch[side])])
            for side in ("chosen", "rejected")}


def _longest_pair(batch: dict[str, list], tokenizer) -> dict[str, list[int]]:
    lengths = pair_lengths(batch, tokenizer)
    return {"tokens": [max(c, r) for c, r in zip(lengths["chosen_tokens"], lengths["rejected_tokens"])]}


def _longest_output(batch: dict[str, list], tokenizer) -> dict[str, list[int]]:
    """Tokens of prompt + the longest output of each ranked item."""
    chats = [p + [{"role": "assistant", "content": o}] for p, outputs in zip(batch["prompt"], batch["outputs"]) for o in outputs]
    flat, tokens, at = _render_lengths(tokenizer, chats), [], 0
    for outputs in batch["outputs"]:
        tokens.append(max(flat[at : at + len(outputs)]))
        at += len(outputs)
    return {"tokens": tokens}


def _rating_length(batch: dict[str, list], tokenizer) -> dict[str, list[int]]:
    return {"tokens": _render_lengths(tokenizer, [p + c for p, c in zip(batch["prompt"], batch["completion"])])}


def _example_length(batch: dict[str, list], tokenizer) -> dict[str, list[int]]:
    return {"tokens": _render_lengths(tokenizer, batch["messages"])}


def drop_overlong(rows: Dataset, tokenizer, max_length: int, name: str,
                  lengths: Callable[[dict, object], dict] = _longest_pair, noun: str = "preference pairs") -> tuple[Dataset, int]:
    """Rows whose longest rendering (`lengths`: a batched map giving `tokens`) fits in max_length tokens,
    and how many were dropped (warned)."""
    measured = rows.map(lengths, batched=True, fn_kwargs={"tokenizer": tokenizer}, desc=f"measuring {name} {noun}")
    kept = measured.filter(lambda n: n <= max_length, input_columns="tokens", desc=f"dropping overlong {name} {noun}")
    dropped = len(rows) - len(kept)
    if dropped:
        log.warning("%s: %d of %d %s are longer than data.max_length=%d tokens and were dropped "
                    "(raise data.max_length to keep them)", name, dropped, len(rows), noun, max_length)
    return kept.remove_columns("tokens"), dropped


def _agreeing(rows: Dataset, min_agreement: float | None, keep: bool = False) -> tuple[Dataset, int]:
    """Without rows whose reviewer agreement is below min_agreement (rows without one stay); the
    `agreement` column is dropped unless `keep`."""
    if "agreement" not in rows.column_names:
        return rows, 0
    kept = rows
    if min_agreement is not None:
        kept = rows.filter(lambda a: a is None or a >= min_agreement, input_columns="agreement",
                           desc="dropping rows below preference.min_agreement")
    return (kept if keep else kept.remove_columns("agreement")), len(rows) - len(kept)


def _gives(columns: tuple[str, ...]) -> str:
    """What a format's rows are, in words."""
    if _is_pairs(columns):
        return "preference pairs"
    return "rankings" if "rankings" in columns else "ratings" if "label" in columns else "chat examples"


def _examples(cfg: Config, wanted: Callable[[tuple[str, ...]], bool], noun: str, fix: str) -> tuple[DatasetDict, dict]:
    """The validated rows of data.source, all in `train` when the source has no splits, and the source's
    stats; `wanted(format columns)` says whether the command can use the format, which gives `noun` (else
    `fix` says what can)."""
    from tunelab.data.formats import get_format
    from tunelab.data.sources import load_examples

    data = cfg.data
    data_format = get_format(data.format, data.fields)
    if not wanted(data_format.columns):
        raise TunelabError(f"data.format: '{data.format}' gives {_gives(data_format.columns)}, not {noun}; use {fix}")
    if data.sources:
        raise TunelabError("data.sources: mixtures are for `tunelab train`; give reward/dpo/rl one data.source "
                           "(concatenate the pair files into one folder's train files)")
    if data.overlong != "drop":
        raise TunelabError("data.overlong: preference data is never truncated (a cut answer would be judged "
                           "unfairly); set data.overlong=drop and raise data.max_length to keep long rows")
    examples, source_stats = load_examples(data.source, data_format, bad_rows=data.bad_rows, subset=data.subset,
                                           splits=data.splits, num_proc=data.num_proc)
    if "train" not in examples:  # a single file (hh-rlhf's test.jsonl) is the data to split, not a test set
        examples = DatasetDict({"train": examples[next(iter(examples))]})
    return examples, source_stats


def _split(cfg: Config, examples: DatasetDict, noun: str) -> tuple[Dataset, Dataset, Dataset | None]:
    from tunelab.data.prepare import split

    train, validation, test = split(examples, cfg.data, cfg.run.seed)
    if len(train) == 0 or len(validation) == 0:
        raise TunelabError(f"data: no {'training' if len(train) == 0 else 'validation'} {noun} left after filtering "
                           f"(data.max_length={cfg.data.max_length}, preference.min_agreement="
                           f"{cfg.preference.min_agreement})")
    return train, validation, test


def _stats(cfg: Config, noun: str, source_stats: dict, dropped: dict, train, validation, test) -> dict:
    return {
        "source": cfg.data.source,
        "format": cfg.data.format,
        f"train_{noun}": len(train),
        f"eval_{noun}": len(validation),
        f"test_{noun}": len(test) if test is not None else 0,
        "bad_rows": source_stats["bad_rows"],
        **dropped,
        "dropped": source_stats["bad_rows"] + sum(dropped.values()),
        "max_length": cfg.data.max_length,
    }


def _is_pairs(columns: tuple[str, ...]) -> bool:
    from tunelab.data.formats import PREFERENCE_COLUMNS

    return columns[:3] == PREFERENCE_COLUMNS


def load_preferences(cfg: Config, tokenizer) -> PreferenceData:
    """Validated, split, length-checked preference pairs for the data.* and preference.* settings."""
    fix = PAIR_FORMATS + (" (for data.format=rankings set preference.loss=listwise)" if cfg.data.format == "rankings" else "")
    examples, source_stats = _examples(cfg, _is_pairs, "preference pairs", fix)
    # Filter before splitting, so that data.max_train_samples / max_eval_samples count usable pairs.
    dropped = {"overlong": 0, "below_min_agreement": 0}
    for name in examples:
        examples[name], disagree = _agreeing(examples[name], cfg.preference.min_agreement)
        examples[name], overlong = drop_overlong(examples[name], tokenizer, cfg.data.max_length, name)
        dropped["below_min_agreement"] += disagree
        dropped["overlong"] += overlong
    train, validation, test = _split(cfg, examples, "pairs")
    return PreferenceData(train, validation, _stats(cfg, "pairs", source_stats, dropped, train, validation, test))


def _agreement_weights(rows: Dataset, by_agreement: bool, fill: float) -> Dataset:
    """`weight` per item: its reviewers' agreement (Kendall's W; `fill` where there is none) or 1."""
    def weight(agreement):
        return {"weight": (fill if agreement is None else max(agreement, 0.0)) if by_agreement else 1.0}

    return rows.map(weight, input_columns="agreement", desc="weighting rankings").remove_columns("agreement")


def load_rankings(cfg: Config, tokenizer) -> RankingData:
    """Ranked items (`tunelab review export --as rankings`) for the listwise reward model: every
    reviewer's ranking of an item's outputs, weighted by the item's agreement when
    preference.weight_by_agreement (an item with one reviewer gets the mean agreement of the others)."""
    examples, source_stats = _examples(cfg, lambda columns: "rankings" in columns, "rankings",
                                       "rankings (`tunelab review export --as rankings`) for preference.loss=listwise")
    dropped = {"overlong": 0, "below_min_agreement": 0}
    for name in examples:
        examples[name], disagree = _agreeing(examples[name], cfg.preference.min_agreement, keep=True)
        examples[name], overlong = drop_overlong(examples[name], tokenizer, cfg.data.max_length, name,
                                                 _longest_output, "ranked items")
        dropped["below_min_agreement"] += disagree
        dropped["overlong"] += overlong
    known = [a for name in examples for a in examples[name]["agreement"] if a is not None]
    fill = sum(known) / len(known) if known else 1.0
    for name in examples:
        examples[name] = _agreement_weights(examples[name], cfg.preference.weight_by_agreement, fill)
    train, validation, test = _split(cfg, examples, "rankings")
    stats = _stats(cfg, "items", source_stats, dropped, train, validation, test)
    stats["train_rankings"] = sum(len(r) for r in train["rankings"])
    stats["mean_agreement"] = fill if known else None
    return RankingData(train, validation, stats)


def _unpaired(pairs: Dataset) -> Dataset:
    """Each pair as two ratings: its chosen answer desirable, its rejected one not."""
    def unpair(batch):
        n = len(batch["prompt"])
        return {"prompt": batch["prompt"] * 2, "completion": batch["chosen"] + batch["rejected"],
                "label": [True] * n + [False] * n}

    return pairs.map(unpair, batched=True, remove_columns=pairs.column_names, desc="pairs → ratings")


def load_ratings(cfg: Config, tokenizer) -> RatingData:
    """Desirable/undesirable answers for KTO: `ratings` rows (`tunelab review export --as ratings`),
    or preference pairs split in two after the split (so a prompt's two answers stay on one side).
    The training rows are shuffled (seeded): KTO reads them in order, since it pairs each answer
    with its neighbour's for the KL estimate."""
    if cfg.data.format != "ratings":
        pairs = load_preferences(cfg, tokenizer)
        train, validation = _unpaired(pairs.train), _unpaired(pairs.eval)
        stats = {**pairs.stats, "train_ratings": len(train), "eval_ratings": len(validation)}
    else:
        examples, source_stats = _examples(cfg, lambda columns: "label" in columns, "ratings",
                                           f"ratings (`tunelab review export --as ratings`) or pairs: {PAIR_FORMATS}")
        dropped = {"overlong": 0}
        for name in examples:
            examples[name], dropped["overlong"] = drop_overlong(examples[name], tokenizer, cfg.data.max_length, name,
                                                                _rating_length, "ratings")
        train, validation, test = _split(cfg, examples, "ratings")
        stats = _stats(cfg, "ratings", source_stats, dropped, train, validation, test)
    labels = train["label"]
    if all(labels) or not any(labels):
        raise TunelabError(f"data: the training ratings are all {'desirable' if labels[0] else 'undesirable'}; KTO "
                           "needs both kinds (export rubric items too, or lower `review export --threshold`)")
    stats["train_desirable"] = sum(labels)
    return RatingData(train.shuffle(seed=cfg.run.seed).flatten_indices(), validation, stats)


def _prompt_reference(batch: dict[str, list]) -> dict[str, list]:
    return {"prompt": [m[:-1] for m in batch["messages"]], "reference": [m[-1]["content"] for m in batch["messages"]]}


def load_prompts(cfg: Config, tokenizer) -> PromptData:
    """Prompts with a reference answer for rl: from preference pairs (the chosen answer, filtered as
    for dpo) or from chat examples (the last assistant turn; examples longer than max_length dropped)."""
    from tunelab.data.formats import get_format

    if _is_pairs(get_format(cfg.data.format, cfg.data.fields).columns):
        pairs = load_preferences(cfg, tokenizer)
        with_reference = [d.map(lambda c: {"reference": c[0]["content"]}, input_columns="chosen", desc="references")
                          .select_columns(["prompt", "reference"]) for d in (pairs.train, pairs.eval)]
        return PromptData(*with_reference, {**pairs.stats, "train_prompts": len(pairs.train)})
    examples, source_stats = _examples(cfg, lambda columns: columns == ("messages",), "chat examples or pairs",
                                       f"chat examples (samsum, alpaca, custom ...) or pairs: {PAIR_FORMATS}")
    dropped = {"overlong": 0}
    for name in examples:
        examples[name], dropped["overlong"] = drop_overlong(examples[name], tokenizer, cfg.data.max_length, name,
                                                            _example_length, "examples")
        examples[name] = examples[name].map(_prompt_reference, batched=True, remove_columns="messages",
                                            desc="prompts and references")
    train, validation, test = _split(cfg, examples, "prompts")
    return PromptData(train, validation, _stats(cfg, "prompts", source_stats, dropped, train, validation, test))
