"""`tunelab bench-infer`: the same workload through `static` and `paged` at the same KV budget.

Every request arrives at once (an offline batch); latency is a request's time from arrival to
its last token, TTFT to its first, throughput is generated tokens over the wall time of the
whole workload. The
prompts are real rows of a dataset (varied lengths), rendered through the chat template.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tunelab.inference.base import Engine, SamplingParams

ROW_KEYS = ("backend", "tokens_per_s", "ttft_p50_ms", "p50_ms", "p99_ms", "kv_waste_pct", "device")


def dataset_prompts(tokenizer, dataset: str | None, data_format: str | None, split: str, n: int) -> tuple[list[list[int]], str]:
    """(prompt token ids, where they came from): the dataset's rows, or the quickstart's generated
    meetup chats when no dataset is given (offline, lengths vary)."""
    from tunelab.data.templates import prompt_text

    if dataset:
        from tunelab.evals.tasks import load_rows

        rows = load_rows(dataset, data_format or "custom", None, split, n)
        messages, origin = rows.examples, rows.origin
    else:
        from tunelab.data.synthetic import make_meetup_task

        messages, origin = [r["messages"] for r in make_meetup_task(n, seed=0)], "quickstart meetup chats (generated)"
    ids = [tokenizer(prompt_text(tokenizer, m), add_special_tokens=False)["input_ids"] for m in messages]
    return ids, origin


def device_name(model) -> str:
    import torch

    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"cpu ({torch.get_num_threads()} threads)"


def run_workload(engine: Engine, prompts: list[list[int]], limits: list[int], desc: str) -> dict:
    """Submit every prompt (greedy, each with its own token limit) and time until the last finishes."""
    start = time.perf_counter()
    handles = engine.submit_many(prompts, [SamplingParams(max_new_tokens=n) for n in limits])
    tokens, outputs = 0, []
    for handle in tqdm(handles, desc=desc, leave=False):
        out = []
        for delta in handle.events():
            out += delta.token_ids
            if delta.error:
                raise RuntimeError(f"{engine.name}: request failed: {delta.error}")
        tokens += len(out)
        outputs.append(out)
    wall = time.perf_counter() - start
    lat_ms = np.array([h.finished_at - start for h in handles]) * 1000
    ttft_ms = np.array([(h.first_at or h.finished_at) - start for h in handles]) * 1000
    pct = lambda a, q: round(float(np.percentile(a, q)), 1)  # noqa: E731
    return {"tokens_per_s": round(tokens / wall, 2), "ttft_p50_ms": pct(ttft_ms, 50), "p50_ms": pct(lat_ms, 50),
            "p99_ms": pct(lat_ms, 99), "generated_tokens": tokens, "requests": len(prompts), "wall_s": round(wall, 3),
            "outputs": outputs}


def bench(model, tokenizer, prompts: list[list[int]], limits: list[int], *, kv_budget_tokens: int,
          page_size: int = 16, backends=("static", "paged"), kv_log: Path | None = None, **paged_options) -> list[dict]:
    """One row per backend, each started fresh on the same model at the same KV budget (in tokens):
    the static batch takes as many rows as the budget allows, the paged pool has budget/page_size
    blocks. Each is warmed up first (the paged engine also captures its decode graphs for the
    workload's batch sizes). kv_log: also write every step's KV state there (JSON lines)."""
    import torch

    from tunelab.inference.backends import build_engine

    rows = []
    for backend in backends:
        options = {"page_size": page_size, **paged_options} if backend == "paged" else {"max_batch": None}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        engine = build_engine(backend, model, tokenizer, kv_budget_tokens=kv_budget_tokens, **options)
        try:
            if hasattr(engine, "capture"):
                engine.capture(len(prompts))
            run_workload(engine, prompts[:2], [2, 2], f"{backend} warm-up")
            engine.ledger.reset()  # the summary covers the timed workload only
            measured = run_workload(engine, prompts, limits, backend)
            measured.pop("outputs")
            kv = engine.kv()["summary"]
            if kv_log is not None:
                write_kv_log(engine, kv_log, append=backend != backends[0])
        finally:
            engine.close()
        rows.append({"backend": backend, **measured, "kv_waste_pct": kv["kv_waste_pct"], "device": device_name(model),
                     "kv_budget_tokens": kv_budget_tokens, "peak_running": kv["peak_running"],
                     "peak_kv_reserved_mib": round(kv["peak_reserved_bytes"] / 2**20, 1),
                     "preemptions": kv["preemptions"]})
        if torch.cuda.is_available():
            rows[-1]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["backend", "tokens_per_s", "ttft_p50_ms", "p50_ms", "p99_ms", "kv_waste_pct", "peak_running", "preemptions"]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def write_kv_log(engine: Engine, path: Path, append: bool = False) -> None:
    """The engine's per-step KV states as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for row in engine.ledger.per_batch():
            f.write(json.dumps({"backend": engine.name, **row}) + "\n")


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
