"""Training throughput: plain transformers + peft (+ bitsandbytes) vs. tunelab's train path, same GPU, same run.

    python benchmarks/train_speed.py --models DIR --lengths samsum_lengths.json --out OUT [--steps 20]
        [--configs a,b] [--impls x,y] [--layers N] [--profile auto|always|never] [--dequant]

One process per config; its impls run one after another in it, in the order below (every
global patch is tunelab's and comes last), each on a freshly loaded model, with the peak memory
counted from zero. Samples have real lengths (drawn from SAMSum's token lengths, contents
random), so what packing saves shows:
- `baseline`: what a user writes with transformers + peft: batches of `batch` samples padded
  to the longest (DataCollatorWithPadding style), attention_mask, loss on every real token.
- `baseline_fixed`: the same stack on constant-length rows of `seq` random tokens (no padding
  at all): the setting of the reference numbers in DESIGN.md, an upper bound for plain HF.
- `tunelab_stock`: tunelab's packing (best-fit rows of `seq` tokens, restarting position_ids,
  the collator `tunelab train` uses) on the stock transformers modules (`train.kernels=off`).
- `tunelab`: the same batches with what `tunelab train` does on CUDA with `train.kernels=auto`:
  `kernels.apply` (varlen attention, liger's kernels) before peft, `kernels.apply_lora` (fused
  LoRA/QLoRA blocks, and the config's `train.activation_offload`) after.
`tunelab` and `tunelab_stock` see identical weights, LoRA init and batches, so their per-step
losses are compared (`loss_max_rel_diff`, bf16 tolerance `LOSS_RTOL`). tokens/s counts real
(non-pad) tokens, timed over the steps after 3 warm-up steps. A config's `goals` are checked on
its `tunelab` row against its `baseline_fixed` row; where one is missed (or `--profile always`),
two more steps run under torch.profiler and the row keeps the top CUDA kernels per step.
`--dequant` times NF4 dequantization + matmul, bitsandbytes' vs `kernels.nf4`, at 7B shapes.
Results accumulate in OUT/train_speed.json (and OUT/nf4_dequant.json), written after every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpu_spine import SHAPES

LOSS_RTOL = 1e-2
"""Largest relative per-step loss difference tunelab vs tunelab_stock that counts as agreement in bf16."""


@dataclass(frozen=True)
class Goals:
    speedup: float | None = None  # tunelab tokens/s ≥ this × baseline_fixed's
    memory_ratio: float | None = None  # tunelab peak ≤ this × baseline_fixed's
    peak_gib: float | None = None  # tunelab peak < this


@dataclass(frozen=True)
class Bench:
    """One benchmark configuration: model shape, LoRA/QLoRA, rows per step and their length."""

    shape: str  # a gpu_spine.SHAPES key
    quantized: bool
    batch: int
    seq: int
    vocab: int = 32000
    cap_gib: float | None = None  # run under this per-process memory cap (e.g. a 16 GB T4's budget)
    offload: bool = False  # the tunelab impl sets train.activation_offload
    goals: Goals = field(default_factory=Goals)


CONFIGS = {
    "lora_all_r16_b4_s2048": Bench("llama2-7b", False, 4, 2048, goals=Goals(speedup=1.6)),
    "qlora_all_r16_b4_s2048": Bench("llama2-7b", True, 4, 2048, offload=True, goals=Goals(speedup=1.6, memory_ratio=0.6)),
    "qlora_all_r16_b1_s4096": Bench("llama2-7b", True, 1, 4096, offload=True, goals=Goals(peak_gib=6.5)),
    "qlora_all_r16_b4_s2048_cap15gib": Bench("llama2-7b", True, 4, 2048, cap_gib=15, offload=True),
}
DEFAULT_CONFIGS = ("lora_all_r16_b4_s2048", "qlora_all_r16_b4_s2048", "qlora_all_r16_b1_s4096")
IMPLS = ("baseline", "baseline_fixed", "tunelab_stock", "tunelab")
DEFAULT_IMPLS = ("baseline_fixed", "tunelab_stock", "tunelab")


def read_lengths(path: Path) -> list[int]:
    """Sample token lengths: a JSON list, or data_prep's {"pairs": [[prompt, completion], ...]} (their sums)."""
    data = json.loads(path.read_text())
    return [sum(pair) for pair in data["pairs"]] if isinstance(data, dict) else [int(n) for n in data]


