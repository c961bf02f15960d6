"""Synthetic meetup-summary task: the quickstart's demonstration data.

Short chats in which 2-3 friends plan a meetup, paired with a one-line summary in a fixed
format the base model does not produce on its own::

    WHO: Anna, Ben | WHAT: bowling | WHEN: Friday 7pm | WHERE: Riverside Lanes

Rules of the summary (what the fine-tuned model has to learn):

- WHO lists every speaker, in order of first appearance in the chat (a speaker's first line
  may be small talk). Every speaker takes part in the plan.
- WHAT, WHEN (day + time) and WHERE are the *final agreed* values: many chats contain a
  rejected proposal ("Thursday?" "Can't do Thursday, Saturday?" "Saturday works"), so the
  first value mentioned is often not the answer.
- Small-talk turns never mention a name, activity, day, time or place from the pools, so
  the plan values are unambiguous.

Values are copied verbatim from the chat (activities stay lowercase, times like ``7:30pm``),
so the task is extraction plus format, small enough to learn in a few dozen LoRA steps.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from tunelab.errors import TunelabError

# Names the four fields but not the exact format: the base model gets the format wrong.
INSTRUCTION = "Summarize the plan agreed in this chat in one line: who, what, when and where."

SOURCE_PREFIX = "synthetic:"
"""`data.source=synthetic:meetup` names this generated task, so recipes can use it like any dataset."""
TASKS = ("meetup",)
TRAIN_ROWS = 240
VALIDATION_ROWS = 24

MIN_TURNS = 4
MAX_TURNS = 9
MAX_USER_CHARS = 360  # ~100 SmolLM2 tokens on average, 140 at most: CPU time grows with length

NAMES = (
    "Anna", "Ben", "Carl", "Dana", "Eli", "Fiona", "Gus", "Hana", "Ivan", "Jade",
    "Kofi", "Lena", "Milo", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Wes", "Xena", "Yuki", "Zoe", "Leo", "Maya", "Theo", "Iris",
)
ACTIVITIES = (
    "bowling", "mini golf", "karaoke", "board games", "climbing", "brunch",
    "pizza", "trivia night", "hiking", "ice skating", "laser tag", "tennis",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TIMES = ("10am", "11am", "12pm", "1pm", "3pm", "5pm", "6pm", "7pm", "7:30pm", "8pm")
PLACES = (
    "Riverside Lanes", "Central Park", "The Blue Door", "Mario's", "Oak Street Cafe",
    "Harbor Hall", "Summit Gym", "Greenway Trail", "Lucky Star", "Westfield Rink",
    "The Red Lion", "Sunset Pier", "Maple Commons", "Pixel Arcade", "Corner Bistro",
)

# Templates. Activities never start a sentence, so they appear lowercase as in the summary.
_OPEN = {
    (): (
        "Anyone up for {what} this week?",
        "Who's in for {what}?",
        "We should do {what} soon!",
        "I'm in the mood for {what}, anyone?",
        "It's been ages. Up for {what}?",
    ),
    ("when",): (
        "Anyone up for {what} on {day} at {time}?",
        "Who's in for {what}, {day} {time}?",
        "Thinking {what} on {day} around {time}. In?",
    ),
    ("where",): (
        "Anyone up for {what} at {place}?",
        "Fancy {what} at {place} this week?",
        "How about {what} at {place}?",
    ),
}
_PROPOSE = {
    "when": (
        "How about {day} at {time}?",
        "{day}, {time}?",
        "I'm free {day}, is {time} ok?",
        "Does {day} at {time} work?",
        "What about {day}? Say {time}.",
    ),
    "where": (
        "Where? {place}?",
        "Let's meet at {place}.",
        "{place} ok?",
        "How about {place}?",
        "I know a spot: {place}.",
    ),
}
_COUNTER = {
    "what": (
        "Not {old} again, how about {new}?",
        "Hmm, I'd rather do {new}.",
        "I did {old} last week, maybe {new}?",
        "Honestly {old} isn't my thing. {new} instead?",
    ),
    "day": (
        "Can't do {old}, {new}?",
        "I'm busy {old}. {new} instead?",
        "{old} is bad for me, what about {new}?",
        "Could we do {new} instead?",
    ),
    "time": (
        "{old} is tricky for me, {new}?",
        "Can we make it {new} instead?",
        "Not at {old}, maybe {new}?",
        "I'd prefer {new} if that's ok.",
    ),
    "place": (
        "{old} is always packed. {new}?",
        "I'd prefer {new}.",
        "Not {old} please, {new}?",
        "{new} is closer for me.",
    ),
}
_ACK = (
    "Sounds good.", "Works for me!", "Sure, I'm in.", "Deal.", "Perfect.", "Yes!",
    "I'm down.", "Fine by me.",
)
_ACK_VALUE = ("OK, {value} it is.", "Fine, {value} then.", "Sure, {value} works.")
_JOIN = ("Count me in!", "I'm in too.", "Same, I'm in.", "Me too!")
_CLOSE = ("See you all then!", "Great, it's a plan.", "Can't wait!", "Nice, see you there.")
_CLOSE_RESTATE = (
    "So {what} on {day} at {time}, {place}. See you!",
    "Great: {day} {time} at {place}.",
    "Confirmed: {what}, {day} {time}, {place}.",
)
_SMALL_TALK = (
    "Did anyone watch the game last night?",
    "Ugh, my phone is about to die.",
    "lol my cat just knocked over my coffee",
    "Unrelated, but I finally finished that book.",
    "Traffic today was awful.",
    "Anyone else exhausted today?",
    "Btw congrats on the new job!",
    "Wait, is it raining there too?",
    "brb, doorbell",
)

_P_COUNTER = 0.45  # per proposal: most chats have a rejected value, some have none
_P_MERGE_ACK = 0.6  # "Sounds good. Let's meet at X." keeps chats short
_TOPIC_FIELDS = {"what": ("what",), "when": ("day", "time"), "where": ("place",)}
_POOLS = {"what": ACTIVITIES, "day": DAYS, "time": TIMES, "place": PLACES}
_FIELD_RE = re.compile(r"\s*([A-Za-z_]+)\s*:(.*)", re.DOTALL)


def local_source(source: str) -> str:
    """`synthetic:<task>` → the folder its train/validation files are generated into (once, in
    tunelab's cache); any other source unchanged."""
    if not source.startswith(SOURCE_PREFIX):
        return source
    from tunelab.models.loading import cache_root

    task = source.removeprefix(SOURCE_PREFIX)
    if task not in TASKS:
        raise TunelabError(f"data.source: unknown synthetic task '{task}'; choose one of "
                           f"{', '.join(SOURCE_PREFIX + t for t in TASKS)}")
    folder = cache_root() / "synthetic" / task
    if not (folder / "validation.jsonl").is_file():
        write_task(folder, seed=0)
    return str(folder)


def write_task(folder: Path, seed: int) -> None:
    """train.jsonl / validation.jsonl of chat examples, disjoint by construction (one seeded stream).
    The validation file is written last, so its presence means the task is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_meetup_task(TRAIN_ROWS + VALIDATION_ROWS, seed)
    for name, part in (("train", rows[:TRAIN_ROWS]), ("validation", rows[TRAIN_ROWS:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def make_meetup_task(n: int, seed: int) -> list[dict]:
    """Return ``n`` chat examples ``{"messages": [user, assistant]}``, deterministic per seed.

    One ``random.Random(seed)`` draws the examples in sequence, so a smaller ``n`` gives a
    prefix of a larger one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def parse_fields(summary: str) -> dict[str, str]:
    """Parse ``KEY: value | KEY: value`` into ``{"KEY": "value"}``; ``{}`` if no field parses.

    Keys are upper-cased and spacing is collapsed so that ``who :  Anna`` still counts;
    values keep their case (they are names). Segments without ``KEY:`` are skipped, so a
    partly right prediction keeps the fields it got right; the first of a repeated key wins.
    """
    fields: dict[str, str] = {}
    for segment in summary.split("|"):
        match = _FIELD_RE.fullmatch(segment)
        if match:
            fields.setdefault(match.group(1).upper(), " ".join(match.group(2).split()))
    return fields


def _example(rng: random.Random) -> dict:
    while True:  # redraw the chats that came out too long or too short
        turns, plan = _dialogue(rng)
        if MIN_TURNS <= len(turns) <= MAX_TURNS and len(_user_message(turns)) <= MAX_USER_CHARS:
            break
    who = list(dict.fromkeys(speaker for speaker, _ in turns))
    summary = (
        f"WHO: {', '.join(who)} | WHAT: {plan['what']} | "
        f"WHEN: {plan['day']} {plan['time']} | WHERE: {plan['place']}"
    )
    return {"messages": [{"role": "user", "content": _user_message(turns)},
                         {"role": "assistant", "content": summary}]}


def _user_message(turns: list[tuple[str, str]]) -> str:
    return INSTRUCTION + "\n\n" + "\n".join(f"{who}: {text}" for who, text in turns)


def _dialogue(rng: random.Random) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Draw one chat as ``(speaker, text)`` turns and the plan it ends up agreeing on."""
    speakers = rng.sample(NAMES, rng.choice((2, 3)))
    plan = {"what": rng.choice(ACTIVITIES), "day": rng.choice(DAYS),
            "time": rng.choice(TIMES), "place": rng.choice(PLACES)}
    turns: list[tuple[str, str]] = []

    def say(text: str) -> None:
        # Plan turns alternate speakers, so a counter or an ack never answers oneself.
        others = [s for s in speakers if not turns or s != turns[-1][0]]
        turns.append((speakers[0] if not turns else rng.choice(others), text))

    later = ["when", "where"]
    rng.shuffle(later)
    bundled = rng.choice(((), (), ("when",), ("where",)))
    groups = [("what", *bundled)] + [(topic,) for topic in later if topic not in bundled]
    pending_ack = ""
    for i, group in enumerate(groups):
        templates = _OPEN[bundled] if i == 0 else _PROPOSE[group[0]]
        say(f"{pending_ack} {rng.choice(templates).format(**plan)}".strip())
        ack = rng.choice(_ACK)
        if rng.random() < _P_COUNTER:
            field = rng.choice([f for topic in group for f in _TOPIC_FIELDS[topic]])
            old, plan[field] = plan[field], rng.choice(
                [v for v in _POOLS[field] if v != plan[field]])
            say(rng.choice(_COUNTER[field]).format(old=old, new=plan[field]))
            if rng.random() < 0.5:
                ack = rng.choice(_ACK_VALUE).format(value=plan[field])
        if i + 1 < len(groups) and rng.random() < _P_MERGE_ACK:
            pending_ack = ack
        else:
            say(ack)
            pending_ack = ""
    for speaker in speakers:
        if all(speaker != s for s, _ in turns):
            turns.append((speaker, rng.choice(_JOIN)))
    roll = rng.random()
    if roll < 0.35:
        say(rng.choice(_CLOSE_RESTATE).format(**plan))
    elif roll < 0.7:
        say(rng.choice(_CLOSE))
    for text in rng.sample(_SMALL_TALK, rng.choice((0, 1, 1, 2))):
        at = rng.randint(1, len(turns))
        longer = turns[:at] + [(rng.choice(speakers), text)] + turns[at:]
        if len(longer) <= MAX_TURNS and len(_user_message(longer)) <= MAX_USER_CHARS:
            turns = longer
    return turns, plan
