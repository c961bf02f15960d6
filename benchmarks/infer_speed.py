"""Generation throughput on one GPU: transformers' `generate()` (eager, and with a static cache
whose decode step transformers compiles) vs tunelab's paged engine, random-weight Llamas of
real shapes in bf16, one process.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/infer_speed.py --out results/infer_speed-<date>-<gpu>.json
    python benchmarks/infer_speed.py --write-lengths ../shared/data/samsum   # CPU, once: the data file below
    PYTHONPATH=src python benchmarks/infer_speed.py --shapes tiny --scale 0.05 --out /tmp/x.json   # CPU smoke

impls: `hf_generate` (model.generate, eager, dynamic cache, left-padded batches of 64 in arrival
order), `hf_static_compile` (the same with cache_implementation="static"; batches padded to the
workload's widest prompt and longest answer so the compiled step keeps one shape), `tunelab`
(the paged engine, every request submitted at once). Each is warmed up on the measured batch
size first (HF's first batch-64 run is ~3x slower than its second; the compile happens there).
workloads: `uniform` (64 × 256 → 128), `samsum` (256 requests with SAMSum's prompt and answer
token lengths from benchmarks/data/samsum_lengths.json, each generating exactly its answer's
length), `long` (16 × 3,000 → 256). Token ids are random and no EOS is set, so every request
runs to its limit. Rows are written after each one, most important first; a row that would not
fit the time budget (--budget-s) is written as skipped, with the reason.

Per row: tokens/s (generated tokens over the wall time of the workload), TTFT p50, request
latency p50/p99, peak GPU memory, KV waste, and the memory-bandwidth bound: every decode step
reads all weights plus every running sequence's KV once, at the copy bandwidth measured here.
tunelab rows add the share of sequences identical to hf_generate's (same prompts, greedy,
bf16) with the first divergence position, the engine's stated memory (pool + workspace), and
where its loop's time went (decode steps, mixed prefill steps, host work).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
LENGTHS = HERE / "data" / "samsum_lengths.json"
SHAPES = {  # name → LlamaConfig fields
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,  # CPU smoke run
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096),
}
WORKLOADS = {"uniform": (64, 256, 128), "long": (16, 3000, 256)}  # requests, prompt tokens, new tokens
SAMSUM_REQUESTS = 256
HF_BATCH = 64
KV_BUDGET_TOKENS = 65536  # the tunelab pool: 32 GiB at the 7B shape
PLAN = [  # (shape, workload, impl), most important first
    ("llama2-7b", "uniform", "tunelab"), ("llama2-7b", "uniform", "hf_generate"),
    ("llama2-7b", "samsum", "tunelab"), ("llama2-7b", "samsum", "hf_generate"),
    ("smollm2-135m", "uniform", "tunelab"), ("smollm2-135m", "uniform", "hf_generate"),
    ("llama2-7b", "uniform", "hf_static_compile"), ("smollm2-135m", "uniform", "hf_static_compile"),
    ("llama2-7b", "long", "tunelab"), ("llama2-7b", "long", "hf_generate"),
    ("smollm2-135m", "samsum", "tunelab"), ("smollm2-135m", "samsum", "hf_generate"),
    ("smollm2-135m", "long", "tunelab"), ("smollm2-135m", "long", "hf_generate"),
    ("llama2-7b", "samsum", "hf_static_compile"), ("smollm2-135m", "samsum", "hf_static_compile"),
    ("llama2-7b", "long", "hf_static_compile"), ("smollm2-135m", "long", "hf_static_compile"),
]
MIN_LEFT_S = {"hf_static_compile": 150, "hf_generate": 25, "tunelab": 20}  # skip a row with less time left


def write_lengths(source: str, n: int) -> None:
    """Prompt and summary token lengths of the first n SAMSum validation rows (run on CPU, once)."""
    from tunelab.data.templates import prompt_text
    from tunelab.evals.tasks import load_rows
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import resolve

    tok = load_tokenizer(resolve("embedded"))
    rows = load_rows(source, "samsum", None, "validation", n)
    pairs = [[len(tok(prompt_text(tok, m), add_special_tokens=False)["input_ids"]),
              len(tok(m[-1]["content"], add_special_tokens=False)["input_ids"]) + 1] for m in rows.examples]  # + EOS
    LENGTHS.parent.mkdir(exist_ok=True)
    LENGTHS.write_text(json.dumps({"source": f"{rows.origin}, first {len(pairs)} rows",
                                   "tokenizer": "SmolLM2-135M-Instruct (embedded), chat template",
                                   "pairs": pairs}, separators=(",", ":")) + "\n")
    print(f"{len(pairs)} [prompt, answer] lengths → {LENGTHS}")


def random_llama(shape: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=None, pad_token_id=0, use_cache=True)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None  # random weights: run every request to its limit
    return model.eval()


def workload(name: str, vocab: int, scale: float) -> tuple[list[list[int]], list[int]]:
    """(prompt token ids, new tokens per request); lengths scaled down by `scale` for smoke runs."""
    rng = random.Random(0)
    if name == "samsum":
        pairs = json.loads(LENGTHS.read_text())["pairs"]
        chosen = [rng.choice(pairs) for _ in range(max(2, int(SAMSUM_REQUESTS * scale)))]
        lens, limits = [max(2, int(p * min(1, 4 * scale))) for p, _ in chosen], [a for _, a in chosen]
    else:
        n, p, new = WORKLOADS[name]
        lens, limits = [max(2, int(p * scale))] * max(2, int(n * scale)), [max(2, int(new * scale))] * max(2, int(n * scale))
    return [[1] + [rng.randrange(100, vocab) for _ in range(p - 1)] for p in lens], limits


def bandwidth_bound(weight_bytes: int, per_token: int, prompt_lens: list[int], limits: list[int], bw: float) -> float:
    """Generated tokens over the time to read, at every decode step, all weights plus the KV of
    every sequence still running (all requests running at once; prefill not counted)."""
    import numpy as np

    p, g = np.array(prompt_lens), np.array(limits)
    seconds = 0.0
    for t in range(int(g.max())):
        running = g > t
        seconds += (weight_bytes + float((p[running] + t).sum()) * per_token) / bw
    return float(g.sum()) / seconds


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (start.elapsed_time(end) / 1000)


def percentiles(starts_ms, values_ms) -> dict:
    import numpy as np

    pct = lambda a, q: round(float(np.percentile(a, q)), 1)  # noqa: E731
    return {"ttft_p50_ms": pct(starts_ms, 50), "p50_ms": pct(values_ms, 50), "p99_ms": pct(values_ms, 99)}


class _FirstToken:
    """A generate() streamer that notes when the first generated tokens arrive (its 2nd put)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, _value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def hf_run(model, prompts, limits, static: bool) -> dict:
    """Batches of HF_BATCH in arrival order through model.generate; a request is done when its
    batch returns. KV waste: the padded rectangle each step holds (the static cache holds its
    full length from the first step) against the positions of live tokens."""
    import torch

    from tunelab.inference.kv import static_batch_snapshots

    widest, longest = max(map(len, prompts)), max(limits)
    start = time.perf_counter()
    finish, first, outputs, reserved, live = [], [], [], 0, 0
    for b in range(0, len(prompts), HF_BATCH):
        rows, lims = prompts[b : b + HF_BATCH], limits[b : b + HF_BATCH]
        width, new = (widest, longest) if static else (max(map(len, rows)), max(lims))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        streamer = _FirstToken()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0, streamer=streamer, **({"cache_implementation": "static"} if static else {}))
        now = time.perf_counter()
        got = out[:, width:].tolist()
        outputs += [row[:n] for row, n in zip(got, lims)]
        finish += [now] * len(rows)
        first += [streamer.first or now] * len(rows)
        for snap in static_batch_snapshots([len(r) for r in rows], lims, width, new):
            reserved += len(rows) * (width + new) if static else snap.reserved_tokens
            live += snap.live_tokens
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    wall = time.perf_counter() - start
    return {"tokens_per_s": round(sum(limits) / wall, 1), "wall_s": round(wall, 3),
            **percentiles([(t - start) * 1000 for t in first], [(t - start) * 1000 for t in finish]),
            "kv_waste_pct": round(100 * (1 - live / reserved), 2), "outputs": outputs,
            "batch": HF_BATCH, "padded_to": "workload" if static else "batch"}


