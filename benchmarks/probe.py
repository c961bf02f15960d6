"""Hardening probe, re-run (issue #15): the issue's classes of check, black-box, as a user meets them.

    .venv/bin/python benchmarks/probe.py                         # every class, ~5 min on the 2-core CPU machine
    .venv/bin/python benchmarks/probe.py --only 8,12 --out /tmp/p.json   # some classes (by item number)

Every check drives tunelab from outside: `tunelab ...` in a subprocess with a shell's environment
(`python -X importtime -m tunelab` where it matters whether torch was imported), HTTP to
`tunelab serve` and `tunelab review serve` on 127.0.0.1, and Debian's Chromium (Playwright) for the
review app's cross-origin forms. Training runs use a tiny random Llama saved with the embedded
tokenizer (tests/conftest.py's config), the quickstart's generated chats and 6 steps, so a run is
seconds. Each check is one row {class, check, good, detail}; the summary counts them per class.
A check that is not good is reported as not good: nothing here retries until it passes.

Kills are real where the instant can be caught (SIGKILL while a checkpoint folder exists without its
completion marker; SIGKILL right after the last checkpoint is complete; SIGINT mid-run); the
deterministic "incomplete newest checkpoint" is simulated by removing a finished run's adapter,
summary and its newest checkpoint's marker and optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PY = sys.executable
NOISE = ("FutureWarning", "DeprecationWarning", "UserWarning", "No module named 'kernels'", "{'loss'",
         "save_embedding_layers", "absl", "warnings.warn")  # as tests/test_terminal.py, + the source line a warning prints
TRACEBACK = "Traceback (most recent call last)"
INSTANT_S = 2.0
KEY = "probe-key"
CHROMIUM = "/usr/bin/chromium"

CLASSES = {
    1: "1 resume: kill during a checkpoint write",
    2: "2 resume: finished or nearly finished run",
    3: "3 review app: CSRF",
    4: "4 review app: ids out of range",
    5: "5 server: body limit, big prompts, bad requests",
    6: "6 server: client disconnect",
    7: "7 data: copies, duplicates, bad rows",
    8: "8 config errors",
    9: "9 order of checks",
    10: "10 terminal",
    11: "11 interrupts and chat",
    12: "12 packaged recipes, did-you-mean",
    13: "13 targets, styles, columns",
    14: "14 tracking",
    15: "15 report.html",
    16: "16 review app: progress, own reviews, tokens",
    17: "17 docs and split labels",
    18: "18 make quickstart",
}
ROWS: list[dict] = []


def record(item: int, check: str, good, detail: str) -> bool:
    ROWS.append({"class": CLASSES[item], "check": check, "good": bool(good), "detail": detail})
    print(f"[{'good' if good else 'NOT GOOD'}] {CLASSES[item]} | {check} | {detail}", flush=True)
    return bool(good)


def record_all(item: int, check: str, parts: list[tuple[str, bool, str]]) -> bool:
    """One check made of several tries of the same kind: good only when every one is; the detail
    gives each (those not good marked)."""
    return record(item, check, all(good for _, good, _ in parts),
                  "; ".join(f"{label}: {detail}{'' if good else ' [NOT GOOD]'}" for label, good, detail in parts))


# -- running tunelab ---------------------------------------------------------------------------

def shell_env(**extra) -> dict:
    """The environment of a shell: without the verbosity settings the test suite adds."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "WANDB_MODE")}
    env.pop("PYTHONWARNINGS", None)
    return {**env, **extra}


@dataclass
class Done:
    rc: int
    out: str
    err: str
    secs: float
    torch: bool | None  # torch imported (only known with importtime)

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_line(self, *names: str) -> str:
        """The first output line naming one of `names` (else the first `error` line, else the last line)."""
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        for name in names:
            for line in lines:
                if name in line:
                    return line[:300]
        for line in lines:
            if line.startswith("error") or ": error:" in line:
                return line[:300]
        return lines[-1][:300] if lines else "(no output)"

    def summary(self, *names: str) -> str:
        torch = "" if self.torch is None else (", torch imported" if self.torch else ", no torch")
        tb = ", TRACEBACK" if TRACEBACK in self.text else ""
        return f"rc={self.rc} {self.secs:.2f} s{torch}{tb}: {self.error_line(*names)}"


def tunelab(*args, cwd: Path, timeout: float = 300, importtime: bool = False, env: dict | None = None,
            merge: bool = False) -> Done:
    """`tunelab ARGS` to its end; `merge`: stderr into stdout, one stream in the order printed."""
    cmd = [PY, *(["-X", "importtime"] if importtime else []), "-m", "tunelab", *map(str, args)]
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                       text=True, timeout=timeout, env=env or shell_env())
    secs = time.perf_counter() - start
    lines = (p.stderr or "").splitlines()
    timed = [line for line in lines if line.startswith("import time:")]
    err = "\n".join(line for line in lines if not line.startswith("import time:"))
    torch = any(re.search(r"\|\s*torch$", line) for line in timed) if importtime else None
    return Done(p.returncode, p.stdout, err, secs, torch)