def samples(lengths: list[int], n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.choice(lengths))] for _ in range(n)]


def batches(impl: str, rows: list[list[int]], batch: int, seq: int, pad_id: int):
    """Yield model inputs: padded sample batches (baseline) or packed rows (tunelab)."""
    from tunelab.data.batching import Collator, pack_batch

    collate = Collator(pad_id)
    if impl == "baseline_fixed":  # constant-length rows: every token real, no mask
        flat = [t for r in rows for t in r]
        for i in range(0, len(flat) - batch * seq + 1, batch * seq):
            ids = torch.tensor(flat[i : i + batch * seq]).view(batch, seq)
            yield {"input_ids": ids, "labels": ids.clone()}, batch * seq
        return
    if impl.startswith("tunelab"):
        packed = pack_batch({"input_ids": rows, "labels": rows}, seq)
        rows_ = [dict(zip(packed, vals)) for vals in zip(*packed.values())]
    else:
        rows_ = [{"input_ids": r, "labels": r} for r in rows]
    for i in range(0, len(rows_) - batch + 1, batch):
        yield collate(rows_[i : i + batch]), sum(len(r["input_ids"]) for r in rows_[i : i + batch])


def load(bench: Bench, impl: str, model_dir: Path):
    """The model as each impl trains it: (peft model, what tunelab's kernels turned on)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunelab import kernels

    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0}}
    if bench.quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    enabled = kernels.apply(model, "auto") if impl == "tunelab" else []
    if bench.quantized:
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    if impl == "tunelab":
        enabled += kernels.apply_lora(model, "auto", activation_offload=bench.offload)
    model.train()  # from_pretrained returns eval mode, where activation checkpointing is off
    return model, enabled


def step(model, opt, inputs) -> float:
    with torch.autocast("cuda", dtype=torch.bfloat16):  # what Trainer(bf16=True) does
        loss = model(**{k: v.cuda() for k, v in inputs.items()}).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def one(config: str, impl: str, model_dir: Path, lengths: list[int], steps: int) -> tuple[dict, object]:
    """Train `steps` steps; the row and what `profile` needs to run more of them."""
    bench = CONFIGS[config]
    leftover = torch.cuda.memory_allocated() / 2**30  # what an earlier impl in this process left (≈ 0)
    model, enabled = load(bench, impl, model_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated() / 2**30  # weights and adapters: the peak above it is the step's
    # enough samples for `steps` packed steps, plus the profiler's; the baseline takes as many sample batches
    per_row = max(1, int(bench.seq // statistics.mean(lengths)))
    rows = samples(lengths, bench.batch * (steps + 4) * (per_row + 1), model.config.vocab_size)
    feed = batches(impl, rows, bench.batch, bench.seq, pad_id=0)
    times, tokens, losses = [], 0, []
    for i in range(steps):
        inputs, real = next(feed)
        torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(step(model, opt, inputs))
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
            tokens += real
    row = {"config": config, "impl": impl, "tokens_per_s": tokens / sum(times),
           "step_time_median_s": statistics.median(times), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss_max_rel_diff": None, "gpu": torch.cuda.get_device_name(), "steps_timed": len(times),
           "kernels": enabled, "losses": losses, "allocated_before_load_gib": leftover,
           "allocated_after_load_gib": loaded}
    if impl == "tunelab":
        row["activation_offload"] = bench.offload
    return row, (model, opt, feed)


def profile(model, opt, feed, steps: int = 2, top: int = 15) -> dict:
    """CUDA kernel time per step under torch.profiler: the top kernels and totals by kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step(model, opt, next(feed)[0])  # the profiler's own warm-up
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(model, opt, next(feed)[0])
        torch.cuda.synchronize()
    kernels = [(e.key, _device_us(e) / steps / 1000, e.count // steps) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [k for k in kernels if k[1] > 0]
    kernels.sort(key=lambda k: -k[1])
    by_kind: dict[str, float] = {}
    for name, ms, _ in kernels:
        by_kind[_kind(name)] = by_kind.get(_kind(name), 0.0) + ms
    return {"steps": steps, "cuda_ms_per_step": sum(k[1] for k in kernels),
            "by_kind_ms_per_step": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": name[:160], "ms_per_step": ms, "calls_per_step": calls} for name, ms, calls in kernels[:top]]}


def _device_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        if hasattr(event, attr):
            return getattr(event, attr)
    return 0.0


KINDS = (("nf4", ("nf4", "dequantize", "kDequantize")), ("attention", ("flash", "fmha", "attention")),
         ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90", "splitk")),
         ("swiglu/norm/rope/ce (triton)", ("triton", "_kernel", "forward", "backward")),
         ("copy/cast", ("copy", "memcpy", "Memcpy", "cast")), ("elementwise/reduce", ("elementwise", "reduce")))


def _kind(kernel: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in kernel for k in keys)), "other")


def goals_report(bench: Bench, row: dict, base: dict | None) -> dict:
    """Each of the config's goals: the value reached and whether it is met (None: no baseline row)."""
    out = {}
    g = bench.goals
    if g.speedup is not None:
        x = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        out["speedup_vs_baseline_fixed"] = {"goal": g.speedup, "value": x, "met": None if x is None else x >= g.speedup}
    if g.memory_ratio is not None:
        x = row["peak_memory_gib"] / base["peak_memory_gib"] if base else None
        out["memory_vs_baseline_fixed"] = {"goal": g.memory_ratio, "value": x,
                                           "met": None if x is None else x <= g.memory_ratio}
    if g.peak_gib is not None:
        out["peak_gib"] = {"goal": g.peak_gib, "value": row["peak_memory_gib"],
                           "met": row["peak_memory_gib"] < g.peak_gib}
    return out


def run_config(config: str, impls: list[str], model_dir: Path, lengths: list[int], steps: int, mode: str) -> None:
    """Child process: every impl of one config, one JSON row per line as soon as it is done."""
    bench = CONFIGS[config]
    if bench.cap_gib:
        torch.cuda.set_per_process_memory_fraction(bench.cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    base = None
    for impl in impls:
        try:
            row, state = one(config, impl, model_dir, lengths, steps)
        except Exception as err:  # noqa: BLE001 (an OOM in one impl should not lose the others)
            row, state = {"config": config, "impl": impl, "error": f"{type(err).__name__}: {err}"[:2000]}, None
        if impl == "baseline_fixed" and "error" not in row:
            base = row
        if impl == "tunelab" and state is not None:
            row["goals"] = goals_report(bench, row, base)
            missed = any(g["met"] is False for g in row["goals"].values())
            if mode == "always" or (mode == "auto" and missed):
                try:
                    row["profile"] = profile(*state)
                except Exception as err:  # noqa: BLE001 (the timed row stands without it)
                    row["profile"] = {"error": f"{type(err).__name__}: {err}"[:500]}
        del state
        gc.collect()
        torch.cuda.empty_cache()
        print("ROW " + json.dumps(row), flush=True)


def build_model(shape: str, vocab: int, layers: int | None, out: Path) -> Path:
    """A random checkpoint of the shape (4-bit loading needs one on disk); `layers` cuts it short for smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    target = out / f"{shape}-v{vocab}-l{dims['num_hidden_layers']}"
    if (target / "config.json").exists():
        return target
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, **dims)
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(target)
    gc.collect()
    torch.cuda.empty_cache()
    return target


def add_loss_agreement(rows: list[dict]) -> None:
    """loss_max_rel_diff of `tunelab` against `tunelab_stock` (same weights, batches and seed)."""
    stock = {r["config"]: r["losses"] for r in rows if r.get("impl") == "tunelab_stock" and "losses" in r}
    for r in rows:
        if r.get("impl") == "tunelab" and r["config"] in stock and "losses" in r:
            pairs = list(zip(r["losses"], stock[r["config"]]))
            r["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in pairs)
            r["loss_steps_compared"] = len(pairs)
            r["loss_agrees"] = r["loss_max_rel_diff"] <= LOSS_RTOL


def table(rows: list[dict]) -> str:
    base = {r["config"]: r for r in rows if r.get("impl") == "baseline_fixed" and "tokens_per_s" in r}
    lines = ["| config | impl | tokens/s | step median (s) | peak GiB | vs baseline_fixed | loss max rel diff | goals |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['config']} | {r['impl']} | error: {r.get('error', '')[:80]} | | | | | |")
            continue
        b = base.get(r["config"])
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}× / {r['peak_memory_gib'] / b['peak_memory_gib']:.2f}× mem" \
            if b else ""
        diff = f"{r['loss_max_rel_diff']:.1e}" if r.get("loss_max_rel_diff") is not None else ""
        met = ", ".join(f"{k} {'✓' if g['met'] else '✗'}" for k, g in r.get("goals", {}).items() if g["met"] is not None)
        lines.append(f"| {r['config']} | {r['impl']} | {r['tokens_per_s']:,.0f} | {r['step_time_median_s']:.2f} | "
                     f"{r['peak_memory_gib']:.2f} | {ratio} | {diff} | {met} |")
    return "\n".join(lines)


def dequant_bench(out: Path, tokens: int = 8192, reps: int = 20) -> list[dict]:
    """ms per call at Llama-2-7B's projection shapes: bitsandbytes' dequantize_4bit (+ the matmul) vs ours."""
    import bitsandbytes.functional as bnbf

    from tunelab.kernels import nf4

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    rows = []
    for shape in ((4096, 4096), (11008, 4096), (4096, 11008)):
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)
        x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16)
        buf = nf4.buffer(weight.numel(), torch.bfloat16, weight.device)
        ours = lambda: nf4.dequantize(packed, state, out=buf)  # noqa: E731
        theirs = lambda: bnbf.dequantize_4bit(packed, state)  # noqa: E731
        same = (ours().float() - theirs().float()).abs().max().item()
        rows.append({"shape": list(shape), "tokens": tokens, "gpu": torch.cuda.get_device_name(),
                     "bnb_dequant_ms": timed(theirs), "tunelab_dequant_ms": timed(ours),
                     "bnb_dequant_matmul_ms": timed(lambda: x @ theirs().t()),
                     "tunelab_dequant_matmul_ms": timed(lambda: x @ ours().t()),
                     "matmul_only_ms": timed(lambda: x @ weight.t()), "max_abs_diff_vs_bnb": same})
        print(json.dumps(rows[-1]), flush=True)
    (out / "nf4_dequant.json").write_text(json.dumps(rows, indent=2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, required=True, help="folder for the random checkpoints (built once)")
    parser.add_argument("--lengths", type=Path, required=True,
                        help="sample token lengths: a JSON list, or data/samsum_lengths.json's prompt/completion pairs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's); fewer for a smoke run")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--dequant", action="store_true", help="also time NF4 dequantization first")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = read_lengths(args.lengths)
    impls = args.impls.split(",")
    if args.one:
        run_config(args.one, impls, args.model_dir, lengths, args.steps, args.profile)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dequant:
        dequant_bench(args.out)
    out = args.out / "train_speed.json"
    rows = json.loads(out.read_text()) if out.exists() else []  # several calls add to one file
    new = []
    for config in args.configs.split(","):
        bench = CONFIGS[config]
        model_dir = build_model(bench.shape, bench.vocab, args.layers, args.models)
        cmd = [sys.executable, __file__, "--models", str(args.models), "--lengths", str(args.lengths), "--out",
               str(args.out), "--steps", str(args.steps), "--impls", args.impls, "--profile", args.profile,
               "--one", config, "--model-dir", str(model_dir)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        done = set()
        for line in proc.stdout:  # rows as they finish: a timeout still leaves the finished ones
            if not line.startswith("ROW "):
                continue
            row = json.loads(line[4:])
            if args.layers:
                row["layers"] = args.layers
            done.add(row["impl"])
            rows.append(row)
            new.append(row)
            add_loss_agreement(new)
            print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "profile")}), flush=True)
            out.write_text(json.dumps(rows, indent=2))
        if proc.wait() != 0:
            for impl in impls:
                if impl not in done:
                    new.append({"config": config, "impl": impl, "error": f"process exited {proc.returncode}"})
                    rows.append(new[-1])
            out.write_text(json.dumps(rows, indent=2))
    print(table(new), flush=True)


if __name__ == "__main__":
    main()
