"""Jinja2 pages of the review app and report, rendered on the server with autoescaping on:
every text that comes from a prompt, an output or a reviewer is shown as text, never as HTML."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from jinja2 import Environment, PackageLoader, StrictUndefined


def fmt(value, spec: str = ".3f") -> str:
    """A number for people: `spec`-formatted, or n/a when missing."""
    return "n/a" if value is None else format(value, spec)


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=PackageLoader("tunelab.review", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    return env


def render(name: str, **context) -> str:
    return environment().get_template(name).render(**context)


def asset(name: str) -> str:
    """A static file shipped beside the templates (style.css, review.js)."""
    return resources.files("tunelab.review").joinpath("templates", name).read_text(encoding="utf-8")
