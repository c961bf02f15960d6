"""Metrics that compare a generated text with a reference text, and their registry.

Each metric scores one (prediction, reference) pair; ``score`` averages over rows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from statistics import fmean
from typing import TYPE_CHECKING

from tunelab.data.synthetic import parse_fields

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

_ROUGE_TYPES = {"rouge1": "rouge_1", "rouge2": "rouge_2", "rougeL": "rouge_l", "rougeLsum": "rouge_lsum"}
"""rouge_score's names → ours: every metric key is snake_case (rouge_l is also the standalone metric)."""
RENAMED = {"rouge1": "rouge_1", "rouge2": "rouge_2", "rougeLsum": "rouge_lsum"}
"""Metric keys in run and eval folders written before the snake_case names (summary.json,
results.json, kfold.json; `eval_`-prefixed in metrics.jsonl), and their names now."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the texts are equal after stripping and collapsing whitespace, else 0.0.

    Case-sensitive on purpose: the target formats are exact (upper-case keys, names with
    capitals), and a wrong case is a format error that fine-tuning is meant to fix.
    """
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (``rouge_score``, Porter stemmer) as
    ``rouge_1``, ``rouge_2``, ``rouge_l`` and ``rouge_lsum``.

    ROUGE-Lsum computes LCS per line, so both texts get one sentence per line first (split
    after ``.``, ``!`` or ``?``; line breaks stay), as the HF ``evaluate`` rouge metric
    expects its callers to do; ROUGE-1/2/L ignore line breaks, so they see the same text.
    """
    scores = _scorer().score(_one_sentence_per_line(reference), _one_sentence_per_line(prediction))
    return {ours: scores[theirs].fmeasure for theirs, ours in _ROUGE_TYPES.items()}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of words, order-aware."""
    return rouge(prediction, reference)["rouge_l"]


def field_accuracy(prediction: str, reference: str) -> float:
    """Fraction of the reference's ``KEY: value`` fields that the prediction gets exactly.

    Partial credit shows extraction progress before the whole line is exact; keys are
    matched case-insensitively, values exactly (after collapsing whitespace).
    """
    expected = parse_fields(reference)
    if not expected:
        raise ValueError(f"reference has no 'KEY: value' fields: {reference!r}")
    got = parse_fields(prediction)
    return sum(got.get(key) == value for key, value in expected.items()) / len(expected)


METRICS: dict[str, Callable[[str, str], float | dict[str, float]]] = {
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "rouge": rouge,
    "field_accuracy": field_accuracy,
}


def score(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Mean of each named metric over the rows.

    Keys: the metric's name, or for ``rouge`` its parts ``rouge_1``, ``rouge_2``, ``rouge_l``
    (same value as the ``rouge_l`` metric) and ``rouge_lsum``.
    """
    return {key: fmean(values) for key, values in per_row(predictions, references, names).items()}


def per_row(predictions: list[str], references: list[str], names: list[str]) -> dict[str, list[float]]:
    """Each named metric's value on every row, under the keys ``score`` reports (the bootstrap
    intervals and paired tests of ``evals.stats`` resample these)."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: one each per row"
        )
    if not predictions:
        raise ValueError("no rows to score")
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; allowed: {sorted(METRICS)}")
    values: dict[str, list[float]] = {}
    for name in names:
        rows = [METRICS[name](p, r) for p, r in zip(predictions, references)]
        if isinstance(rows[0], dict):
            for part in rows[0]:
                values[part] = [row[part] for row in rows]
        else:
            values[name] = rows
    return values


def metric_of(key: str) -> str | None:
    """The per-row metric whose ``score`` output holds `key` (``rouge_2``, or the old ``rouge2``,
    → ``rouge``), or None for keys no per-row metric reports (loss, corpus BLEU, harness accuracies)."""
    key = RENAMED.get(key, key)
    if key in METRICS and key != "rouge":
        return key
    return "rouge" if key in result_keys(["rouge"]) else None


def result_keys(names: list[str]) -> list[str]:
    """The keys ``score`` returns for these metric names, known before anything is generated."""
    parts = {"rouge": list(_ROUGE_TYPES.values())}
    return list(dict.fromkeys(key for name in names for key in parts.get(name, [name])))


def current_names(data):
    """`data` read from a run or eval folder (dicts and lists, nested) with the old metric keys
    (`RENAMED`, also `eval_`-prefixed) under their names now; everything else as it was."""
    if isinstance(data, list):
        return [current_names(item) for item in data]
    if not isinstance(data, dict):
        return data
    return {_current(key): current_names(value) for key, value in data.items()}


def _current(key):
    if not isinstance(key, str):
        return key
    prefix = "eval_" if key.startswith("eval_") else ""
    return prefix + RENAMED.get(key.removeprefix(prefix), key.removeprefix(prefix))


def loops(token_ids: list[int], max_new_tokens: int, longest_ngram: int = 16, repeats: int = 3) -> bool:
    """Whether a greedy output is a repetition loop: it ran to the token limit and its tail is one
    n-gram (n ≤ longest_ngram) said at least `repeats` times over, e.g. "... I will. I will. I will."
    Counted per evaluation as `repetition_loops`: a loop never stops by itself, and its text can still
    share words with the reference (ROUGE does not see it)."""
    if len(token_ids) < max_new_tokens:
        return False
    for n in range(1, longest_ngram + 1):
        tail = token_ids[-n * repeats:]
        if len(tail) == n * repeats and tail == tail[:n] * repeats:
            return True
    return False


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU on a 0-100 scale (sacrebleu's defaults: 13a tokenization, one reference per row).

    Corpus-level on purpose: BLEU pools n-gram counts over all rows; the mean of sentence BLEU
    is a different (and for short outputs mostly zero) number.
    """
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score


@functools.cache
def _scorer() -> RougeScorer:
    """Built once, on first use: importing rouge_score (and nltk) takes about a second."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)


def _one_sentence_per_line(text: str) -> str:
    return "\n".join(part for part in _SENTENCE_END.split(text.strip()) if part)
