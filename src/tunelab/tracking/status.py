"""How a run folder says whether its run is running, finished, failed or interrupted: status.json.

The training process writes it (`write_status`) when it starts, at every log step (the
heartbeat) and when it ends. A process killed outright (SIGKILL, out of memory, a lost machine)
writes nothing at its end, so `read_status` infers "interrupted" from a running state whose
process is gone (on this host) or whose heartbeat stopped (seen from another host, e.g. on a
shared file system). Run folders from before status.json read as finished when they hold
summary.json and as interrupted otherwise.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from tunelab.tracking.metrics import write_json

STATES = ("running", "finished", "failed", "interrupted")
STALE_S = 30 * 60
"""No heartbeat for this long and no way to check the process (another host): interrupted.
Long enough for a slow validation between two log steps."""
CHECKPOINT_DONE = "tunelab-checkpoint.json"
"""Written into checkpoint-N/ once transformers has written all of it (weights, optimizer, scheduler,
RNG, trainer_state.json), with the step and the time: a checkpoint without it was cut short by a
kill and is never resumed from. transformers writes checkpoint-N in place, so it needs the marker."""


def write_status(run_dir: str | os.PathLike, state: str, **info: Any) -> Path:
    """Atomically write run_dir/status.json: {state, pid, host, started, updated, **info}
    (info: e.g. step=, error=). `started` is kept from the file while the same process writes it."""
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    path = Path(run_dir) / "status.json"
    now, pid, host = time.time(), os.getpid(), socket.gethostname()
    previous = read_json_object(path)
    same_process = previous.get("pid") == pid and previous.get("host") == host
    started = previous.get("started", now) if same_process else now
    return write_json(path, {**(previous if same_process else {}), **info,
                             "state": state, "pid": pid, "host": host, "started": started, "updated": now})


def read_status(run_dir: str | os.PathLike, now: float | None = None) -> dict:
    """status.json's content with `state` as it is now (see the module docstring), plus
    `updated` (the heartbeat, else summary.json's or metrics.jsonl's time) when known."""
    run_dir = Path(run_dir)
    status = read_json_object(run_dir / "status.json")
    now = time.time() if now is None else now
    if (run_dir / "summary.json").is_file() and status.get("state") != "failed":
        return {**status, "state": "finished"} if status else {"state": "finished", "updated": _mtime(run_dir / "summary.json")}
    if not status:
        return {"state": "interrupted", "updated": _mtime(run_dir / "metrics.jsonl")}
    if status.get("state") == "running" and not _alive(status, now):
        return {**status, "state": "interrupted"}
    return status


def _alive(status: dict, now: float) -> bool:
    if status.get("host") == socket.gethostname() and isinstance(status.get("pid"), int):
        try:
            os.kill(status["pid"], 0)  # signal 0: only checks that the process exists
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True
    return isinstance(status.get("updated"), (int, float)) and now - status["updated"] < STALE_S


def checkpoint_folders(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The run's checkpoints/checkpoint-N folders as (N, folder), oldest first."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    return sorted(found)


def checkpoint_complete(folder: Path) -> bool:
    return (folder / CHECKPOINT_DONE).is_file()


def read_json_object(path: Path) -> dict:
    """A JSON object file as a dict; {} when it is missing, unreadable or not an object (a run
    folder's files are optional to their readers)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
