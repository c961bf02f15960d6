"""Run-folder metric files: metrics.jsonl (one line per Trainer log) and JSON summaries.

No transformers here (the callback that writes metrics.jsonl is in `tracking/live.py`): the
board, compare and report read run folders without importing torch.

Files are written so that a crash or a resumed run never leaves them invalid or duplicated:
whole-file writes are atomic, NaN/inf become null (strict JSON), and a resumed run first drops
the lines it is about to log again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)


def to_jsonable(obj: Any) -> Any:
    """Return `obj` as plain JSON types: numpy/torch values via `.tolist()`, NaN/inf as None.

    Trainer logs and eval results mix Python floats with numpy and torch scalars; `json`
    rejects the latter and would write NaN/Infinity, which is not valid JSON.
    """
    if isinstance(obj, float):  # also numpy.float64, a float subclass
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalars/arrays, torch tensors
        return to_jsonable(obj.tolist())
    return str(obj)  # Path, enum, ...: readable rather than a crash


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(to_jsonable(obj), allow_nan=False, ensure_ascii=False, **kwargs)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temp file + os.replace, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name per writer: several processes may rewrite the same file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented, strictly valid JSON."""
    return atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append `record` as one JSON line (flushed, so a crash loses at most this line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(_dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a missing file is empty.

    An unparsable *last* line is what an interrupted append leaves behind, so it is dropped
    with a warning; a bad line anywhere else means the file is corrupt and raises.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                logger.warning("%s:%d: dropping incomplete last line (%s)", path, lineno, e.msg)
                continue
            raise TunelabError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from e
    return records


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); inf instead of OverflowError for huge losses."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
