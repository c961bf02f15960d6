"""`tunelab board` pages through FastAPI's TestClient, and how a run folder says its state (status.json)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from tests.run_folders import make_eval, make_run
from tunelab.board.app import create_app
from tunelab.tracking.metrics import append_jsonl, write_json
from tunelab.tracking.report import write_report
from tunelab.tracking.status import STALE_S, read_status, write_status


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_status_states(tmp_path):
    run = make_run(tmp_path, "run", r=8, right=4, finished=False)
    assert read_status(run)["state"] == "interrupted"  # no status.json, no summary: left behind
    write_status(run, "running", step=3)
    first = read_status(run)
    assert first["state"] == "running" and first["step"] == 3 and first["pid"] > 0
    write_status(run, "running", step=4)
    again = read_status(run)
    assert again["started"] == first["started"] and again["updated"] >= first["updated"] and again["step"] == 4

    status = json.loads((run / "status.json").read_text())
    write_json(run / "status.json", {**status, "pid": _dead_pid()})
    assert read_status(run)["state"] == "interrupted"  # this host, the process is gone
    write_json(run / "status.json", {**status, "host": "elsewhere", "updated": time.time() - 60})
    assert read_status(run)["state"] == "running"  # another host: trusted while the heartbeat is fresh
    assert read_status(run, now=time.time() + STALE_S)["state"] == "interrupted"

    write_status(run, "failed", error="CUDA out of memory")
    assert read_status(run)["error"] == "CUDA out of memory" and read_status(run)["state"] == "failed"
    with pytest.raises(ValueError, match="state must be one of"):
        write_status(run, "done")
    done = make_run(tmp_path, "done", r=8, right=4)
    assert read_status(done)["state"] == "finished"  # summary.json, from before status.json existed


@pytest.fixture
def runs(tmp_path):
    """runs/r8 and runs/r16 finished, runs/sweep/live still training (status.json: this process)."""
    root = tmp_path / "runs"
    make_run(root, "r8", r=8, right=4)
    write_report(make_run(root, "r16", r=16, right=10))
    make_eval(root / "r16" / "eval", "20261201-120000", right=9)
    live = make_run(root / "sweep", "live", r=4, right=0, finished=False)
    write_status(live, "running", step=6)
    (tmp_path / "outside.html").write_text("secret")
    make_run(tmp_path, "outside-run", r=8, right=4)  # a run folder, but not under the board's folder
    return root


def test_runs_list(runs):
    client = TestClient(create_app(runs))
    response = client.get("/")
    assert response.status_code == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    html = response.text
    for name, state in (("r8", "finished"), ("r16", "finished"), ("sweep/live", "running")):
        assert f'<tr data-run="{name}">' in html and f'href="/runs/{name}"' in html
        assert f'state-{state}">{state}</td>' in html.split(f'data-run="{name}"')[1].split("</tr>")[0]
    r16 = html.split('data-run="r16"')[1].split("</tr>")[0]
    assert '<td class="num">1250</td>' in r16  # tokens/s (1234.5 + 16)
    assert "exact_match 0.8333" in r16  # after-training metrics from summary.json
    assert "loss 0.54 · eval_loss 0.3733" in html  # the live run: its latest losses from metrics.jsonl
    assert "20261201" not in html  # an eval folder is not a run


def test_run_page_api_and_files(runs):
    client = TestClient(create_app(runs))
    html = client.get("/runs/r16").text
    assert 'data-src="/api/metrics/r16"' in html and 'data-key="eval_loss"' in html
    assert "&lt;home&gt;" in html and "<home>" not in html  # outputs shown as text
    assert "checkpoint-3" in html and 'href="/files/r16/report.html"' in html
    assert 'href="/files/r16/eval/20261201-120000/report.html"' in html
    assert "+0.8333 [" in html  # after − before with its interval, from samples.jsonl

    api = client.get("/api/metrics/sweep/live", params={"since": 5}).json()
    assert api["state"] == "running" and api["step"] == 6 and api["next"] == 8
    assert [r["step"] for r in api["records"]] == [5, 6, 6]  # lines 5.. of 8 (two are validations)
    append_jsonl(runs / "sweep" / "live" / "metrics.jsonl", {"step": 7, "loss": 0.4})
    assert client.get("/api/metrics/sweep/live", params={"since": 8}).json()["records"] == [{"step": 7, "loss": 0.4}]

    report = client.get("/files/r16/report.html")
    assert report.status_code == 200 and "sandbox" in report.headers["content-security-policy"]
    # Encoded dots reach the app as "..": a path that leaves the folder is refused, as are other file kinds.
    assert client.get("/files/%2e%2e/outside.html").status_code == 404
    assert client.get("/files/r16/%2e%2e/%2e%2e/outside.html").status_code == 404
    assert client.get("/files/r16/checkpoints/checkpoint-3").status_code == 404
    assert client.get("/runs/%2e%2e/outside-run").status_code == 404
    assert client.get("/api/metrics/%2e%2e/outside-run").status_code == 404
    assert client.get("/runs/%2e%2e/runs/r8").status_code == 200  # ../runs is the board's folder itself
    assert client.get("/runs/nope").status_code == 404
    assert client.get("/api/metrics/r16/checkpoints").status_code == 404  # not a run folder


def test_compare_view(runs):
    client = TestClient(create_app(runs))
    response = client.get("/compare", params=[("run", "r8"), ("run", "r16")])
    assert response.status_code == 200
    assert "script-src" not in response.headers["content-security-policy"]  # no script at all
    assert "r16 − r8 · validation · 12 rows" in response.text and 'href="/"' in response.text
    assert client.get("/compare", params={"run": "r8"}).status_code == 400
    assert client.get("/compare", params=[("run", "r8"), ("run", "../outside-run")]).status_code == 400


def test_board_binds_localhost_by_default():
    import inspect

    from tunelab.board.app import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_live_callback_heartbeat_and_report_at_validation(tmp_path):
    from types import SimpleNamespace

    from tunelab.tracking.live import LiveRunCallback

    run = make_run(tmp_path, "run", r=8, right=0, finished=False)
    callback = LiveRunCallback(run)
    state = SimpleNamespace(global_step=0, max_steps=20, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)
    assert read_status(run)["state"] == "running" and read_status(run)["step"] == 0
    state.global_step = 6
    callback.on_log(None, state, None, logs={"loss": 0.5})
    assert read_status(run)["step"] == 6 and read_status(run)["max_steps"] == 20
    callback.on_evaluate(None, state, None)
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == ["generation.png", "learning_rate.png", "loss.png"]
    assert "run" in (run / "report.html").read_text()
    callback.on_log(None, SimpleNamespace(global_step=7, max_steps=20, is_world_process_zero=False), None)
    assert read_status(run)["step"] == 6  # other ranks never write
