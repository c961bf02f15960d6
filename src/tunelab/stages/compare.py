"""`tunelab compare A B [C …]`: run and eval folders side by side (compare.html + compare.json).

The comparison itself is `tracking/compare.py`, which the board's compare view shares.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.lifecycle import RunResult


def run(folders: list[str | os.PathLike], output: str | os.PathLike) -> RunResult:
    from tunelab.tracking import compare

    return RunResult(Path(output), compare.write(folders, output))
