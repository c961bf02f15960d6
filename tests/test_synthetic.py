import re

import pytest

from tunelab.data.synthetic import (
    ACTIVITIES,
    DAYS,
    INSTRUCTION,
    MAX_TURNS,
    MAX_USER_CHARS,
    MIN_TURNS,
    NAMES,
    PLACES,
    TIMES,
    make_meetup_task,
    parse_fields,
)

N = 200
POOLS = {"WHAT": ACTIVITIES, "DAY": DAYS, "TIME": TIMES, "WHERE": PLACES}


def _pool_re(pool):
    # Longest first and whole words, so "12pm" is not read as "2pm".
    return re.compile(r"(?<![\w:])(" + "|".join(
        re.escape(v) for v in sorted(pool, key=len, reverse=True)) + r")(?![\w:])")


POOL_RES = {key: _pool_re(pool) for key, pool in POOLS.items()}


@pytest.fixture(scope="module")
def examples():
    return make_meetup_task(N, seed=0)


def _split(example):
    user, assistant = example["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    instruction, dialogue = user["content"].split("\n\n", 1)
    assert instruction == INSTRUCTION
    turns = [line.split(": ", 1) for line in dialogue.split("\n")]
    return turns, assistant["content"]


def _final(summary):
    fields = parse_fields(summary)
    day, time = fields["WHEN"].split(" ")
    return {"WHO": fields["WHO"], "WHAT": fields["WHAT"], "DAY": day, "TIME": time,
            "WHERE": fields["WHERE"]}


def test_deterministic_per_seed_and_n_respected():
    assert make_meetup_task(30, seed=7) == make_meetup_task(30, seed=7)
    assert make_meetup_task(30, seed=7) != make_meetup_task(30, seed=8)
    assert make_meetup_task(10, seed=7) == make_meetup_task(30, seed=7)[:10]
    assert len(make_meetup_task(0, seed=0)) == 0
    with pytest.raises(ValueError):
        make_meetup_task(-1, seed=0)


def test_does_not_touch_global_random_state():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    make_meetup_task(5, seed=0)
    assert random.random() == expected


def test_summary_has_exactly_the_four_fields_in_format(examples):
    line = re.compile(r"WHO: [A-Z][a-z]+(, [A-Z][a-z]+){1,2} \| WHAT: [a-z ]+ \| "
                      r"WHEN: [A-Z][a-z]+day \d{1,2}(:\d\d)?[ap]m \| WHERE: [A-Z][\w' ]+")
    assert len(examples) == N
    for example in examples:
        _, summary = _split(example)
        assert line.fullmatch(summary), summary
        assert list(parse_fields(summary)) == ["WHO", "WHAT", "WHEN", "WHERE"]


def test_dialogue_shape_and_length_bounds(examples):
    for example in examples:
        turns, _ = _split(example)
        assert MIN_TURNS <= len(turns) <= MAX_TURNS
        assert len(example["messages"][0]["content"]) <= MAX_USER_CHARS
        speakers = {speaker for speaker, _ in turns}
        assert 2 <= len(speakers) <= 3 and speakers <= set(NAMES)


def test_who_is_speakers_in_order_of_first_appearance(examples):
    for example in examples:
        turns, summary = _split(example)
        order = list(dict.fromkeys(speaker for speaker, _ in turns))
        assert parse_fields(summary)["WHO"] == ", ".join(order)


def test_final_values_appear_in_the_dialogue(examples):
    for example in examples:
        turns, summary = _split(example)
        text = "\n".join(t for _, t in turns)
        final = _final(summary)
        for key, pattern in POOL_RES.items():
            assert final[key] in pattern.findall(text), (key, final[key], text)


def test_many_dialogues_reject_a_first_proposal(examples):
    # The first pool value mentioned for a field is its first proposal (small talk mentions
    # none); it differing from the summary means the proposal was rejected.
    rejected = 0
    for example in examples:
        turns, summary = _split(example)
        text = "\n".join(t for _, t in turns)
        final = _final(summary)
        if any(pattern.search(text).group(1) != final[key] for key, pattern in POOL_RES.items()):
            rejected += 1
    assert rejected >= 0.3 * N
    assert rejected < N  # some chats agree at once: "the second value" is not a rule


def test_variety(examples):
    # Names and plan values masked: what remains is the phrasing of each turn and the shape
    # of each dialogue.
    masks = [(POOL_RES[key], f"<{key}>") for key in POOLS] + [
        (re.compile(r"\b(" + "|".join(NAMES) + r")\b"), "<NAME>")]
    phrasings, shapes = set(), set()
    for example in examples:
        turns, _ = _split(example)
        masked = []
        for _, text in turns:
            for pattern, tag in masks:
                text = pattern.sub(tag, text)
            masked.append(text)
        phrasings.update(masked)
        shapes.add(tuple(masked))
    assert len(phrasings) >= 50
    assert len(shapes) >= 150
    assert len({_split(e)[1] for e in examples}) >= 150


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("WHO: Anna, Ben | WHAT: bowling | WHEN: Friday 7pm | WHERE: Riverside Lanes",
         {"WHO": "Anna, Ben", "WHAT": "bowling", "WHEN": "Friday 7pm",
          "WHERE": "Riverside Lanes"}),
        ("who :  Anna,  Ben|What:bowling", {"WHO": "Anna, Ben", "WHAT": "bowling"}),
        ("Sure! WHAT: pizza | WHEN: Friday 7:30pm", {"WHEN": "Friday 7:30pm"}),
        ("WHAT: pizza | WHAT: tennis", {"WHAT": "pizza"}),
        ("Anna and Ben go bowling on Friday.", {}),
        ("", {}),
    ],
)
def test_parse_fields(text, expected):
    assert parse_fields(text) == expected


def test_synthetic_source_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    from tunelab.data.synthetic import VALIDATION_ROWS, local_source
    from tunelab.errors import TunelabError

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    folder = local_source("synthetic:meetup")
    assert folder == str(tmp_path / "synthetic" / "meetup")
    validation = tmp_path / "synthetic" / "meetup" / "validation.jsonl"
    assert len(validation.read_text().splitlines()) == VALIDATION_ROWS
    stamp = validation.stat().st_mtime_ns
    assert local_source("synthetic:meetup") == folder and validation.stat().st_mtime_ns == stamp
    assert local_source("data/samsum") == "data/samsum"
    with pytest.raises(TunelabError, match="unknown synthetic task 'nope'; choose one of synthetic:meetup"):
        local_source("synthetic:nope")
