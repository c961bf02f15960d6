"""The offline demo: generate a task the embedded model fails at, fine-tune it with LoRA, show before/after.

The task (meetup-planning chats → `WHO: … | WHAT: … | WHEN: … | WHERE: …`) is generated in code
with a fixed seed, so the run needs no download and gives the same table on every machine.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files

from tunelab.config import load_config
from tunelab.data.synthetic import make_meetup_task
from tunelab.stages import sft

TRAIN_ROWS = 240
VALIDATION_ROWS = 24


def write_task(folder, seed: int) -> None:
    """train.jsonl / validation.jsonl of chat examples, disjoint by construction (one seeded stream)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_meetup_task(TRAIN_ROWS + VALIDATION_ROWS, seed)
    for name, part in (("train", rows[:TRAIN_ROWS]), ("validation", rows[TRAIN_ROWS:])):
        with (folder / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


def run(overrides: list[str]) -> sft.RunResult:
    recipe = files("tunelab") / "recipes" / "quickstart.yaml"
    # A fresh run folder each time, so the demo can be re-run; run.name/run.dir overrides still win.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(str(recipe), [f"run.name=quickstart-{stamp}", "data.source=__generated__", *overrides])
    data_dir = cfg.run.path / "task-data"
    write_task(data_dir, cfg.run.seed)
    cfg.data.source = str(data_dir)
    return sft.run(cfg)
