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

A config with `epoch=True` (`smollm2_samsum`) is the real thing instead: SAMSum's text through the
real `tunelab train` command, one process per impl, `--model` (a .gguf or model folder: real weights)
and `--data` (the folder holding samsum/):
- `tunelab_recipe`: `tunelab train recipes/samsum-lora.yaml` exactly as a user runs it;
- `tunelab`: the same optimisation with only what training costs (no validation before or during
  training, no mid-run checkpoints, no generations): batch_size=auto, compile=auto;
- `hf_peft_padded`: what a user writes with transformers + peft in ten minutes: shuffled batches of
  64 samples padded to the longest, LoRA r16 all-linear (dropout 0.05), AdamW 2e-4 cosine, bf16
  autocast, the same tokenized samples (`--hf-steps` cuts its epoch short);
- `tunelab_before`: the recipe's optimisation before issue #12 (4 rows × 2 micro-steps, lr 2e-4,
  dropout 0.05, eager), for its validation loss after the epoch;
- `tunelab_eager`: `tunelab` with train.compile=off, for what compiling buys.
tokens/s = real training tokens over training time (validation excluded), MFU = 6N × tokens/s over
the GPU's dense bf16 peak (tunelab.speed), val_loss_after = token-weighted loss on the recipe's
validation rows. `--smoke k=v ...` adds overrides (tiny data, few steps) for a CPU dry run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
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
    epoch: bool = False  # the real SAMSum epoch through `tunelab train` (EPOCH_IMPLS), not timed synthetic steps


CONFIGS = {
    "lora_all_r16_b4_s2048": Bench("llama2-7b", False, 4, 2048, goals=Goals(speedup=1.6)),
    "qlora_all_r16_b4_s2048": Bench("llama2-7b", True, 4, 2048, offload=True, goals=Goals(speedup=1.6, memory_ratio=0.6)),
    "qlora_all_r16_b1_s4096": Bench("llama2-7b", True, 1, 4096, offload=True, goals=Goals(peak_gib=6.5)),
    "qlora_all_r16_b4_s2048_cap15gib": Bench("llama2-7b", True, 4, 2048, cap_gib=15, offload=True),
    "smollm2_samsum": Bench("smollm2-135m", False, 64, 1024, vocab=49152, epoch=True, goals=Goals(speedup=8.0)),
}
DEFAULT_CONFIGS = ("lora_all_r16_b4_s2048", "qlora_all_r16_b4_s2048", "qlora_all_r16_b1_s4096")
IMPLS = ("baseline", "baseline_fixed", "tunelab_stock", "tunelab")
DEFAULT_IMPLS = ("baseline_fixed", "tunelab_stock", "tunelab")
EPOCH_IMPLS = ("tunelab", "hf_peft_padded", "tunelab_recipe", "tunelab_before", "tunelab_eager")
DEFAULT_EPOCH_IMPLS = ("tunelab", "hf_peft_padded", "tunelab_recipe")
RECIPE = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "recipes" / "samsum-lora.yaml"
FAST = ["train.batch_size=auto", "train.compile=auto", "train.eval_every=null", "train.save_every=null",
        "eval.before=false", "eval.generation_samples=0"]
EPOCH_OVERRIDES = {
    "tunelab_recipe": [],
    "tunelab": FAST,
    "tunelab_eager": [*FAST, "train.compile=off"],
    "tunelab_before": ["train.batch_size=4", "train.grad_accum=2", "train.tokens_per_step=null", "train.lr=2e-4",
                       "train.warmup_ratio=0.03", "peft.dropout=0.05", "train.logging_steps=1",
                       "train.eval_every=null", "train.save_every=null", "eval.before=false",
                       "eval.generation_samples=0", "train.compile=off"],
}
"""`tunelab train RECIPE` overrides per impl (besides model, data and run folder)."""


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


# --- smollm2_samsum: one real epoch of SAMSum through `tunelab train`, and the plain script ----------