def spawn(*args, cwd: Path, log: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    """`tunelab ARGS` in the background, stdout and stderr into one file, in its own session."""
    f = open(log, "w")
    return subprocess.Popen([PY, "-m", "tunelab", *map(str, args)], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                            text=True, env=env or shell_env(), start_new_session=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}: no answer in {timeout} s")


def stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout: float = 20) -> float | None:
    """Send `sig` to a process this probe started; seconds until it exited (None: killed after `timeout`)."""
    start = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return time.perf_counter() - start
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def listing(folder: Path) -> dict | None:
    """Every file under `folder` with its size and modification time (None when absent)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# -- the world: a tiny model, the data, recipes ------------------------------------------------

class World:
    def __init__(self, root: Path):
        from tests.conftest import make_tiny_model
        from tunelab.data.synthetic import write_task
        from tunelab.models.build import load_tokenizer
        from tunelab.models.loading import ModelSource, resolve

        self.root = root
        (root / "runs").mkdir()
        self.tiny = root / "tiny"
        tokenizer = load_tokenizer(ModelSource(str(resolve("embedded").path)))
        make_tiny_model(tokenizer).save_pretrained(self.tiny)
        tokenizer.save_pretrained(self.tiny)
        # The same tokenizer, weights that cannot load: a run that reports a data problem with this
        # model checked the data before it loaded the model.
        self.broken = root / "tiny-broken-weights"
        shutil.copytree(self.tiny, self.broken)
        (self.broken / "model.safetensors").write_bytes(b"these are not safetensors" * 100)
        self.task = root / "task"
        write_task(self.task, seed=0)
        self.recipe = root / "tiny.yaml"
        self.recipe.write_text(
            f"model: {{name: {self.tiny}}}\n"
            f"data: {{format: custom, fields: {{messages: messages}}, source: {self.task}, max_length: 256,\n"
            "       max_train_samples: 16, max_eval_samples: 4}\n"
            "peft: {dropout: 0.1}\n"
            "train: {batch_size: 2, lr: 3.0e-3, max_steps: 6, save_every: 1, logging_steps: 2, eval_every: 6}\n"
            "eval: {generation_samples: 2, max_new_tokens: 4, metrics: [exact_match, rouge_l, rouge]}\n"
            "tracking: {report_to: [tensorboard]}\n")

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def train(self, name: str, *extra, timeout: float = 300, importtime: bool = False, merge: bool = False) -> Done:
        return tunelab("train", self.recipe, f"run.dir={self.run_dir(name)}", *extra, cwd=self.root,
                       timeout=timeout, importtime=importtime, merge=merge)

    def spawn_train(self, name: str, *extra) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        return spawn("train", self.recipe, f"run.dir={self.run_dir(name)}", *extra, cwd=self.root, log=log), log


# -- comparing a resumed run with the uninterrupted one ----------------------------------------

def same_end(run: Path, straight: Path) -> tuple[tuple[bool, str], tuple[bool, str]]:
    """((model, detail), (record, detail)): does `run` end as `straight` did — the trained model
    (adapter weights, step count), and the run's record (summary less the process numbers, the
    metrics.jsonl lines by step and keys in order, the logged losses, samples.jsonl)."""
    from safetensors.torch import load_file

    from tests.test_resume import _comparable, _metric_lines
    from tunelab.tracking.metrics import read_jsonl

    if not (run / "summary.json").is_file() or not (run / "adapter" / "adapter_model.safetensors").is_file():
        missing = (False, "no summary.json or adapter at the end")
        return missing, missing
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(straight / "adapter" / "adapter_model.safetensors")
    got, want = _comparable(run), _comparable(straight)
    steps = (got.get("train.steps"), want.get("train.steps"))
    if a.keys() != b.keys():
        model = (False, "adapter tensors differ by name")
    else:
        worst = max(float((a[n] - b[n]).abs().max()) for n in a)
        model = (worst <= 1e-5 and steps[0] == steps[1], f"steps {steps[0]} (uninterrupted {steps[1]}), adapter max |diff| {worst:.1e}")
    problems = []
    for key in sorted(set(got) | set(want)):
        g, w = got.get(key, "<missing>"), want.get(key, "<missing>")
        same = (abs(g - w) <= 1e-4 * max(abs(w), 1e-12)) if isinstance(w, float) and isinstance(g, (int, float)) else g == w
        if not same:
            problems.append(f"summary {key} {g:.6g} vs {w:.6g}" if isinstance(g, float) and isinstance(w, float)
                            else f"summary {key} {g} vs {w}")
    lines, straight_lines = _metric_lines(run), _metric_lines(straight)
    if lines != straight_lines:
        extra = [x for x in lines if lines.count(x) > straight_lines.count(x)]
        problems.append(f"metrics.jsonl {len(lines)} lines vs {len(straight_lines)}"
                        + (f" (one more at step {extra[0][0]}: {', '.join(k for k in extra[0][1] if k != 'step')[:70]})" if extra else ""))
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    want_losses = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    if len(losses) != len(want_losses) or any(abs(x - y) > 1e-4 * abs(y) for x, y in zip(losses, want_losses)):
        problems.append(f"logged losses (steps 2/4/6) {[round(x, 4) for x in losses]} vs {[round(x, 4) for x in want_losses]}")
    if (run / "samples.jsonl").read_text() != (straight / "samples.jsonl").read_text():
        problems.append("samples.jsonl differs")
    record_ = (not problems, "; ".join(problems) if problems else
               "summary, metrics.jsonl lines, logged losses and samples equal")
    return model, record_


def record_end(item: int, what: str, run: Path, straight: Path, resumed: Done, prefix: str = "") -> None:
    """Two checks: the resumed run's trained model, and its record, against the uninterrupted run."""
    if resumed.rc != 0:
        failed = (False, f"resume failed: {resumed.summary()}")
        model, record_ = failed, failed
    else:
        model, record_ = same_end(run, straight)
    record(item, f"{what}: the trained model (adapter weights, steps) equals the uninterrupted run's", model[0],
           prefix + model[1])
    record(item, f"{what}: the run's record (summary, metrics.jsonl, logged losses, samples) equals the uninterrupted run's",
           record_[0], record_[1])


