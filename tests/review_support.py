"""Fixtures for the review app tests: a throwaway PostgreSQL server, review projects on either
backend, and a live uvicorn server on 127.0.0.1.

Import the fixtures into a test module (`from tests.review_support import ...`).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for this test session: initdb into a temporary folder, listening only
    on a unix socket there. PostgreSQL refuses to run as root, so as root it runs as the
    `postgres` system user (which the Debian package creates)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: run scripts/system-deps.sh as root")
    root = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the PostgreSQL server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    options = f"-k {root} -p {port} -c listen_addresses='' -c fsync=off -c max_connections=200"
    for command in ([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                    [pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"]):
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            pytest.fail(f"{' '.join(command[:1])} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}")
    try:
        yield {"host": str(root), "port": port}
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server."""
    import psycopg

    name = f"review_{uuid.uuid4().hex[:12]}"
    server = postgres_server
    with psycopg.connect(host=server["host"], port=server["port"], user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@/{name}?host={server['host']}&port={server['port']}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """Each test using this runs once on a SQLite file and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'review.db'}"
    return request.getfixturevalue("postgres_url")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def import_rows(n: int, k: int = 3, text=lambda i, j: f"answer {j} to question {i}") -> list[dict]:
    """n items in the `tunelab eval --export-manual` shape, k outputs each from models m0, m1, ..."""
    return [
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"Question {i}?"}], "reference": f"ref {i}",
         "outputs": [{"model": f"m{j}", "text": text(i, j)} for j in range(k)]}
        for i in range(n)
    ]


def make_project(url: str, tmp_path: Path, *, items: int, k: int = 3, per_item: int = 2, kinds=("rank",),
                 reviewers: int = 2, text=None):
    """A review project with `items` imported items and reviewers r0 (admin), r1, ...;
    returns (store, {name: token})."""
    from tunelab.review import project
    from tunelab.review.store import Store

    store = Store(url)
    project.init(store, project.DEFAULT_RUBRIC, per_item)
    rows = import_rows(items, k, **({"text": text} if text else {}))
    project.import_files(store, [write_jsonl(tmp_path / "import.jsonl", rows)], list(kinds))
    tokens = {f"r{i}": project.add_reviewer(store, f"r{i}", admin=i == 0) for i in range(reviewers)}
    return store, tokens


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page ("" when it has none)."""
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    return found.group(1) if found else ""


def rank_form(store, aid: int, order: list[int] | None = None) -> dict:
    """A valid ranking form for an assignment: outputs ranked in item order (or by `order`)."""
    from tunelab.review.store import Assignment

    with store.read() as s:
        outputs = s.get(Assignment, aid).item.outputs
    order = order or list(range(1, len(outputs) + 1))
    return {f"rank_{o.id}": str(r) for o, r in zip(outputs, order)}


@contextmanager
def live_server(store):
    """The review app served by uvicorn on 127.0.0.1 in a background thread; yields its base URL."""
    import uvicorn

    from tunelab.review.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the review server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
