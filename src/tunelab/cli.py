"""`tunelab <command>`: one table of commands, each a thin wrapper over a stage.

Heavy libraries are imported inside the commands, so `--help` and config errors are instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tunelab.errors import TunelabError


def _train(args) -> None:
    from tunelab.config import load_config
    from tunelab.stages import sft

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    cfg = load_config(args.recipe, overrides)
    result = sft.run(cfg)
    _print_result(result)


def _quickstart(args) -> None:
    from tunelab.stages import quickstart

    result = quickstart.run(list(args.overrides))
    _print_result(result)


def _merge(args) -> None:
    from pathlib import Path

    from tunelab.models.build import merge_and_save

    out = merge_and_save(args.run, Path(args.output))
    print(f"merged model written to {out}")


def _print_result(result) -> None:
    from tunelab.tracking.report import format_before_after

    ev = result.summary["eval"]
    print()
    print(format_before_after(ev.get("before") or {}, ev.get("after") or {}))
    print(f"\nrun folder: {result.run_dir}  (report: {result.run_dir / 'report.html'})")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=20")


COMMANDS = {
    "train": (_train, "fine-tune a model from a recipe (SFT: full, LoRA, DoRA, QLoRA)"),
    "quickstart": (_quickstart, "offline demo: LoRA on the embedded SmolLM2, before/after table"),
    "merge": (_merge, "fold a LoRA run's adapter into its base and save a full model folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Adapt pretrained Llama-family models to your task.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if name == "train":
            p.add_argument("recipe", help="recipe YAML, e.g. recipes/samsum-lora.yaml")
            p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
            _add_overrides(p)
        elif name == "quickstart":
            _add_overrides(p)
        elif name == "merge":
            p.add_argument("run", help="a LoRA run folder or adapter folder")
            p.add_argument("--output", required=True, help="folder for the merged model")
    return parser


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("httpx", "urllib3", "filelock", "datasets", "transformers", "peft", "accelerate", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    try:
        args.func(args)
    except TunelabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with `tunelab train <recipe> --resume`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