def newest_complete(run: Path) -> str | None:
    done = [p for p in (run / "checkpoints").glob("checkpoint-*") if (p / "tunelab-checkpoint.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])).name if done else None


def cut_short(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*") if not (p / "tunelab-checkpoint.json").is_file())


def kill_when(proc: subprocess.Popen, sig, ready, timeout: float = 180, poll: float = 0.001):
    """Send `sig` to the process (group) as soon as `ready()` returns something true; returns it (None: never)."""
    start = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - start < timeout:
        hit = ready()
        if hit:
            os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
            return hit
        time.sleep(poll)
    return None


# ===============================================================================================
# Classes 1, 2, 9 (resume), 10, 11 (train's Ctrl-C), 14, 15: training runs on the tiny model

def training(w: World) -> None:
    straight_out = w.train("straight", merge=True)
    straight = w.run_dir("straight")
    if not record(10, "uninterrupted tiny run (6 steps, a checkpoint every step, a log every 2) completes",
                  straight_out.rc == 0 and (straight / "summary.json").is_file(),
                  f"rc={straight_out.rc} {straight_out.secs:.1f} s" + ("" if straight_out.rc == 0 else f": {straight_out.error_line()}")):
        return
    terminal(w, straight_out, straight)
    tracking(w, straight_out, straight)

    # 1. A real SIGKILL while a checkpoint folder exists without its marker (it is being written).
    proc, _ = w.spawn_train("kill-mid-checkpoint")
    run = w.run_dir("kill-mid-checkpoint")

    def partial():
        if not (run / "checkpoints").is_dir():
            return None
        return next((p.name for p in (run / "checkpoints").glob("checkpoint-*")
                     if int(p.name.split("-")[1]) >= 2 and not (p / "tunelab-checkpoint.json").exists()), None)

    caught = kill_when(proc, signal.SIGKILL, partial)
    proc.wait()
    state = f"SIGKILL while {caught} had no marker" if caught else f"the run ended (rc={proc.returncode}) before a partial checkpoint was seen"
    incomplete, complete = cut_short(run), newest_complete(run)
    resumed = w.train("kill-mid-checkpoint", "--resume")
    says = (f"resuming from {complete}" in resumed.text) and all(f"{c} was cut short" in resumed.text for c in incomplete)
    record(1, "real SIGKILL during a checkpoint write: --resume resumes from the newest complete checkpoint and says which",
           caught and resumed.rc == 0 and says,
           f"{state}; left: incomplete {incomplete or 'none'}, newest complete {complete}; resume rc={resumed.rc}: "
           f"{resumed.error_line('resuming from')}; {resumed.error_line('cut short')}" + ("" if says else " (the message does not name them)"))
    record_end(1, "after that kill", run, straight, resumed)

    # 1. Deterministic: a finished run whose newest checkpoint is incomplete (marker and optimizer state gone).
    run = w.run_dir("cut-short")
    first = w.train("cut-short")
    if first.rc == 0:
        shutil.rmtree(run / "adapter")
        (run / "summary.json").unlink()
        for name in ("tunelab-checkpoint.json", "optimizer.pt"):
            (run / "checkpoints" / "checkpoint-6" / name).unlink(missing_ok=True)
    resumed = w.train("cut-short", "--resume")
    says = "checkpoint-6 was cut short" in resumed.text and "resuming from checkpoint-5" in resumed.text
    record(1, "incomplete newest checkpoint-6 (no marker, no optimizer.pt): --resume says so and resumes from checkpoint-5",
           resumed.rc == 0 and says, resumed.summary("cut short", "resuming from"))
    record_end(1, "after resuming from checkpoint-5", run, straight, resumed)

    # 1. No complete checkpoint at all: a clear error, not a crash.
    (w.run_dir("no-complete") / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    done = w.train("no-complete", "--resume")
    record(1, "--resume with only a cut-short checkpoint: a one-line error saying no complete checkpoint",
           done.rc == 2 and "complete checkpoint" in done.text and TRACEBACK not in done.text,
           done.summary("complete checkpoint"))

    # 11 + 1. Ctrl-C mid-run: train's own message, then --resume ends as the uninterrupted run.
    proc, log = w.spawn_train("ctrl-c")
    run = w.run_dir("ctrl-c")
    sent = kill_when(proc, signal.SIGINT, lambda: (run / "checkpoints" / "checkpoint-3" / "tunelab-checkpoint.json").exists())
    took = stop(proc, signal.SIGINT, timeout=60) if sent else None
    text = log.read_text()
    said = next((line.strip() for line in reversed(text.splitlines()) if "--resume" in line or "interrupt" in line.lower()), "(no message)")
    record(11, "Ctrl-C in train: its own message (continue with --resume), exit 130, no traceback",
           sent and proc.returncode == 130 and "--resume" in text and TRACEBACK not in text,
           f"rc={proc.returncode}, exited {took if took is None else round(took, 1)} s after SIGINT: {said[:200]!r}")
    status = json.loads((run / "status.json").read_text()).get("state") if (run / "status.json").is_file() else None
    resumed = w.train("ctrl-c", "--resume")
    record_end(1, "after Ctrl-C at step 3", run, straight, resumed,
               prefix=f"status.json said {status!r}; {resumed.error_line('resuming from')}; ")

    # 2. A finished run with adapter/ and summary.json removed (as after a kill during the final save).
    run = w.run_dir("finished-stripped")
    w.train("finished-stripped")
    shutil.rmtree(run / "adapter", ignore_errors=True)
    (run / "summary.json").unlink(missing_ok=True)
    resumed = w.train("finished-stripped", "--resume")
    record_end(2, "finished run, adapter/ and summary.json removed, --resume", run, straight, resumed,
               prefix=f"{resumed.error_line('resuming from')}; ")

    # 2. --resume of a finished, intact run.
    run = w.run_dir("finished")
    w.train("finished")
    resumed = w.train("finished", "--resume")
    record_end(2, "finished, intact run, --resume", run, straight, resumed, prefix=f"{resumed.error_line('resuming from')}; ")

    # 2. A real SIGKILL right after the last checkpoint is complete (the final evaluation and save).
    proc, _ = w.spawn_train("kill-final-save")
    run = w.run_dir("kill-final-save")
    marker = run / "checkpoints" / "checkpoint-6" / "tunelab-checkpoint.json"
    killed = kill_when(proc, signal.SIGKILL, lambda: marker.exists() and
                       ("summary.json written" if (run / "summary.json").exists() else "before summary.json"))
    proc.wait()
    resumed = w.train("kill-final-save", "--resume")
    record(2, "real SIGKILL once checkpoint-6 is complete (final evaluation/save): --resume adds no step",
           killed and resumed.rc == 0 and "step 7" not in resumed.text
           and json.loads((run / "summary.json").read_text())["train"]["steps"] == 6 if (run / "summary.json").is_file() else False,
           f"killed {killed or 'never (the run ended first)'}; resume: {resumed.summary('resuming from')}")
    record_end(2, "after that kill", run, straight, resumed)

    # 9. A failed --resume (its data file is gone) leaves the run folder as it was.
    run = w.run_dir("ctrl-c")
    before, config = listing(run), (run / "config.yaml").read_text()
    done = w.train("ctrl-c", f"data.source={w.root / 'gone.jsonl'}", "--resume")
    record(9, "failed --resume (data file gone) leaves the run folder as it was (every file, size and mtime)",
           done.rc == 2 and listing(run) == before and (run / "config.yaml").read_text() == config,
           done.summary("gone.jsonl"))
    # 9. A new run into a folder that holds one is refused before the model loads, and the folder stays as it was.
    run = w.run_dir("straight")
    before = listing(run)
    done = w.train("straight", f"model.name={w.broken}", importtime=True)
    record(9, "a new run into a finished run's folder is refused before the model loads (weights that cannot load), "
              "folder unchanged", done.rc == 2 and "--resume" in done.text and "safetensors" not in done.text.lower()
           and listing(run) == before, done.summary("already"))


def terminal(w: World, done: Done, run: Path) -> None:
    noise = [n for n in NOISE if n in done.text]
    record(10, "train prints no library warnings or raw HF dicts by default", not noise,
           f"found {noise}" if noise else f"none of {len(NOISE)} markers in {len(done.text.splitlines())} lines")
    lines = [line for line in re.split(r"[\r\n]", done.out + "\n" + done.err) if line.strip()]
    first = lines[0] if lines else ""
    record(10, "the run folder is the first line printed", first.startswith("run folder: ") and first.rstrip().endswith(str(run)),
           f"first line: {first[:120]!r}")
    steps = re.findall(r"step (\d+)/6 +loss [\d.]+ +lr [\d.e+-]+ +[\d,]+ tok/s +ETA \d+:\d\d", done.text)
    record(10, "one formatted line per log step (step, loss, lr, tok/s, ETA): steps 2, 4, 6",
           steps == ["2", "4", "6"] and "{'loss'" not in done.text, f"formatted log lines at steps {steps}")


def tracking(w: World, done: Done, run: Path) -> None:
    say = f"TensorBoard: {run / 'tensorboard'}"
    record(14, "TensorBoard files in <run>/tensorboard, and the terminal says where (not checkpoints/runs/...)",
           say in done.text and (run / "tensorboard").is_dir() and not (run / "checkpoints" / "runs").exists(),
           f"said: {done.error_line('TensorBoard')!r}; checkpoints/runs exists: {(run / 'checkpoints' / 'runs').exists()}")
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
        events.Reload()
        tags = events.Tags()
        texts = {t.removesuffix("/text_summary") for t in tags["tensors"]}
        good = {"results/before_after", "results/samples"} <= texts and "train/loss" in tags["scalars"]
        detail = f"text tags {sorted(texts)}; scalars {len(tags['scalars'])} incl. train/loss: {'train/loss' in tags['scalars']}"
    except Exception as err:  # noqa: BLE001 - reported as the check's detail
        good, detail = False, f"could not read the event files: {err}"
    record(14, "TensorBoard gets the before/after table and the sample generations too", good, detail)
    summary = json.loads((run / "summary.json").read_text())
    names = sorted(set(summary["eval"]["before"]) | set(summary["eval"]["after"]))
    from tunelab.tracking.metrics import read_jsonl

    logged = sorted({k for r in read_jsonl(run / "metrics.jsonl") for k in r})
    odd = [n for n in names + logged if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", n)]
    record(14, "metric names in one style (snake_case) in summary.json and metrics.jsonl, eval.metrics incl. rouge",
           not odd, f"odd names: {odd}" if odd else f"summary: {', '.join(names)}; {len(logged)} metrics.jsonl keys all snake_case")

    html = (run / "report.html").read_text()
    heads = [m.start() for m in re.finditer(r"<h2", html)]
    ba = html.find("Before / after")
    record(15, "report.html: the before/after table comes before every other section",
           ba >= 0 and all(ba < h for h in heads if html[h:h + 80].find("Before / after") < 0),
           f"'Before / after' at {ba}, {len(heads)} <h2> sections, first at {heads[0] if heads else None}")
    lr_plot, plots = 'alt="learning_rate"' in html, html.count('src="data:image/png;base64,')
    record(15, "report.html: a learning-rate plot", lr_plot, f"learning_rate plot: {lr_plot}; {plots} embedded plots")
    turns = len(re.findall(r'<div class="turn (user|system)">', html))
    record(15, "report.html: sample prompts as a conversation, no raw <|im_start|> markers",
           "im_start" not in html and turns >= 2, f"turn blocks: {turns}; 'im_start' in page: {'im_start' in html}")


# ===============================================================================================
# Class 8: config errors; 12: recipes and did-you-mean

def config_errors(w: World) -> None:
    latin1 = w.root / "latin1.yaml"
    latin1.write_bytes("train:\n  lr: 1.0e-4  # caf\xe9\n".encode("latin-1"))
    broken = w.root / "broken.yaml"
    broken.write_text("train: {lr: [1,\n")
    listed = w.root / "list.yaml"
    listed.write_text("- train\n- model\n")
    r = w.recipe
    cases = [
        ("malformed override 'train.lr=[1,'", ["train", r, "train.lr=[1,"], ["train.lr"]),
        ("Latin-1 recipe names the file and the encoding", ["train", latin1], ["latin1.yaml", "UTF-8"]),
        ("train.optim=bogus_opt fails validation naming train.optim", ["train", r, "train.optim=bogus_opt"], ["train.optim", "bogus_opt"]),
        ("unknown key train.epoks: did you mean train.epochs", ["train", r, "train.epoks=2"], ["train.epoks", "did you mean train.epochs"]),
        ("unknown section trian.lr: did you mean train", ["train", r, "trian.lr=1"], ["trian", "did you mean train"]),
        ("missing recipe nope.yaml names it", ["train", "nope.yaml"], ["nope.yaml", "no such file"]),
        ("override without '=' names it", ["train", r, "train.lr"], ["'train.lr'", "key.sub=value"]),
        ("two errors reported together", ["train", r, "data.batching=pack", "train.epoks=2"], ["data.batching", "train.epoks"]),
        ("bad value data.bad_rows=maybe lists the allowed values", ["train", r, "data.bad_rows=maybe"], ["data.bad_rows", "'error'"]),
        ("misspelt value data.format=samsun names data.format", ["train", r, "data.format=samsun", f"run.dir={w.root / 'never'}"],
         ["data.format", "samsun"]),
    ]
    groups = [
        ("recipe files that are not YAML mappings (a syntax error; a list) name the file",
         [("syntax error", ["train", broken], ["broken.yaml", "YAML"]), ("a list", ["train", listed], ["list.yaml"])]),
        ("the other training commands' config errors",
         [("dpo train.optim=bogus_opt", ["dpo", "dpo", "train.optim=bogus_opt"], ["train.optim"]),
          ("reward train.epoks=1", ["reward", "reward", "train.epoks=1"], ["train.epoks"]),
          ("kfold 'train.lr=[1,'", ["kfold", r, "--folds", "3", "train.lr=[1,"], ["train.lr"]),
          ("quickstart 'train.epochs=[2'", ["quickstart", "train.epochs=[2"], ["train.epochs"]),
          ("eval limt=3 (did you mean limit)", ["eval", w.tiny, "limt=3"], ["limt", "did you mean limit"])]),
    ]

    def one(args, needles) -> tuple[bool, str]:
        done = tunelab(*args, cwd=w.root, importtime=True)
        good = (done.rc == 2 and all(n in done.text for n in needles) and TRACEBACK not in done.text
                and done.secs < INSTANT_S and not done.torch)
        return good, done.summary(*needles)

    suffix = f": instant (< {INSTANT_S:.0f} s, no torch), names it, no traceback"
    for name, args, needles in cases:
        record(8, name + suffix, *one(args, needles))
    for name, tries in groups:
        record_all(8, name + suffix, [(label, *one(args, needles)) for label, args, needles in tries])
    record(9, "a config error leaves no run folder (data.format=samsun)", not (w.root / "never").exists(),
           f"{w.root / 'never'} exists: {(w.root / 'never').exists()}")


def recipes_and_names(w: World) -> None:
    done = tunelab("--help", cwd=w.root)
    record(12, "tunelab --help works (lists the commands)", done.rc == 0 and "train" in done.out and TRACEBACK not in done.text,
           done.summary("usage", "Error"))
    done = tunelab("train", "--help", cwd=w.root)
    record(12, "tunelab train --help lists the packaged recipes", done.rc == 0 and "quickstart" in done.out and "samsum-lora" in done.out,
           done.summary("packaged", "quickstart"))
    done = tunelab("train", "samsum-lora", "train.epoks=1", cwd=w.root, importtime=True)
    record(12, "packaged recipe by name (train samsum-lora): found; the error is the override's, not 'no such file'",
           done.rc == 2 and "train.epoks" in done.text and "no such file" not in done.text and not done.torch,
           done.summary("train.epoks", "no such"))
    done = tunelab("data", "inspect", "quickstart", f"model.name={w.tiny}", "--n", "1", cwd=w.root)
    record(12, "packaged recipe by name runs: data inspect quickstart (tiny tokenizer)", done.rc == 0 and TRACEBACK not in done.text,
           f"rc={done.rc} {done.secs:.1f} s: {done.error_line('samples', 'checks', 'error')[:160]}")
    done = tunelab("train", "quikstart", cwd=w.root, importtime=True)
    record(12, "misspelt packaged recipe: did you mean quickstart", done.rc == 2 and "did you mean quickstart" in done.text,
           done.summary("did you mean"))
    done = tunelab("trian", "x", cwd=w.root)
    record(12, "misspelt command: did you mean train", done.rc == 2 and "did you mean train" in done.text, done.summary("did you mean"))
    done = tunelab("review", "add-tsk", cwd=w.root)
    record(12, "misspelt review subcommand: did you mean add-task", done.rc == 2 and "did you mean add-task" in done.text,
           done.summary("did you mean", "invalid choice"))
    done = tunelab("generate", w.tiny, "--style", "groundd", "--prompt", "hi", cwd=w.root, importtime=True)
    record(12, "misspelt style: did you mean grounded, before the model loads", done.rc == 2 and "did you mean grounded" in done.text
           and not done.torch, done.summary("did you mean"))
    done = tunelab("eval", w.tiny, "--tasks", "rouge,perplexety", cwd=w.root, importtime=True)
    record(12, "misspelt task: did you mean perplexity, before the model loads", done.rc == 2 and "did you mean perplexity" in done.text
           and not done.torch, done.summary("did you mean"))


# ===============================================================================================
# Class 9: order of checks (with weights that cannot load); 7: data; 13: targets, styles, columns

def order_and_data(w: World) -> None:
    def broken_run(name: str, *extra) -> tuple[Done, Path]:
        run = w.root / "runs" / name
        return tunelab("train", w.recipe, f"model.name={w.broken}", f"run.dir={run}", *extra, cwd=w.root), run

    done, run = broken_run("control")
    record(9, "control: with good data, the broken weights do fail the run (so the checks below are meaningful)",
           done.rc != 0 and ("safetensors" in done.text.lower() or "model" in done.error_line().lower()),
           done.summary("safetensors", "model"))
    record(13, "a model folder whose weights cannot be read: a one-line error naming the folder, no traceback",
           done.rc == 2 and str(w.broken) in done.text and TRACEBACK not in done.text, done.summary(str(w.broken), "safetensors"))
    record(9, "a run that fails while loading the model leaves no run folder", not run.exists(),
           f"{run.name} exists: {run.exists()}" + (f" with {sorted(p.name for p in run.iterdir())}" if run.exists() else ""))

    data = w.root / "badrow"
    data.mkdir()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (data / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"messages": "not a list"}) + "\n"
                                      + json.dumps(good) + "\n")
    done, run = broken_run("badrow", f"data.source={data}")
    record(9, "a bad row stops the run before the model loads; no run folder left",
           done.rc == 2 and "train.jsonl:2" in done.text and "safetensors" not in done.text.lower() and not run.exists(),
           done.summary("train.jsonl:2") + f"; folder left: {run.exists()}")
    record(7, "a bad row is named as file:line: field", re.search(r"train\.jsonl:2: .*messages", done.text) is not None,
           done.error_line("train.jsonl:2"))

    done, run = broken_run("missing", f"data.source={w.root / 'nowhere.jsonl'}")
    record(9, "a missing data source fails before the model loads, naming the path; no run folder",
           done.rc == 2 and "nowhere.jsonl" in done.text and "safetensors" not in done.text.lower() and not run.exists(),
           done.summary("nowhere"))

    csv = w.root / "wrong.csv"
    csv.write_text("id,text,label\n1,hello,x\n2,bye,y\n")
    done, run = broken_run("csv", f"data.source={csv}", "data.format=samsum", "data.fields=null")
    record(9, "a CSV with the wrong columns fails before the model loads; no run folder",
           done.rc == 2 and "safetensors" not in done.text.lower() and not run.exists(), done.summary("columns"))
    record(13, "a CSV with the wrong columns lists its actual columns (no data.bad_rows=skip advice)",
           "id, text, label" in done.text and "bad_rows" not in done.text, done.error_line("columns"))

    done, run = broken_run("format", "data.format=samsum", "data.fields=null")
    record(9, "rows that do not fit the format (samsum on chat rows) fail before the model loads, naming the field",
           done.rc == 2 and "dialogue" in done.text and "safetensors" not in done.text.lower() and not run.exists(),
           done.summary("dialogue"))

    done, run = broken_run("template", f"model.chat_template={w.root / 'nope.jinja'}")
    record(9, "a missing chat template file fails before the model loads, naming it",
           done.rc == 2 and "nope.jinja" in done.text and "safetensors" not in done.text.lower() and not run.exists(),
           done.summary("nope.jinja"))

    # 7. Copies and duplicates, through `tunelab data prepare` (tokenizer only) and train.
    base = [f"model.name={w.tiny}", "data.format=custom", "data.fields={messages: messages}", "data.max_length=256"]
    dup = w.root / "dup"
    dup.mkdir()
    for name in ("train.jsonl", "train_copy.jsonl"):
        shutil.copy(w.task / "train.jsonl", dup / name)
    shutil.copy(w.task / "validation.jsonl", dup / "validation.jsonl")
    done = tunelab("data", "prepare", "custom-lora", *base, f"data.source={dup}", cwd=w.root)
    record(7, "a folder with train.jsonl and an identical train_copy.jsonl is refused, naming both and data.splits",
           done.rc == 2 and "train_copy.jsonl" in done.text and "data.splits" in done.text, done.summary("train_copy"))
    done = tunelab("data", "prepare", "custom-lora", *base, f"data.source={dup}",
                   "data.splits={train: [train.jsonl, train_copy.jsonl], validation: [validation.jsonl]}", cwd=w.root)
    record(7, "listed explicitly, both files are used and the duplicates are counted and warned about",
           done.rc == 0 and re.search(r"\d+ of \d+ train samples are exact duplicates", done.text) is not None,
           f"rc={done.rc}: {done.error_line('exact duplicates of others')}")
    same = w.root / "same"
    same.mkdir()
    shutil.copy(w.task / "train.jsonl", same / "train.jsonl")
    shutil.copy(w.task / "train.jsonl", same / "validation.jsonl")
    done = tunelab("train", w.recipe, f"data.source={same}", f"run.dir={w.run_dir('same')}", "train.max_steps=1",
                   "train.save_every=null", "train.eval_every=null", "tracking.report_to=[]", cwd=w.root)
    stats = json.loads((w.run_dir("same") / "summary.json").read_text())["data"]["duplicates"] \
        if (w.run_dir("same") / "summary.json").is_file() else {}
    record(7, "identical train and validation files: train warns (every validation sample is in train) and counts it",
           "are the two files the same?" in done.text and stats.get("validation_in_train", 0) > 0,
           f"rc={done.rc}: {done.error_line('also appear in train')}; summary duplicates {stats}")

    bad_json = w.root / "badjson"
    bad_json.mkdir()
    (bad_json / "train.jsonl").write_text(json.dumps(good) + "\n{\"messages\": [oops\n")
    done = tunelab("data", "prepare", "custom-lora", *base, f"data.source={bad_json}", cwd=w.root)
    record(7, "a line that is not JSON is named as file:line", done.rc == 2 and "train.jsonl:2" in done.text,
           done.summary("train.jsonl:2"))
    csv = w.root / "emptyfield.csv"
    csv.write_text("dialogue,summary\nA: hi,greeting\nB: bye,\n")
    done = tunelab("data", "prepare", "custom-lora", f"model.name={w.tiny}", "data.format=samsum", "data.fields=null",
                   f"data.source={csv}", cwd=w.root)
    record(7, "a CSV row with an empty field is named as file:line: field",
           done.rc == 2 and re.search(r"emptyfield\.csv:3: .*summary", done.text) is not None, done.summary("emptyfield.csv"))
    alpaca = Path("/work/shared/data/alpaca")
    if alpaca.exists():
        done = tunelab("data", "prepare", "alpaca-full", f"model.name={w.tiny}", f"data.source={alpaca}",
                       "data.bad_rows=error", cwd=w.root)  # the recipe skips them
        record(7, "the real Alpaca file's empty outputs are named as file:line: field",
               done.rc == 2 and re.search(r"alpaca_data_en\.jsonl:\d+: .*output", done.text) is not None,
               done.summary("alpaca_data_en.jsonl"))


def targets_and_styles(w: World) -> None:
    (w.root / "runs").mkdir(exist_ok=True)
    parts = []
    for args, needle in [(["generate", "runs/nope", "--prompt", "hi"], "runs/nope"), (["chat", "./nope"], "./nope"),
                         (["serve", "runs/nope/adapter"], "runs/nope/adapter")]:
        done = tunelab(*args, cwd=w.root, importtime=True)
        parts.append((" ".join(args[:2]), done.rc == 2 and "no such folder" in done.text and "huggingface" not in done.text.lower()
                      and TRACEBACK not in done.text, done.summary("no such", needle)))
    record_all(13, "generate/chat/serve on a path-like target that does not exist: 'no such folder', no Hub talk", parts)
    done = tunelab("eval", "runs/nope", cwd=w.root, importtime=True)
    record(13, "eval runs/nope (path-like, missing): 'no such folder', no Hub talk",
           done.rc == 2 and "no such folder" in done.text and "huggingface" not in done.text.lower()
           and TRACEBACK not in done.text, done.summary("no such", "runs/nope"))
    parts = []
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        done = tunelab(command[0], w.tiny, *command[1:], "--style", "grounded", cwd=w.root, importtime=True)
        parts.append((command[0], done.rc == 2 and "--context" in done.text and not done.torch and done.secs < INSTANT_S,
                      done.summary("--context")))
    record_all(13, "generate and chat --style grounded without --context fail before the model loads", parts)
    prompts = w.root / "prompts.jsonl"
    prompts.write_text('{"prompt": "a?", "context": "A."}\n{"prompt": "b?"}\n')
    done = tunelab("generate", w.tiny, "--input", prompts, "--style", "grounded", cwd=w.root, importtime=True)
    record(13, "a prompts file row missing the context its style needs is named file:line, before the model",
           done.rc == 2 and "prompts.jsonl:2" in done.text and not done.torch, done.summary("prompts.jsonl:2"))
    context = w.root / "context.txt"
    context.write_bytes("Caf\xe9 opens at 9.".encode("latin-1"))
    done = tunelab("generate", w.tiny, "--style", "grounded", "--context", context, "--prompt", "When?", cwd=w.root,
                   importtime=True)
    record(13, "a Latin-1 --context file names the file and the encoding, before the model",
           done.rc == 2 and "context.txt" in done.text and "UTF-8" in done.text and not done.torch, done.summary("context.txt"))


# ===============================================================================================
# Classes 5, 6, 10, 11: `tunelab serve` and `tunelab chat`

def _words(n: int) -> str:
    return ("plan a picnic for four people on a sunny day " * (n // 45 + 1))[:n]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _openai_error(r: httpx.Response) -> bool:
    try:
        body = r.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]


def server(w: World) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = w.root / "serve.log"
    proc = spawn("serve", w.tiny, "--port", port, "--api-key", KEY, "--max-new-tokens", "8", "--kv-budget-tokens", "4096",
                 cwd=w.root, log=log)
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = f"{base}/v1/chat/completions"
    messages = [{"role": "user", "content": "Plan a picnic for four people."}]
    try:
        started = wait_http(f"{base}/health", proc)
        noise = [n for n in NOISE if n in log.read_text()]
        record(10, "serve starts without library warnings", not noise, f"up in {started:.1f} s; " + (f"found {noise}" if noise else
               f"printed: {log.read_text().strip().splitlines()[-1][:120]!r}"))

        # 5. Body limit: declared and streamed, before the body is read.
        rss0, t0 = _rss_mb(proc.pid), time.perf_counter()
        big = json.dumps({"model": str(w.tiny), "messages": [{"role": "user", "content": _words(20 * 2**20)}]}).encode()
        try:
            r = httpx.post(chat, content=big, headers={**auth, "Content-Type": "application/json"}, timeout=120)
            status, code = r.status_code, (r.json().get("error", {}).get("code") if _openai_error(r) else r.text[:60])
        except httpx.HTTPError as err:  # a server that closes early without an answer
            status, code = type(err).__name__, ""
        took, grew = time.perf_counter() - t0, _rss_mb(proc.pid) - rss0
        record(5, "a 20 MB chat body (Content-Length) is refused with 413 at once; RSS grows < 64 MiB",
               status == 413 and took < 5 and grew < 64, f"{status} {code} in {took:.2f} s, RSS {rss0:.0f} -> {rss0 + grew:.0f} MB")
        body = json.dumps({"model": str(w.tiny), "prompt": _words(2 * 2**20)}).encode()
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{base}/v1/completions", content=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                           headers={**auth, "Content-Type": "application/json"}, timeout=120)
            status = r.status_code
        except httpx.HTTPError as err:
            status = type(err).__name__
        record(5, "a 2 MB completions body sent chunked (no length) is refused with 413", status == 413,
               f"{status} in {time.perf_counter() - t0:.2f} s")

        # 5. /health while ten prompts just under the limit are tokenized.
        def post_big(i: int) -> tuple[float, int]:
            start = time.perf_counter()
            b = {"model": str(w.tiny), "messages": [{"role": "user", "content": f"{i} " + _words(250_000)}]}
            r = httpx.post(chat, json=b, headers=auth, timeout=300)
            return time.perf_counter() - start, r.status_code

        with ThreadPoolExecutor(10) as pool:
            work = [pool.submit(post_big, i) for i in range(10)]
            latencies = []
            while not all(f.done() for f in work):
                start = time.perf_counter()
                ok = httpx.get(f"{base}/health", timeout=120).status_code == 200
                latencies.append((time.perf_counter() - start) if ok else float("inf"))
                time.sleep(0.02)
            results = [f.result() for f in work]
        took = max(t for t, _ in results)
        codes = Counter(c for _, c in results)
        latencies = latencies or [float("inf")]
        record(5, "/health stays responsive while 10 x 250 kB prompts are tokenized (max latency < half their time)",
               max(latencies) < took / 2 and len(latencies) >= 3,
               f"prompts took {took:.2f} s (answers {dict(codes)}); /health max {max(latencies) * 1000:.0f} ms, "
               f"p50 {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms over {len(latencies)} probes")
        record(5, "prompts over the model's context answer 400 context_length_exceeded (not 5xx)", set(codes) == {400},
               f"status codes {dict(codes)}")

        # 5. Bad requests: 4xx with OpenAI's error body, never 5xx.
        model = str(w.tiny)
        jsonct = {**auth, "Content-Type": "application/json"}
        bad = {
            "bodies that are not a request": [
                ("invalid JSON", dict(content=b'{"model": "x", "messages": [', headers=jsonct)),
                ("empty body", dict(content=b"", headers=jsonct)),
                ("a JSON list", dict(json=[1, 2], headers=auth))],
            "no or a wrong API key, an unknown model": [
                ("wrong key", dict(json={"model": model, "messages": messages}, headers={"Authorization": "Bearer nope"})),
                ("no key", dict(json={"model": model, "messages": messages})),
                ("unknown model", dict(json={"model": "no-such-model", "messages": messages}, headers=auth))],
            "invalid fields": [
                ("messages missing", dict(json={"model": model}, headers=auth)),
                ("messages a string", dict(json={"model": model, "messages": "hi"}, headers=auth)),
                ("role 'wizard'", dict(json={"model": model, "messages": [{"role": "wizard", "content": "hi"}]}, headers=auth)),
                ("content a number", dict(json={"model": model, "messages": [{"role": "user", "content": 5}]}, headers=auth)),
                ("max_tokens -1", dict(json={"model": model, "messages": messages, "max_tokens": -1}, headers=auth)),
                ("temperature 'hot'", dict(json={"model": model, "messages": messages, "temperature": "hot"}, headers=auth)),
                ("top_p 7", dict(json={"model": model, "messages": messages, "top_p": 7}, headers=auth)),
                ("n 1000", dict(json={"model": model, "messages": messages, "n": 1000}, headers=auth))],
        }
        for group, tries in bad.items():
            parts = []
            for name, kwargs in tries:
                try:
                    r = httpx.post(chat, timeout=60, **kwargs)
                    shaped = _openai_error(r)
                    status, code = r.status_code, (r.json()["error"].get("code") if shaped else r.text[:60])
                except httpx.HTTPError as err:
                    status, shaped, code = type(err).__name__, False, ""
                parts.append((name, isinstance(status, int) and 400 <= status < 500 and shaped, f"{status} {code}"))
            record_all(5, f"bad requests ({group}): 4xx with an OpenAI error body, never 5xx", parts)
        parts = []
        for name, method, url in [("GET on the chat route", "GET", chat), ("POST /v1/nope", "POST", f"{base}/v1/nope")]:
            r = httpx.request(method, url, headers=auth, timeout=30)
            parts.append((name, 400 <= r.status_code < 500, str(r.status_code)))
        record_all(5, "a wrong method or route: 4xx", parts)
        r = httpx.post(chat, json={"model": model, "messages": messages, "max_tokens": 4}, headers=auth, timeout=60)
        record(5, "after all that, a normal chat request is answered", r.status_code == 200 and r.json().get("choices"),
               f"{r.status_code}, {r.json().get('usage') if r.status_code == 200 else r.text[:80]}")

        # 6. A client that hangs up: the engine stops generating for it.
        disconnects(base, auth, model, messages, port)
    finally:
        took = stop(proc, signal.SIGINT)
        text = log.read_text()
        tail = [line for line in text.splitlines() if line.strip()][-1:] or ["(nothing)"]
        record(11, "Ctrl-C in serve: exits promptly, no traceback, its own message (not train's --resume)",
               took is not None and TRACEBACK not in text and "--resume" not in text and "server stopped" in text,
               f"rc={proc.returncode} after {took if took is None else round(took, 1)} s; last line: {tail[0][:160]!r}")


def disconnects(base: str, auth: dict, model: str, messages: list, port: int) -> None:
    def metrics() -> dict:
        return httpx.get(f"{base}/metrics", headers=auth, timeout=30).json()

    for streaming in (False, True):
        before = metrics()["tokens_generated"]
        body = json.dumps({"model": model, "messages": messages, "max_tokens": 1900, "temperature": 0,
                           "stream": streaming}).encode()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.time() + 60
            while metrics()["tokens_generated"] < before + 20 and time.time() < deadline:
                time.sleep(0.01)
            at_hangup = metrics()["tokens_generated"] - before
        gone, idle_at = time.perf_counter(), None
        while time.perf_counter() - gone < 30:
            m = metrics()
            if m["requests_in_flight"] == 0 and m["kv"]["running"] == 0:
                idle_at = time.perf_counter() - gone
                break
            time.sleep(0.02)
        time.sleep(0.3)
        generated = metrics()["tokens_generated"] - before
        kind = "streaming" if streaming else "non-streaming"
        record(6, f"{kind} client hangs up after ~20 tokens of 1900: generation stops within 2 s",
               idle_at is not None and idle_at < 2.0 and generated < 1900 // 2,
               f"{at_hangup} tokens at the hang-up; idle {idle_at if idle_at is None else round(idle_at, 2)} s later; "
               f"{generated} of 1900 generated")


def chat(w: World) -> None:
    env = shell_env(TUNELAB_CACHE=str(w.root / "cache"))  # the chat history goes there, not into the user's cache
    proc = subprocess.Popen([PY, "-m", "tunelab", "chat", str(w.tiny), "--max-new-tokens", "4"], cwd=w.root,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    out, err = [], []
    threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True).start()
    threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True).start()

    def wait_for(n_prompts: int, timeout: float = 120) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if "".join(out).count("you> ") >= n_prompts:
                return True
            time.sleep(0.05)
        return False

    ready = wait_for(1)
    for n, line in enumerate(("/help", "/hepl", "hello there"), 2):
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        wait_for(n)
    shown = "".join(out)
    record(11, "chat /help lists its commands", "/style" in shown and "/reset" in shown and "/exit" in shown,
           f"started: {ready}; /help shows /style, /reset, /exit: {all(c in shown for c in ('/style', '/reset', '/exit'))}")
    record(11, "chat: a misspelt /command suggests the near one", "did you mean /help" in shown,
           next((line for line in shown.splitlines() if "unknown command" in line), "(no such line)")[:160])
    record(11, "chat answers a message (model> ...)", "model> " in shown, f"model> lines: {shown.count('model> ')}")
    took = stop(proc, signal.SIGINT)
    time.sleep(0.2)
    text = "".join(out) + "".join(err)
    tail = "".join(err).strip().splitlines()[-1:] or ["(nothing on stderr)"]
    record(11, "Ctrl-C in chat: its own message (not train's --resume), exit 130, no traceback",
           proc.returncode == 130 and "--resume" not in text and "tunelab train" not in text and TRACEBACK not in text,
           f"rc={proc.returncode} after {took if took is None else round(took, 1)} s; stderr: {tail[0][:120]!r}")


# ===============================================================================================
# Classes 3, 4, 16: the review app (`tunelab review ...`, HTTP, Chromium)

def review(w: World) -> None:
    from tests.review_support import csrf_of, import_rows, write_jsonl

    db = w.root / "review.db"
    url_db = f"sqlite:///{db}"
    steps = [tunelab("review", "init", "--db", url_db, "--per-item", "2", cwd=w.root)]
    tokens = {}
    for name in ("r0", "r1", "r2"):
        done = tunelab("review", "add-reviewer", "--db", url_db, name, *(["--admin"] if name == "r0" else []), cwd=w.root)
        steps.append(done)
        tokens[name] = done.out.strip().splitlines()[-1] if done.rc == 0 else ""
    rows = write_jsonl(w.root / "import.jsonl", import_rows(3, 3))
    steps.append(tunelab("review", "add-task", "--db", url_db, "--import", rows, cwd=w.root))
    if any(s.rc for s in steps):
        record(16, "review project set up with the CLI", False, "; ".join(s.summary() for s in steps if s.rc))
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = w.root / "review.log"
    proc = spawn("review", "serve", "--db", url_db, "--port", port, cwd=w.root, log=log)
    try:
        wait_http(f"{url}/login", proc)

        def signed_in(token: str) -> tuple[httpx.Client, str]:
            client = httpx.Client(base_url=url, timeout=60, headers={"Origin": url})
            login = csrf_of(client.get("/login").text)
            client.post("/login", data={"token": token, "csrf": login})
            return client, csrf_of(client.get("/").text)

        def rankings() -> int:
            with sqlite3.connect(db) as conn:
                return conn.execute("select count(*) from rankings").fetchone()[0]

        def assignments() -> int:
            with sqlite3.connect(db) as conn:
                return conn.execute("select count(*) from assignments").fetchone()[0]

        csrf_checks(w, url, signed_in, tokens, assignments)
        ids_checks(url, signed_in, tokens)
        progress_checks(w, url, url_db, signed_in, tokens)
        browser_checks(url, tokens, rankings)
    finally:
        took = stop(proc, signal.SIGINT)
        text = log.read_text()
        tail = [line for line in text.splitlines() if line.strip()][-1:] or ["(nothing)"]
        record(11, "Ctrl-C in review serve: exits promptly, no traceback, says it stopped",
               took is not None and TRACEBACK not in text and "stopped" in tail[0],
               f"rc={proc.returncode} after {took if took is None else round(took, 1)} s; last line: {tail[0][:120]!r}")


def csrf_checks(w, url, signed_in, tokens, assignments) -> None:
    from tests.review_support import csrf_of

    victim, good = signed_in(tokens["r1"])
    _, other = signed_in(tokens["r2"])
    before = assignments()
    attempts = [
        ("no CSRF token (same Origin)", {"Origin": url}, None),
        ("the right token, Origin another port of 127.0.0.1", {"Origin": "http://127.0.0.1:9999"}, good),
        ("the right token, Origin null", {"Origin": "null"}, good),
        ("the right token, a foreign Referer and no Origin", {"Referer": "http://127.0.0.1:9999/x"}, good),
        ("the right token, neither Origin nor Referer", {}, good),
        ("another reviewer's token", {"Origin": url}, other),
        ("a made-up token", {"Origin": url}, "x" * 43),
    ]
    parts = []
    for name, headers, token in attempts:  # a bare request: only these headers and the victim's cookies
        r = httpx.post(f"{url}/next", data={"csrf": token} if token else {}, headers=headers, cookies=victim.cookies,
                       timeout=30)
        parts.append((name, r.status_code == 403, str(r.status_code)))
    record_all(3, "signed in, POST /next from another origin (other port, null, foreign Referer, no header): refused 403",
               parts[1:5])
    record_all(3, "signed in, POST /next from this origin without this session's CSRF token (none, another "
                  "reviewer's, made up): refused 403", [parts[0], *parts[5:]])
    record(3, "... and none of them claimed an item", assignments() == before, f"assignments {before} -> {assignments()}")
    r = victim.post("/next", data={"csrf": good})
    record(3, "the reviewer's own form (token + same Origin) goes through (so the refusals are not blanket)",
           r.status_code == 303, f"{r.status_code} -> {r.headers.get('location')}")
    anon = httpx.Client(base_url=url, timeout=30)
    login = csrf_of(anon.get("/login").text)
    for name, headers, token in [("from another port", {"Origin": "http://127.0.0.1:9999"}, login),
                                 ("without the login form's token", {"Origin": url}, "")]:
        r = anon.post("/login", data={"token": tokens["r2"], "csrf": token}, headers=headers)
        record(3, f"login CSRF: POST /login {name} is refused and sets no session", r.status_code == 403
               and "tunelab_review" not in r.cookies, f"{r.status_code}, session cookie set: {'tunelab_review' in r.cookies}")


def ids_checks(url, signed_in, tokens) -> None:
    admin, token = signed_in(tokens["r0"])
    for what, ids in [("too large for 64 bits", ("99999999999999999999999", str(2 ** 63))),
                      ("not ids", ("-1", "abc", "1e3")), ("in range but unknown", ("999999",))]:
        parts = []
        for aid in ids:
            got = admin.get(f"/assignments/{aid}").status_code
            posted = admin.post(f"/assignments/{aid}", data={"csrf": token}).status_code
            parts.append((aid, got == 404 and posted == 404, f"GET {got}, POST {posted}"))
        record_all(4, f"GET and POST /assignments/ID with IDs {what}: 404, never 500", parts)


def progress_checks(w, url, url_db, signed_in, tokens) -> None:
    from tests.review_support import csrf_of

    r0, token = signed_in(tokens["r0"])
    first = r0.post("/next", data={"csrf": token}).headers.get("location", "")
    page = r0.get(first).text if first.startswith("/assignments/") else ""
    m = re.search(r"item (\d+) of (\d+)", page)
    record(16, "the reviewer sees 'item k of n'", m is not None and m.group(1) == "1", f"{m.group(0) if m else 'no progress line'} on {first}")
    names = re.findall(r'name="(rank_\d+)"', page)
    saved = r0.post(first, data={**{n: str(i) for i, n in enumerate(names, 1)}, "csrf": csrf_of(page)})
    second = saved.headers.get("location", "")
    m2 = re.search(r"item (\d+) of (\d+)", r0.get(second).text) if second.startswith("/assignments/") else None
    record(16, "after one review, the next page says 'item 2 of n'", m2 is not None and m2.group(1) == "2",
           f"{saved.status_code} -> {second}: {m2.group(0) if m2 else 'no progress line'}")
    listed = r0.get("/reviews")
    edit = r0.get(first).text
    in_list, editable = f'href="{first}"' in listed.text, "Save changes" in edit
    record(16, "their past reviews are listed and open for editing until the item closes",
           listed.status_code == 200 and in_list and editable,
           f"/reviews {listed.status_code}, lists {first}: {in_list}; edit form: {editable}")
    done = tunelab("review", "reissue-token", "--db", url_db, "r1", cwd=w.root)
    new = done.out.strip().splitlines()[-1] if done.rc == 0 else ""
    anon = httpx.Client(base_url=url, timeout=30, headers={"Origin": url})
    login = csrf_of(anon.get("/login").text)
    old_status = anon.post("/login", data={"token": tokens["r1"], "csrf": login}).status_code
    anon2 = httpx.Client(base_url=url, timeout=30, headers={"Origin": url})
    login = csrf_of(anon2.get("/login").text)
    new_status = anon2.post("/login", data={"token": new, "csrf": login}).status_code
    record(16, "tunelab review reissue-token: the new token signs in, the old one no longer does",
           done.rc == 0 and new and new != tokens["r1"] and old_status == 401 and new_status == 303,
           f"rc={done.rc}; old token -> {old_status}, new token -> {new_status}")
    tokens["r1"] = new
    offered = 'action="/admin/token"' in r0.get("/admin").text
    record(16, "the admin view offers reissuing a token", offered, f"/admin has the reissue form: {offered}")


def browser_checks(url, tokens, rankings) -> None:
    if not os.path.exists(CHROMIUM):
        record(3, "Chromium: cross-origin auto-submitting forms", False, f"{CHROMIUM} missing: not tried")
        return
    from playwright.sync_api import sync_playwright

    from tests.test_review_browser import _auto_submit, open_attacks

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            page.fill("#token", tokens["r2"])
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/")
            page.click("#next")
            page.wait_for_url("**/assignments/*")
            target = page.url
            forged = {s.get_attribute("name"): "1" for s in page.query_selector_all("select[data-label]")}
            before = rankings()
            attacks = {"/review": _auto_submit(target, forged), "/login": _auto_submit(f"{url}/login", {"token": tokens["r1"]})}
            open_attacks(page, url, attacks)
            after = rankings()
            record(3, "Chromium, signed in: a page on another port of 127.0.0.1 auto-submits a review -> nothing saved",
                   after == before, f"rankings {before} -> {after}")
            page.goto(f"{url}/")
            header = page.inner_text("header")
            record(3, "Chromium: login CSRF from another port leaves the reviewer signed in as themself",
                   "signed in as r2" in header, f"header: {header.strip()[:80]!r}")
        finally:
            browser.close()


# ===============================================================================================
# Classes 17, 18: docs, split labels, make

def docs_and_make(w: World) -> None:
    design = (REPO / "docs" / "DESIGN.md").read_text()
    named = [n for n in ("--prompt-style", "rm.yaml", "rloo.yaml", "samsum-qlora.yaml") if n in design]
    record(17, "docs/DESIGN.md no longer names --prompt-style, rm.yaml, rloo.yaml, samsum-qlora.yaml", not named,
           f"still named: {named}" if named else "none of the four")
    missing = []
    for doc in ("docs/DESIGN.md", "README.md"):
        for ref in sorted(set(re.findall(r"recipes/([\w.-]+\.yaml)", (REPO / doc).read_text()))):
            if not (REPO / "recipes" / ref).exists():
                missing.append(f"{doc}: recipes/{ref}")
    record(17, "every recipes/*.yaml that DESIGN.md and README.md name exists", not missing,
           f"missing: {missing}" if missing else "all exist")
    held = w.root / "held_out.jsonl"
    held.write_text("".join(w.task.joinpath("validation.jsonl").read_text().splitlines(True)[:3]))
    out = w.root / "eval-split"
    done = tunelab("eval", w.tiny, "--dataset", held, "--format", "custom", "fields={messages: messages}", "--split", "test",
                   "--tasks", "perplexity,rouge", "--baseline", "none", "--limit", "2", "--max-new-tokens", "2",
                   "--output", out, cwd=w.root)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    labels = results.get("data", {})
    record(17, "tunelab eval FILE --split test labels the rows [test], not train",
           done.rc == 0 and labels and all("[test]" in v and "train" not in v for v in labels.values()),
           f"rc={done.rc}: {labels or done.error_line()}")
    names = sorted({k for task in results.get("tasks", {}).values() for k in task if k not in ("n", "ci95", "tokens")})
    odd = [n for n in names if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", n)]
    record(14, "tunelab eval's metric names in the same snake_case style", names and not odd,
           f"odd: {odd}" if odd else ", ".join(names))

    dry = subprocess.run(["make", "-n", "-B", "quickstart"], cwd=REPO, capture_output=True, text=True)
    heavy = [x for x in ("apt", "system-deps", "chromium", "postgres") if x in dry.stdout.lower()]
    record(18, "make quickstart (dry run, -B) installs no system packages: no apt, Chromium or PostgreSQL",
           dry.returncode == 0 and not heavy, f"rc={dry.returncode}; found {heavy}" if heavy else f"rc={dry.returncode}; "
           f"{len(dry.stdout.splitlines())} commands, pip and tunelab quickstart only")
    dry = subprocess.run(["make", "-n", "-B", "test"], cwd=REPO, capture_output=True, text=True)
    record(18, "make test (dry run) does run the system packages' script (the split is real)",
           dry.returncode == 0 and "system-deps" in dry.stdout, f"rc={dry.returncode}; system-deps: {'system-deps' in dry.stdout}")


# ===============================================================================================

def summary(rows: list[dict]) -> dict:
    by = {}
    for row in rows:
        c = by.setdefault(row["class"], {"tried": 0, "good": 0})
        c["tried"] += 1
        c["good"] += row["good"]
    order = {name: i for i, name in enumerate(CLASSES.values())}
    return {"tried": len(rows), "good": sum(r["good"] for r in rows),
            "by_class": dict(sorted(by.items(), key=lambda kv: order[kv[0]]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated item numbers (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "probe-2026-12-01-cpu.json"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    only = {int(x) for x in args.only.split(",")} if args.only else set(CLASSES)
    # Started in the background by a non-interactive shell, this process ignores SIGINT, and so would
    # every tunelab it starts (an ignored signal stays ignored across exec): the Ctrl-C checks would
    # then test nothing. A handled signal is reset to the default in the children, as in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root = Path(tempfile.mkdtemp(prefix="tunelab-probe-"))
    start = time.time()
    print(f"scratch folder: {root}", flush=True)
    try:
        world = World(root)
        parts = [({8}, config_errors), ({12}, recipes_and_names), ({9, 7, 13}, order_and_data), ({13}, targets_and_styles),
                 ({1, 2, 9, 10, 11, 14, 15}, training), ({5, 6, 10, 11}, server), ({11}, chat), ({3, 4, 16, 11}, review),
                 ({17, 18, 14}, docs_and_make)]
        for items, part in parts:
            if items & only:
                t0 = time.time()
                try:
                    part(world)
                except Exception as err:  # noqa: BLE001 - the probe's own failure is a row, never hidden
                    record(min(items & only), f"probe part {part.__name__} ran to its end", False,
                           f"{type(err).__name__}: {str(err)[:300]}")
                print(f"-- {part.__name__}: {time.time() - t0:.0f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = [r for r in ROWS if int(r["class"].split()[0]) in only]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, no GPU",
              "command": "python benchmarks/probe.py" + (f" --only {args.only}" if args.only else ""),
              "wall_s": round(time.time() - start), "rows": rows, "summary": summary(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    s = result["summary"]
    print(f"\n{s['good']} good of {s['tried']} tried ({result['wall_s']} s); written to {args.out}")
    for name, c in s["by_class"].items():
        print(f"  {name:<48} {c['good']}/{c['tried']}")
    for r in rows:
        if not r["good"]:
            print(f"  NOT GOOD: {r['class']} | {r['check']} | {r['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
