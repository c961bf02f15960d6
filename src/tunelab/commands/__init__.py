"""Every `tunelab` command, listed once: the parser is built from this list and nothing else."""

from __future__ import annotations

from tunelab.commands.base import Command
from tunelab.commands.data import Data
from tunelab.commands.evaluation import Board, Compare, Eval
from tunelab.commands.export import Export, Push
from tunelab.commands.inference import BenchInfer, Chat, Generate, Serve
from tunelab.commands.review import Review
from tunelab.commands.training import Dpo, Kfold, Kto, Merge, Quickstart, Reward, Rl, Train

COMMANDS: tuple[Command, ...] = (
    Train(), Quickstart(), Data(), Eval(), Compare(), Board(), Kfold(), Reward(), Dpo(), Kto(), Rl(), Merge(),
    Export(), Push(),
    Generate(), Chat(), Serve(), BenchInfer(), Review(),
)