def tunelab_run(model, prompts, limits, program: str | None) -> tuple[dict, object]:
    """The paged engine at KV_BUDGET_TOKENS; returns (row, the engine, still open)."""
    import torch

    from tunelab.inference.backends import build_engine
    from tunelab.inference.bench import run_workload

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None, bos_token_id=1)
    engine = build_engine("paged", model, tokenizer, kv_budget_tokens=KV_BUDGET_TOKENS, program=program)
    t = time.perf_counter()
    graphs = engine.capture(len(prompts))
    capture_s = time.perf_counter() - t
    run_workload(engine, prompts, limits, "tunelab warm-up")
    engine.ledger.reset()
    engine.phases.clear()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    row = run_workload(engine, prompts, limits, "tunelab")
    kv = engine.kv()["summary"]
    ph = engine.phases
    steps = ph["decode_steps"] + ph["mixed_steps"]
    row |= {"kv_waste_pct": kv["kv_waste_pct"], "preemptions": kv["preemptions"], "peak_running": kv["peak_running"],
            "engine": engine.describe(), "graphs_captured": graphs, "capture_s": round(capture_s, 2),
            "kv_pool_gib": round(engine.kv_bytes / 2**30, 3), "workspace_gib": round(engine.workspace_bytes / 2**30, 3),
            "profile": {"decode_steps": ph["decode_steps"], "mixed_steps": ph["mixed_steps"],
                        "decode_step_ms": round(1000 * ph["decode_s"] / max(ph["decode_steps"], 1), 3),
                        "mixed_step_ms": round(1000 * ph["mixed_s"] / max(ph["mixed_steps"], 1), 2),
                        "host_ms_per_step": round(1000 * ph["host_s"] / max(steps, 1), 3),
                        "decode_s": round(ph["decode_s"], 3), "mixed_s": round(ph["mixed_s"], 3),
                        "host_s": round(ph["host_s"], 3)}}
    return row, engine


