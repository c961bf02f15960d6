import pytest

from tunelab.evals.metrics import (
    METRICS,
    exact_match,
    field_accuracy,
    rouge,
    rouge_l,
    score,
)

REF = "WHO: Anna, Ben | WHAT: bowling | WHEN: Friday 7pm | WHERE: Riverside Lanes"
# Swapped names and a wrong time.
PRED = "WHO: Ben, Anna | WHAT: bowling | WHEN: Friday 8pm | WHERE: Riverside Lanes"


def test_exact_match_normalizes_whitespace_only():
    assert exact_match("  WHO: Anna,\tBen |\nWHAT: x  ", "WHO: Anna, Ben | WHAT: x") == 1.0
    assert exact_match("WHO: Anna,Ben", "WHO: Anna, Ben") == 0.0  # missing space != collapsed
    assert exact_match("who: anna", "WHO: Anna") == 0.0  # case-sensitive
    assert exact_match("", "") == 1.0


def test_rouge_hand_computed():
    # rouge_score lower-cases, keeps [a-z0-9] runs as tokens, Porter-stems tokens longer
    # than 3 characters:
    #   REF : who anna ben what bowl when friday 7pm where riversid lane   (11 tokens)
    #   PRED: who ben anna what bowl when friday 8pm where riversid lane   (11 tokens)
    # unigrams in common: all but 7pm/8pm = 10        -> rouge1 = 10/11
    # bigrams in common (of 10): what-bowl, bowl-when, when-friday, where-riversid,
    #   riversid-lane = 5                             -> rouge2 = 5/10
    # LCS: who, anna (or ben), what bowl when friday, where riversid lane = 9
    #                                                 -> rougeL = rougeLsum = 9/11
    scores = rouge(PRED, REF)
    assert scores == pytest.approx(
        {"rouge_1": 10 / 11, "rouge_2": 0.5, "rouge_l": 9 / 11, "rouge_lsum": 9 / 11})
    assert rouge_l(PRED, REF) == pytest.approx(9 / 11)


def test_rouge_uses_stemmer():
    assert rouge("cats", "cat")["rouge_1"] == 1.0
    assert rouge("dog", "cat")["rouge_1"] == 0.0


def test_rouge_lsum_splits_sentences_into_lines():
    # Tokens: the cat sat the dog ran  vs  the dog ran the cat sat.
    # Whole text LCS = 3 ("the cat sat" or "the dog ran") -> rougeL = 3/6 = 0.5.
    # Per sentence, each reference sentence is matched fully by one predicted sentence:
    # union LCS = 3 + 3 = 6 -> rougeLsum = 1.0 (only if sentences became lines).
    scores = rouge("The dog ran. The cat sat.", "The cat sat. The dog ran.")
    assert scores["rouge_l"] == pytest.approx(0.5)
    assert scores["rouge_lsum"] == pytest.approx(1.0)


def test_field_accuracy_partial_credit():
    assert field_accuracy(REF, REF) == 1.0
    assert field_accuracy(PRED, REF) == 0.5  # WHAT and WHERE right, WHO and WHEN wrong
    # Keys' case and spacing are tolerated; a value's case is not (WHERE).
    messy = "who :  Anna,  Ben|what:bowling | WHEN: Friday 7pm | WHERE: riverside lanes"
    assert field_accuracy(messy, REF) == 0.75
    assert field_accuracy("WHAT: bowling", REF) == 0.25  # missing fields count as wrong
    assert field_accuracy("Anna and Ben go bowling on Friday at 7pm.", REF) == 0.0


def test_field_accuracy_rejects_unparsable_reference():
    with pytest.raises(ValueError, match="no 'KEY: value' fields"):
        field_accuracy(REF, "just text")


def test_score_averages_over_rows():
    result = score([REF, PRED], [REF, REF], ["exact_match", "field_accuracy", "rouge_l"])
    assert result == pytest.approx(
        {"exact_match": 0.5, "field_accuracy": 0.75, "rouge_l": (1 + 9 / 11) / 2})


def test_score_rouge_expands_to_its_parts():
    result = score([PRED], [REF], ["rouge", "rouge_l"])
    assert result == pytest.approx(
        {"rouge_1": 10 / 11, "rouge_2": 0.5, "rouge_l": 9 / 11, "rouge_lsum": 9 / 11})


def test_metric_names_are_snake_case_and_old_names_read_as_new():
    from tunelab.evals.metrics import current_names, metric_of, result_keys

    assert result_keys(["rouge", "exact_match"]) == ["rouge_1", "rouge_2", "rouge_l", "rouge_lsum", "exact_match"]
    old = {"eval": {"after": {"rouge1": 0.5, "rougeLsum": 0.4, "rouge_l": 0.3}}, "tasks": [{"eval_rouge2": 0.1}]}
    assert current_names(old) == {"eval": {"after": {"rouge_1": 0.5, "rouge_lsum": 0.4, "rouge_l": 0.3}},
                                  "tasks": [{"eval_rouge_2": 0.1}]}
    assert metric_of("rouge2") == metric_of("rouge_2") == "rouge"


def test_score_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score([REF, REF], [REF], ["exact_match"])
    with pytest.raises(ValueError, match="no rows"):
        score([], [], ["exact_match"])
    with pytest.raises(ValueError) as err:
        score([REF], [REF], ["exact_match", "bleu"])
    assert "bleu" in str(err.value)
    for name in METRICS:
        assert name in str(err.value)
