"""`tunelab data inspect | prepare RECIPE`: see what a recipe trains on, or prepare its data ahead of a GPU job.

Only argparse is imported here; the stage (`stages/data.py`) is imported after the config is valid.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tunelab.commands.base import Command, Group, add_overrides


def _config(args):
    from tunelab.config import load_config

    return load_config(args.recipe, list(args.overrides))


def _recipe(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/samsum-lora.yaml, or a packaged recipe's name")
    add_overrides(parser)


class Inspect(Command):
    name = "inspect"
    help = ("show the first training samples exactly as trained (loss tokens marked), a packed row, counts, "
            "lengths and data checks; tokenizer only")

    def arguments(self, parser) -> None:
        _recipe(parser)
        parser.add_argument("--n", type=int, default=3, help="samples to show (of each source for a mixture; default 3)")
        parser.add_argument("--ids", action="store_true", help="also print each shown sample's token ids and labels")
        parser.add_argument("--html", metavar="FILE", help="also write the inspection as one HTML page")
        parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                            help="mark the loss tokens in green (auto: on a terminal, unless NO_COLOR is set)")

    def run(self, args) -> None:
        from tunelab.errors import TunelabError

        start = time.time()
        cfg = _config(args)
        from tunelab.data.inspect import page, terminal
        from tunelab.stages import data

        report = data.inspect(cfg, args.n, args.recipe)
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
        print(terminal(report, color, args.ids))
        if args.html:
            Path(args.html).write_text(page(report, args.ids), encoding="utf-8")
            print(f"\nwrote {args.html}")
        print(f"\n({time.time() - start:.1f} s)")
        if report.failed:
            raise TunelabError(f"data inspect: {len(report.failed)} check(s) failed: "
                               f"{', '.join(c.name for c in report.failed)} (see above)")


class Prepare(Command):
    name = "prepare"
    help = "read, check, tokenize and pack a recipe's data into the cache that `tunelab train` reuses"

    def arguments(self, parser) -> None:
        _recipe(parser)

    def run(self, args) -> None:
        start = time.time()
        cfg = _config(args)
        from tunelab.stages import data

        stats = data.prepare(cfg)
        rows = data.counts(stats)
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
        print(f"\nprepared in {time.time() - start:.1f} s; cached in the datasets cache (HF_DATASETS_CACHE, default "
              "~/.cache/huggingface/datasets): `tunelab train` with this recipe, tokenizer and data.* reuses it")


class Data(Group):
    name = "data"
    help = "a recipe's data without a model: inspect what it trains on, or prepare it ahead of a GPU job"
    subcommands = (Inspect(), Prepare())