def graph_replay_ms(engine, bucket: int) -> float | None:
    """GPU time of one captured greedy decode step of `bucket` rows (replayed from its graph)."""
    import torch

    graph = next((g for (b, mode, _), g in engine.runner._graphs.items() if b == bucket and mode == "greedy"), None)
    if graph is None:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    engine.runner._static.reset(bucket)  # rows on the scratch block: harmless to replay
    graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / 20, 3)


def top_kernels(engine, prompts, limits, n: int = 12) -> list[dict]:
    """torch.profiler over one more run of the workload: the kernels taking the most GPU time."""
    from torch.profiler import ProfilerActivity, profile

    from tunelab.inference.bench import run_workload

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_workload(engine, prompts, limits, "tunelab profiled")
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    events.sort(key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    return [{"kernel": e.key[:80], "share_pct": round(100 * e.self_device_time_total / total, 1),
             "calls": e.count} for e in events[:n]]


def equality(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ours, theirs)]
    diverged = sorted(f for f in firsts if f is not None)
    return {"identical_to_hf_generate": round(sum(f is None for f in firsts) / len(firsts), 3),
            "first_divergence_min": diverged[0] if diverged else None,
            "first_divergence_median": diverged[len(diverged) // 2] if diverged else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-lengths", metavar="SAMSUM_DIR", help="write the lengths file from SAMSum and stop")
    parser.add_argument("--shapes", default="llama2-7b,smollm2-135m")
    parser.add_argument("--workloads", default="uniform,samsum,long")
    parser.add_argument("--impls", default="tunelab,hf_generate,hf_static_compile")
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting rows once this much time is spent")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink request counts and lengths (smoke runs)")
    parser.add_argument("--program", choices=["hf", "fused"], help="tunelab's step program (default: the engine's)")
    parser.add_argument("--profile", action="store_true", help="also torch.profiler's top kernels for tunelab uniform")
    parser.add_argument("--out", required=False, help="rows JSON (default results/infer_speed-<date>-<gpu>.json)")
    args = parser.parse_args()
    if args.write_lengths:
        write_lengths(args.write_lengths, 400)
        return

    import datetime

    import torch
    import transformers

    from tunelab.inference.kv import bytes_per_token

    began = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - began)  # noqa: E731
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    bw = copy_bandwidth() if cuda else 50e9
    out = Path(args.out or HERE / "results" / f"infer_speed-{datetime.date.today()}-{gpu.replace('NVIDIA', '').strip()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; rows → {out}", flush=True)
    shapes, loads, impls = (set(v.split(",")) for v in (args.shapes, args.workloads, args.impls))
    plan = [r for r in PLAN if r[0] in shapes and r[1] in loads and r[2] in impls]
    plan += [(s, w, i) for s in args.shapes.split(",") if s not in {r[0] for r in PLAN}
             for w in args.workloads.split(",") for i in args.impls.split(",")]
    models, rows, hf_outputs = {}, [], {}
    for shape, name, impl in plan:
        if shape not in models:
            models[shape] = random_llama(shape, device)
        model = models[shape]
        prompts, limits = workload(name, model.config.vocab_size, args.scale)
        per_token = bytes_per_token(model.config, model.dtype.itemsize)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        row = {"impl": impl, "workload": name, "shape": shape, "requests": len(prompts),
               "bandwidth_bound_tokens_per_s": round(bandwidth_bound(weights, per_token, list(map(len, prompts)),
                                                                     limits, bw), 1),
               "weights_gib": round(weights / 2**30, 3), "gpu": gpu, "torch": torch.__version__,
               "transformers": transformers.__version__}
        reason = None
        if left() < MIN_LEFT_S[impl]:
            reason = f"skipped: {left():.0f} s of the {args.budget_s:.0f} s budget left, the row needs ≥ {MIN_LEFT_S[impl]} s"
        elif impl == "hf_static_compile" and not cuda:
            reason = "skipped: transformers compiles the static-cache step on CUDA only"
        if reason:
            rows.append(row | {"tokens_per_s": None, "skipped": reason})
            print(f"{shape} {name} {impl}: {reason}", flush=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")
            continue
        print(f"{shape} {name} {impl}: {len(prompts)} requests, {sum(limits)} new tokens ...", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        try:
            if impl == "tunelab":
                t = time.perf_counter()
                resident = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0  # this model's weights (+ the other's)
                got, engine = tunelab_run(model, prompts, limits, args.program)
                got["warmup_and_capture_s"] = round(time.perf_counter() - t - got["wall_s"], 2)
                if cuda:
                    got["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    got["resident_before_gib"] = round(resident, 2)
                    got["within_stated_memory"] = got["peak_gpu_gib"] <= resident + got["kv_pool_gib"] + got["workspace_gib"]
                    bucket = next((b for b in engine.runner.buckets if b >= min(len(prompts), engine.runner.buckets[-1])))
                    got["profile"]["graph_replay_ms_at_" + str(bucket)] = graph_replay_ms(engine, bucket)
                    if args.profile and name == "uniform" and left() > 120:
                        got["profile"]["top_kernels"] = top_kernels(engine, prompts, limits)
                engine.close()
                del engine
                if (shape, name) in hf_outputs:
                    got |= equality(got["outputs"], hf_outputs[(shape, name)])
                hf_outputs[(shape, name, "tunelab")] = got["outputs"]
            else:
                static = impl == "hf_static_compile"
                t = time.perf_counter()
                hf_run(model, prompts[:HF_BATCH], limits[:HF_BATCH], static)  # warm-up (and compile) at batch size
                warm = time.perf_counter() - t
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                got = hf_run(model, prompts, limits, static) | {"warmup_s": round(warm, 2)}
                if cuda:
                    got["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if impl == "hf_generate":
                    hf_outputs[(shape, name)] = got["outputs"]
                    if name == "uniform" and left() > 60:  # the noise floor: generate() against itself
                        few = hf_run(model, prompts[:16], limits[:16], static=False)["outputs"]
                        control = equality(few, got["outputs"][:16])
                        got["batch16_vs_batch64_identical"] = control["identical_to_hf_generate"]
                        got["batch16_vs_batch64_first_divergence_median"] = control["first_divergence_median"]
                    ours = hf_outputs.get((shape, name, "tunelab"))
                    if ours is not None:  # fill the equality into the tunelab row written before
                        next(r for r in rows if (r["impl"], r["workload"], r["shape"]) == ("tunelab", name, shape)
                             ).update(equality(ours, got["outputs"]))
        except Exception as err:  # noqa: BLE001 — record the row and go on: one failure must not lose the call
            import traceback

            traceback.print_exc()
            got = {"tokens_per_s": None, "skipped": f"failed: {type(err).__name__}: {str(err)[:300]}"}
        got.pop("outputs", None)
        rows.append(row | got)
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("engine",)}), flush=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    cols = ["shape", "workload", "impl", "tokens_per_s", "ttft_p50_ms", "p50_ms", "p99_ms", "peak_gpu_gib",
            "kv_waste_pct", "bandwidth_bound_tokens_per_s", "identical_to_hf_generate"]
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) if r.get("tokens_per_s") is not None or c in cols[:3] else "-" for c in cols))


if __name__ == "__main__":
    sys.exit(main())
