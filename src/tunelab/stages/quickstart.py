"""The offline demo: fine-tune the embedded model on a task it fails at, show before/after.

The task (meetup-planning chats → `WHO: … | WHAT: … | WHEN: … | WHERE: …`) is generated in code
with a fixed seed (`data.source: synthetic:meetup`, see `data/synthetic.py`), so the run needs no
download and gives the same table on every machine.
"""

from __future__ import annotations

import time
from importlib.resources import files

from tunelab.config import Config, load_config
from tunelab.lifecycle import RunResult
from tunelab.stages import sft


def config(overrides: list[str]) -> Config:
    """The packaged quickstart recipe in a fresh, timestamped run folder each time, so the demo can
    be re-run (run.name / run.dir overrides still win)."""
    recipe = files("tunelab") / "recipes" / "quickstart.yaml"
    return load_config(str(recipe), [f"run.name=quickstart-{time.strftime('%Y%m%d-%H%M%S')}", *overrides])


def run(cfg: Config) -> RunResult:
    return sft.run(cfg)
