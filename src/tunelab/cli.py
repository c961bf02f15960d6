"""`tunelab <command>`: the parser built from `commands.COMMANDS`, logging, and how errors end a command.

Heavy libraries are imported inside the commands, so `--help` and config errors are instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from tunelab.errors import TunelabError, did_you_mean


def build_parser() -> argparse.ArgumentParser:
    from tunelab.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="tunelab", description="Adapt pretrained Llama-family models to your task.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command_name", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


LIBRARIES = ("absl", "accelerate", "bitsandbytes", "datasets", "filelock", "httpx", "huggingface_hub", "matplotlib",
             "peft", "torch", "transformers", "trl", "urllib3", "wandb")
"""Loggers of the libraries tunelab drives: errors only, unless -v."""


class _Lines(logging.Formatter):
    """tunelab's own INFO lines as plain text, its warnings as `warning: ...`; a library's lines
    (shown with -v) also name the library."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.name.split(".")[0] == "tunelab":
            return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"
        return f"{record.levelname.lower()} ({record.name}): {message}"


def _quiet_libraries(verbose: bool) -> None:
    """Logging and warnings, set before any library is imported: tunelab's own messages, and the
    libraries' warnings (FutureWarnings, deprecations, bitsandbytes' missing `kernels`, peft's
    notes) only with -v."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Lines("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"tunelab(\.|$)")


def _check_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An unknown command name ends with the near one ("did you mean train?"), and so does an
    unknown subcommand of a group (`review add-tsk`); argparse alone lists them all."""
    from tunelab.commands import COMMANDS
    from tunelab.commands.base import Group

    words = [arg for arg in argv if not arg.startswith("-")]
    names = [command.name for command in COMMANDS]
    if words and words[0] not in names:
        parser.error(f"unknown command {words[0]!r}{did_you_mean(words[0], names)} (commands: {', '.join(names)})")
    group = next((command for command in COMMANDS if words and command.name == words[0]), None)
    if isinstance(group, Group) and len(words) > 1:
        subnames = [command.name for command in group.subcommands]
        if words[1] not in subnames:
            parser.error(f"unknown command '{group.name} {words[1]}'{did_you_mean(words[1], subnames)} "
                         f"({group.name} commands: {', '.join(subnames)})")


def parse_args(argv: list[str] | None):
    """argparse, plus overrides written after an option (`train r.yaml --nproc 2 a.b=c`), which
    argparse alone rejects once the positional overrides are behind it."""
    parser = build_parser()
    _check_command(parser, sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not (hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--nproc` re-runs under torchrun
    _quiet_libraries(args.verbose)
    try:
        args.command.run(args)
    except TunelabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(args.command.interrupted, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
