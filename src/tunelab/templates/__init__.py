"""Jinja2 pages of `tunelab compare` (compare/), `tunelab board` (board/) and the run, eval and
k-fold reports (report/), rendered with autoescaping on: prompts, outputs and config values are
shown as text, never as HTML."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from jinja2 import Environment, PackageLoader, StrictUndefined


@lru_cache(maxsize=1)
def environment() -> Environment:
    from tunelab.tracking.stat_tables import fmt_difference, fmt_interval, verdict
    from tunelab.tracking.tables import fmt_value

    env = Environment(loader=PackageLoader("tunelab", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt_value, interval=fmt_interval, difference=fmt_difference)
    env.globals["verdict"] = verdict
    return env


def render(name: str, **context) -> str:
    return environment().get_template(name).render(**context)


def asset(name: str) -> str:
    """A static file shipped beside the templates (style.css, board/board.js)."""
    return resources.files("tunelab").joinpath("templates", name).read_text(encoding="utf-8")