def tunelab_epoch(impl: str, model: str, data: Path, smoke: list[str], runs: Path, timeout: float) -> tuple[dict, str]:
    """One `tunelab train` process for `impl`; its row from summary.json, and its output."""
    run_dir = runs / impl
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "tunelab", "train", str(RECIPE), f"model.name={model}",
           f"data.source={data / 'samsum'}", f"run.dir={run_dir}", *EPOCH_OVERRIDES[impl], *smoke]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, code = _text(err.stdout) + _text(err.stderr), "timeout"
    row = {"impl": impl, "wall_s": round(time.time() - start, 1), "exit": code, "overrides": EPOCH_OVERRIDES[impl]}
    if code != 0:
        return {**row, "error": output[-2500:]}, output
    s = json.loads((run_dir / "summary.json").read_text())
    t, before, after = s["train"], s["eval"]["before"], s["eval"]["after"]
    return {**row, "tokens_per_s": t["tokens_per_s"], "mfu": t["mfu"], "peak_memory_gib": t["peak_memory_gb"],
            "val_loss_after": after["loss"], "gpu": t["device"], "val_loss_before": before.get("loss"),
            "rouge_l_before": before.get("rouge_l"), "rouge_l_after": after.get("rouge_l"),
            "repetition_loops_before": before.get("repetition_loops"),
            "repetition_loops_after": after.get("repetition_loops"), "steps": t["steps"], "epochs": t["epochs"],
            "tokens": t["tokens"], "training_s": t["training_s"], "runtime_s": t["runtime_s"],
            "step_time_s": t.get("step_time_s"), "batch": t["batch"], "compiled": t["compiled"],
            "pad_fraction": t["pad_fraction"], "packing_efficiency": s["data"].get("packing_efficiency")}, output


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def hf_epoch(model: str, data: Path, smoke: list[str], steps: int | None) -> dict:
    """Child process: the plain transformers + peft script on the recipe's tokenized samples."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from tunelab.config import load_config
    from tunelab.data.batching import Collator
    from tunelab.data.prepare import prepare
    from tunelab.evals.loss import loss_sums, summarize
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import resolve
    from tunelab.speed import mfu, parameter_count

    cfg = load_config(RECIPE, [f"model.name={model}", f"data.source={data / 'samsum'}", "data.batching=padding", *smoke])
    source = resolve(cfg.model.name)
    tokenizer = load_tokenizer(source)
    prepared = prepare(cfg.data, tokenizer, cfg.run.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                attn_implementation="sdpa").to(device)
    base.config.use_cache = False
    torch.manual_seed(cfg.run.seed)
    net = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                          task_type="CAUSAL_LM"))
    rows = prepared.train
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.run.seed)).tolist()
    batches = [order[i : i + 64] for i in range(0, len(order), 64)][:steps]
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(opt, int(0.03 * len(batches)), len(batches))
    collate = Collator(tokenizer.pad_token_id)
    net.train()
    torch.cuda.reset_peak_memory_stats() if cuda else None
    _sync(cuda)
    start = time.perf_counter()
    for i, members in enumerate(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate([rows[j] for j in members]).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = net(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if i % 10 == 0:
            print(f"step {i + 1}/{len(batches)} loss {loss.item():.4f}", flush=True)
    _sync(cuda)
    seconds = time.perf_counter() - start
    tokens_per_s = collate.real_tokens / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    loader = torch.utils.data.DataLoader(prepared.eval, batch_size=cfg.eval.batch_size, collate_fn=Collator(tokenizer.pad_token_id))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        total, count = loss_sums(net, loader)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    return {"impl": "hf_peft_padded", "tokens_per_s": tokens_per_s, "mfu": mfu(parameter_count(net), tokens_per_s, gpu),
            "peak_memory_gib": peak, "val_loss_after": summarize(total.item(), count.item())["loss"], "gpu": gpu,
            "steps": len(batches), "epochs": len(batches) * 64 / len(rows) if steps else 1.0,
            "tokens": collate.real_tokens, "training_s": seconds, "pad_fraction": collate.pad_fraction}


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def run_epoch_config(config: str, impls: list[str], args, rows: list[dict], out: Path) -> list[dict]:
    """Every impl of an epoch config, one process each, a row written as soon as it is done; an impl
    is skipped when less than `--min-left-s` of the `--deadline-s` budget remains."""
    deadline = time.time() + args.deadline_s
    runs = Path(args.runs)
    new, log = [], out / "train_speed_logs.txt"
    for impl in impls:
        left = min(deadline - time.time(), args.impl_timeout_s + 5)
        if left < args.min_left_s:
            row, output = {"impl": impl, "error": f"skipped: {left:.0f} s of the budget left"}, ""
        elif impl == "hf_peft_padded":
            cmd = [sys.executable, __file__, "--hf", "--model", args.model, "--data", str(args.data), "--out", str(out),
                   *(["--hf-steps", str(args.hf_steps)] if args.hf_steps else []), "--smoke", *args.smoke]
            start = time.time()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left - 5)
                output = proc.stdout + proc.stderr
                found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
                row = json.loads(found[-1]) if found else {"impl": impl, "exit": proc.returncode, "error": output[-2500:]}
            except subprocess.TimeoutExpired as err:
                output = _text(err.stdout) + _text(err.stderr)
                row = {"impl": impl, "error": "timeout"}
            row["wall_s"] = round(time.time() - start, 1)
        else:
            row, output = tunelab_epoch(impl, args.model, args.data, args.smoke, runs, left - 5)
        with log.open("a") as f:
            f.write(f"===== {config} {impl}\n{output}\n")
        row = {"config": config, **row}
        new.append(row)
        rows.append(row)
        add_epoch_goals(new, CONFIGS[config])
        (out / "train_speed.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k not in ("error", "step_time_s", "batch")}), flush=True)
    return new


def add_epoch_goals(rows: list[dict], bench: Bench) -> None:
    """On the tunelab row: speed-up over hf_peft_padded (goal: bench.goals.speedup), the shipped recipe's
    speed against it (within 10 %), and its validation loss against the pre-#12 recipe's."""
    by = {r["impl"]: r for r in rows if r.get("tokens_per_s")}
    fast = by.get("tunelab")
    if fast is None:
        return
    goals = {}
    if "hf_peft_padded" in by:
        x = fast["tokens_per_s"] / by["hf_peft_padded"]["tokens_per_s"]
        goals["speedup_vs_hf_peft_padded"] = {"goal": bench.goals.speedup, "value": x, "met": x >= bench.goals.speedup}
    if "tunelab_recipe" in by:
        x = by["tunelab_recipe"]["tokens_per_s"] / fast["tokens_per_s"]
        goals["recipe_speed_vs_tunelab"] = {"goal": 0.9, "value": x, "met": x >= 0.9}
    if "tunelab_before" in by:
        x = fast["val_loss_after"] - by["tunelab_before"]["val_loss_after"]
        goals["val_loss_vs_recipe_before"] = {"goal": "<= 0", "value": x, "met": x <= 0}
    fast["goals"] = goals


