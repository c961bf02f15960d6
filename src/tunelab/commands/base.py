"""What every `tunelab` command is: a name, one line of help, its arguments and what it runs.

The parser never branches on a command's name: each command registers its own arguments, and
`commands/__init__.py` lists every command once. Only argparse is imported at the top of a
command module; a command imports its stage (and torch with it) when it runs, so `--help` and
config errors are instant.
"""

from __future__ import annotations

import argparse


class Command:
    """One `tunelab NAME …` command. Subclasses set `name`, `help` (and `interrupted`: what
    Ctrl-C prints), add their arguments in `arguments` and do the work in `run`."""

    name: str
    help: str
    interrupted = "interrupted"

    def register(self, sub) -> argparse.ArgumentParser:
        parser = sub.add_parser(self.name, help=_literal(self.help), description=self.help)
        self.arguments(parser)
        parser.set_defaults(command=self)
        return parser

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's positional arguments and options."""

    def run(self, args: argparse.Namespace) -> None:
        raise NotImplementedError


class Stopped(KeyboardInterrupt):
    """A server stopped by Ctrl-C (or SIGTERM). uvicorn handles the signal itself and returns from
    `uvicorn.run` once the server is down; a server command raises this then, so it ends as Ctrl-C
    ends every other command: its own `interrupted` message, exit 130."""


class Group(Command):
    """A command with subcommands (`tunelab review init|serve|…`)."""

    subcommands: tuple[Command, ...] = ()

    def register(self, sub) -> argparse.ArgumentParser:
        parser = sub.add_parser(self.name, help=_literal(self.help), description=self.help)
        children = parser.add_subparsers(dest=f"{self.name}_command", required=True)
        for command in self.subcommands:
            command.register(children)
        return parser


def _literal(help_text: str) -> str:
    """A command's help as argparse shows it in its parent's list, which %-formats it: "95% intervals"
    ended `tunelab --help` in a TypeError. (A parser's description is shown as written.)"""
    return help_text.replace("%", "%%")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. train.max_steps=20")
