"""Multi-GPU scaling: tunelab's training path on 1 and 2 GPUs of one machine, FSDP2 through the Trainer.

    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --lengths .gpu/samsum_lengths.json --out benchmarks/results \
        [--check-train .gpu/data/samsum --tokenizer .gpu/tok]
    python benchmarks/multigpu.py --dry-run [--check-train ...]   # CPU: the same processes, tiny model, gloo (DDP)

Llama-2-7B shape (hidden 4096, 32 layers, intermediate 11008, vocab 32,000), random weights,
bf16, sdpa, activation checkpointing, 4 rows of 2,048 tokens per GPU and step, packed (best-fit
decreasing, restarting positions) from samples with SAMSum's real token lengths (contents random).
Each configuration runs in its own `torchrun` with one process per GPU, through the building
blocks `tunelab train` uses: model loading and quantization (`tunelab.models.build`), the packing
collator, `training_arguments` (FSDP2 via transformers/accelerate when there are several
processes) and TunelabTrainer. tokens/s counts the real tokens of all GPUs over the timed steps
(after the warm-up steps); peak memory is the largest `max_memory_allocated` over the GPUs
during those steps.
Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU), per method. The main rows use
the stock transformers modules (`train.kernels=off`); the `_kernels` rows add what `tunelab train`
turns on by default on CUDA (varlen attention, liger's fused kernels). Everything runs in one
call, most telling first, within `--budget` seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_spine import SHAPES
from train_speed import samples

ROW, ROWS_PER_GPU, VOCAB = 2048, 4, 32000
CONFIGS = {  # name → (peft.method, quantization.bits, GPUs, train.kernels); the most telling run first
    "lora_all_r16": ("lora", None, 1, "off"),
    "lora_all_r16_fsdp2": ("lora", None, 2, "off"),
    "qlora_all_r16": ("lora", 4, 1, "off"),
    "qlora_all_r16_fsdp2": ("lora", 4, 2, "off"),
    "full_fsdp2": ("full", None, 2, "off"),
    "lora_all_r16_kernels": ("lora", None, 1, "auto"),  # tunelab train's CUDA default (issue #6's fused kernels)
    "lora_all_r16_kernels_fsdp2": ("lora", None, 2, "auto"),
}
CHECK = "check_tunelab_train_nproc2"  # not a measurement: `tunelab train --nproc 2` end to end (--check-train)
ORDER = [*(n for n in CONFIGS if CONFIGS[n][3] == "off"), CHECK, *(n for n in CONFIGS if CONFIGS[n][3] != "off")]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


class _Vocab:
    """`build_model` asks the tokenizer only for its size and pad id; the benchmark has no tokenizer,
    and a real one would resize the 32,000-row vocabulary."""

    pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def build_model(out: Path, tiny: bool) -> Path:
    """A random model of the shape, saved to disk (4-bit loading quantizes from a checkpoint)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    shape = TINY if tiny else SHAPES["llama2-7b"]
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5, **shape)
    torch.manual_seed(0)
    with torch.device("cpu" if tiny else "cuda"):
        model = LlamaForCausalLM(config).to(torch.float32 if tiny else torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()  # this process waits while the configurations run: leave GPU 0 to them
    return out


def packed_rows(lengths: list[int], n_rows: int, row: int) -> list[dict]:
    """At least n_rows packed rows of `row` tokens, labels = inputs (every token is learned)."""
    from tunelab.data.batching import pack_batch

    per_row = max(1, row // (sum(lengths) // len(lengths)))
    ids = samples(lengths, (n_rows + 2) * (per_row + 1), VOCAB)
    packed = pack_batch({"input_ids": ids, "labels": ids}, row)
    rows = [{"input_ids": i, "labels": y, "position_ids": p}
            for i, y, p in zip(packed["input_ids"], packed["labels"], packed["position_ids"])]
    return rows[:n_rows]


def worker(name: str, model_dir: str, lengths: list[int], steps: int, warmup: int, out: Path, tiny: bool) -> None:
    """One configuration inside torchrun: every process runs this; rank 0 writes the result row."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    from tunelab import distributed, kernels
    from tunelab.config import build_config
    from tunelab.data.batching import Collator
    from tunelab.models.build import apply_peft, build_model, model_options
    from tunelab.models.loading import ModelSource
    from tunelab.trainer import TunelabTrainer, training_arguments

    method, bits, _, kernel_mode = CONFIGS[name]
    row = 64 if tiny else ROW
    run_dir = tempfile.mkdtemp(prefix=f"multigpu-{name}-")
    cfg = build_config({
        "run": {"dir": run_dir},
        "model": {"name": model_dir},
        "quantization": {"bits": bits},
        "peft": {"method": method, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"source": "random", "adapter": "samsum", "max_length": row},
        "train": {"batch_size": ROWS_PER_GPU, "max_steps": warmup + steps, "lr": 1e-5, "warmup_ratio": 0.0,
                  "gradient_checkpointing": True, "logging_steps": 1000, "kernels": kernel_mode},
    })
    distributed.init(cfg)  # before loading: each process loads onto its own GPU
    sharded = distributed.fsdp_enabled(cfg)
    model = build_model(ModelSource(model_dir), _Vocab(), **model_options(cfg, sharded=sharded))
    enabled = kernels.apply(model, cfg.train.kernels, sharded=sharded)  # as load_for_training does
    model = apply_peft(model, cfg.peft, bool(bits), cfg.train.gradient_checkpointing)
    world = distributed.world_size()
    collator = Collator(pad_token_id=0)
    gpu = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        """Wall time and real tokens over the steps after the warm-up (collated tokens run one batch
        ahead of the steps, at both ends alike)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                if gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.start, self.tokens = time.perf_counter(), collator.real_tokens

        def on_train_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            self.seconds, self.tokens = time.perf_counter() - self.start, collator.real_tokens - self.tokens

    timer = StepTimer()
    trainer = TunelabTrainer(
        model=model, args=training_arguments(cfg, run_dir, []), data_collator=collator, callbacks=[timer],
        train_dataset=packed_rows(lengths, (warmup + steps + 1) * ROWS_PER_GPU * world, row),
    )
    trainer.train()
    stats = torch.tensor([timer.tokens, torch.cuda.max_memory_allocated() if gpu else 0], dtype=torch.float64,
                         device=trainer.args.device)
    if world > 1:
        tokens, peak = stats.clone(), stats.clone()
        dist.all_reduce(tokens, dist.ReduceOp.SUM)
        dist.all_reduce(peak, dist.ReduceOp.MAX)
        stats = torch.stack([tokens[0], peak[1]])
    if distributed.is_main():
        out.write_text(json.dumps({
            "config": name, "gpus": world, "method": cfg.method, "kernels": enabled, "fsdp2": trainer.is_fsdp_enabled,
            "tokens_per_s": stats[0].item() / timer.seconds,
            "tokens_per_s_per_gpu": stats[0].item() / timer.seconds / world,
            "peak_memory_gib_per_gpu": stats[1].item() / 2**30,
            "gpu": torch.cuda.get_device_name() if gpu else "cpu", "steps_timed": steps, "tokens_timed": int(stats[0]),
            "rows_per_gpu": ROWS_PER_GPU, "row_tokens": row,
        }))


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code, output) of cmd; on timeout the whole process group is killed (exit code None)."""
    # its own session, so that a timeout ends torchrun's workers too (they would keep the GPUs)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"NCCL_NVLS_ENABLE": "0", **os.environ, "TQDM_DISABLE": "1"},  # NVLS off on shared hosts
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, f"timed out after {timeout:.0f} s\n" + proc.communicate()[0]


def run_config(name: str, args, model_dir: Path, timeout: float) -> dict:
    gpus = CONFIGS[name][2]
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        code, output = _run([
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", __file__,
            "--one", name, "--model-dir", str(model_dir), "--lengths", str(args.lengths), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--result", str(result), *(["--dry-run"] if args.dry_run else [])], timeout)
        ok = code == 0 and result.exists()
        row = json.loads(result.read_text()) if ok else {"config": name, "gpus": gpus, "error": output[-3000:]}
    row["wall_s"] = round(time.time() - start, 1)
    return row


def check_train(args, timeout: float) -> dict:
    """`tunelab train --nproc 2` end to end on a tiny random Llama and SAMSum: 5 steps with a sharded
    checkpoint, then `--resume` to 10, then the consolidated adapter. Checks the path, not speed."""
    start = time.time()
    model_dir = build_model(args.models / "tiny-v32000", tiny=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, model_dir / name)
    run_dir = Path(tempfile.mkdtemp(prefix="multigpu-train-")) / "run"
    recipe = run_dir.parent / "recipe.yaml"
    recipe.write_text("{}\n")
    cmd = [sys.executable, "-m", "tunelab", "train", str(recipe), f"model.name={model_dir}", f"run.dir={run_dir}",
           f"data.source={args.check_train}", "data.format=samsum", "data.max_train_samples=400",
           "data.max_eval_samples=16", "train.batch_size=2", "train.save_every=5", "eval.generation_samples=2",
           "eval.max_new_tokens=8", "--nproc", "2"]
    row = {"config": CHECK, "gpus": 2}
    for extra in (["train.max_steps=5"], ["train.max_steps=10", "--resume"]):
        code, output = _run(cmd + extra, max(30.0, timeout - (time.time() - start)))
        if code != 0:
            row["error"] = f"{' '.join(extra)}: exit {code}\n{output[-3000:]}"
            break
    if "error" not in row:
        summary = json.loads((run_dir / "summary.json").read_text())
        shards = sorted(p.name for p in (run_dir / "checkpoints" / "checkpoint-5").rglob("*.distcp"))
        row.update(steps=summary["train"]["steps"], final_loss=summary["train"]["final_loss"],
                   eval=summary["eval"], adapter=(run_dir / "adapter" / "adapter_model.safetensors").is_file(),
                   checkpoint_5_shards=shards, gpu=summary["train"]["device"])
    row["wall_s"] = round(time.time() - start, 1)
    return row


def add_scaling(rows: list[dict]) -> None:
    """scaling_efficiency on every multi-GPU row whose method (and kernels) also ran on 1 GPU."""
    def key(r):
        return r.get("method"), tuple(r.get("kernels") or ())

    single = {key(r): r["tokens_per_s"] for r in rows if r.get("gpus") == 1 and "tokens_per_s" in r}
    for r in rows:
        if r.get("gpus", 1) > 1 and key(r) in single:
            r["speedup_vs_1_gpu"] = r["tokens_per_s"] / single[key(r)]
            r["scaling_efficiency"] = r["speedup_vs_1_gpu"] / r["gpus"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=Path, default=Path(".gpu/samsum_lengths.json"),
                        help="JSON list of sample token lengths (default: the one the GPU runs carry)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--models", type=Path, default=Path("/tmp/tunelab-models"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--only", default=",".join(ORDER), help=f"comma-separated, from {', '.join(ORDER)}")
    parser.add_argument("--timeout", type=int, default=240, help="seconds one configuration may take")
    parser.add_argument("--budget", type=int, default=540, help="seconds for everything; configurations that "
                        "would start later are skipped (one device call is at most 600 s)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (2 processes, gloo): checks the script")
    parser.add_argument("--check-train", type=Path, metavar="SAMSUM_DIR",
                        help=f"SAMSum folder for `{CHECK}`: `tunelab train --nproc 2` end to end, with --resume")
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu/tok"), help="tokenizer folder for --check-train")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = json.loads(args.lengths.read_text()) if args.lengths.exists() else None
    if args.dry_run:
        lengths = [min(n, 60) for n in lengths or [17, 23, 40, 9, 31, 55]]
    elif lengths is None:
        parser.error(f"--lengths {args.lengths}: no such file")
    if args.one:
        worker(args.one, args.model_dir, lengths, args.steps, args.warmup, args.result, args.dry_run)
        return

    started = time.time()
    model_dir = build_model(args.models / ("tiny-v32000" if args.dry_run else "llama2-7b-v32000"), args.dry_run)
    out = args.out / f"multigpu-{datetime.date.today()}{'-dry-run' if args.dry_run else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only.split(","):
        if name == CHECK and not args.check_train:
            continue
        left = args.budget - (time.time() - started)
        if left < 45:
            rows.append({"config": name, "error": "skipped: --budget spent"})
        elif name == CHECK:
            rows.append(check_train(args, left))
        else:
            rows.append(run_config(name, args, model_dir, min(args.timeout, left)))
        add_scaling(rows)
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")  # after every row: a timeout keeps what finished
    print(f"results: {out}")


if __name__ == "__main__":
    main()