def epoch_table(rows: list[dict]) -> str:
    hf = next((r for r in rows if r.get("impl") == "hf_peft_padded" and r.get("tokens_per_s")), None)
    lines = ["| impl | tokens/s | MFU | vs hf_peft_padded | peak GiB | val loss after | ROUGE-L before → after | "
             "loops after | steps | training s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("tokens_per_s"):
            lines.append(f"| {r['impl']} | {str(r.get('error', ''))[-80:]!r} | | | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.1f}×" if hf else ""
        rouge = (f"{r['rouge_l_before']:.3f} → {r['rouge_l_after']:.3f}" if r.get("rouge_l_before") is not None
                 and r.get("rouge_l_after") is not None else "")
        mfu_ = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
        peak = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else ""
        lines.append(f"| {r['impl']} | {r['tokens_per_s']:,.0f} | {mfu_} | {ratio} | {peak} | {r['val_loss_after']:.4f} | "
                     f"{rouge} | {r.get('repetition_loops_after', '')} | {r.get('steps')} | "
                     f"{r.get('training_s', 0):.1f} | {r.get('wall_s', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, help="folder for the random checkpoints (built once)")
    parser.add_argument("--lengths", type=Path,
                        help="sample token lengths: a JSON list, or data/samsum_lengths.json's prompt/completion pairs")
    parser.add_argument("--model", help="epoch configs: the model (.gguf or folder; real weights)")
    parser.add_argument("--data", type=Path, help="epoch configs: the folder holding samsum/")
    parser.add_argument("--runs", default="/tmp/train_speed_runs", help="epoch configs: run folders")
    parser.add_argument("--hf-steps", type=int, help="hf_peft_padded: stop after this many batches of 64")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="epoch configs: the whole budget")
    parser.add_argument("--min-left-s", type=float, default=30, help="epoch configs: skip an impl with less left")
    parser.add_argument("--impl-timeout-s", type=float, default=1e9, help="epoch configs: the most one impl may take")
    parser.add_argument("--smoke", nargs="*", default=[], help="epoch configs: extra overrides (a CPU dry run)")
    parser.add_argument("--hf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--impls", help=f"comma-separated, of {', '.join(IMPLS)} (epoch configs: {', '.join(EPOCH_IMPLS)})")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's); fewer for a smoke run")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--dequant", action="store_true", help="also time NF4 dequantization first")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf:
        print("ROW " + json.dumps(hf_epoch(args.model, args.data, args.smoke, args.hf_steps)), flush=True)
        return
    configs = args.configs.split(",")
    if all(CONFIGS[c].epoch for c in configs):
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / "train_speed.json"
        rows = json.loads(out.read_text()) if out.exists() else []
        impls = args.impls.split(",") if args.impls else list(DEFAULT_EPOCH_IMPLS)
        new = [row for c in configs for row in run_epoch_config(c, impls, args, rows, args.out)]
        print(epoch_table(new), flush=True)
        return
    lengths = read_lengths(args.lengths)
    impls = (args.impls or ",".join(DEFAULT_IMPLS)).split(",")
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
               str(args.out), "--steps", str(args.steps), "--impls", ",".join(impls), "--profile", args.profile,
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
