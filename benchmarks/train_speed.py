"""Training throughput: plain transformers + peft (+ bitsandbytes) vs. tunelab's train path, same GPU, same run.

    python benchmarks/train_speed.py --model-dir DIR --lengths samsum_lengths.json --out OUT [--steps 20]

One process per (config, impl), as issue #6 asks. Samples have real lengths (drawn from SAMSum's
token lengths, contents random), so what packing saves shows:
- `baseline`: what a user writes with transformers + peft: batches of `batch` samples padded
  to the longest (DataCollatorWithPadding style), attention_mask, loss on every real token.
- `baseline_fixed`: the same stack on constant-length rows of `seq` random tokens (no padding
  at all): the setting of the reference numbers in DESIGN.md, an upper bound for plain HF.
- `tunelab_stock`: tunelab's packing (best-fit rows of `seq` tokens, restarting position_ids,
  the collator `tunelab train` uses) on the stock transformers modules (`train.kernels=off`).
- `tunelab`: the same batches with `tunelab.kernels.apply` (`train.kernels=auto`, what
  `tunelab train` does on CUDA): varlen attention + liger's fused kernels.
`tunelab` and `tunelab_stock` see identical weights, LoRA init and batches, so their per-step
losses are compared (`loss_max_rel_diff`). tokens/s counts real (non-pad) tokens, timed over the
steps after 3 warm-up steps. `--cap-gib` runs a config under a per-process memory cap
(`torch.cuda.set_per_process_memory_fraction`), e.g. a 16 GB T4's budget.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = {  # name → (quantized, batch, seq, memory cap GiB or None)
    "qlora_all_r16_b4_s2048": (True, 4, 2048, None),
    "lora_all_r16_b4_s2048": (False, 4, 2048, None),
    "qlora_all_r16_b1_s4096": (True, 1, 4096, None),
    "qlora_all_r16_b4_s2048_cap15gib": (True, 4, 2048, 15),
}
IMPLS = ("baseline", "baseline_fixed", "tunelab_stock", "tunelab")


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


def one(config: str, impl: str, model_dir: str, lengths: list[int], steps: int) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunelab import kernels

    quantized, batch, seq, cap = CONFIGS[config]
    if cap:
        torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0}}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    enabled = kernels.apply(model, "auto") if impl == "tunelab" else []
    if quantized:
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where activation checkpointing is off
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # enough samples for `steps` packed steps; the baseline takes as many sample batches
    per_row = max(1, int(seq // statistics.mean(lengths)))
    rows = samples(lengths, batch * steps * (per_row + 1), model.config.vocab_size)
    times, tokens, losses = [], 0, []
    torch.cuda.reset_peak_memory_stats()
    for step, (inputs, real) in enumerate(batches(impl, rows, batch, seq, pad_id=0)):
        if step == steps:
            break
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # what Trainer(bf16=True) does
            loss = model(**{k: v.cuda() for k, v in inputs.items()}).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)
            tokens += real
    return {"config": config, "impl": impl, "tokens_per_s": tokens / sum(times),
            "step_time_median_s": statistics.median(times), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss_max_rel_diff": None, "gpu": torch.cuda.get_device_name(), "steps_timed": len(times),
            "kernels": enabled, "losses": losses}


def build_model(out: Path) -> None:
    """A random Llama-2-7B-shape checkpoint with its real 32,000-token vocabulary (4-bit loading needs one on disk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_spine import SHAPES

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, **SHAPES["llama2-7b"])
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--lengths", type=Path, required=True, help="JSON list of sample token lengths")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of CONFIGS")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of IMPLS")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = json.loads(args.lengths.read_text())
    if not (Path(args.model_dir) / "config.json").exists():
        build_model(Path(args.model_dir))
    if args.one:
        print(json.dumps(one(*args.one, args.model_dir, lengths, args.steps)))
        return
    out = args.out / "train_speed.json"
    rows = json.loads(out.read_text()) if out.exists() else []  # several calls add to one file
    for config in args.configs.split(","):
        for impl in args.impls.split(","):
            proc = subprocess.run([sys.executable, __file__, "--model-dir", args.model_dir, "--lengths",
                                   str(args.lengths), "--out", str(args.out), "--steps", str(args.steps),
                                   "--one", config, impl], capture_output=True, text=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "config": config, "impl": impl, "error": proc.stderr[-2000:]}
            rows.append(row)
            add_loss_agreement(rows)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            out.write_text(json.dumps(rows, indent=2))


def add_loss_agreement(rows: list[dict]) -> None:
    """loss_max_rel_diff of `tunelab` against `tunelab_stock` (same weights, batches and seed)."""
    stock = {r["config"]: r["losses"] for r in rows if r.get("impl") == "tunelab_stock" and "losses" in r}
    for r in rows:
        if r.get("impl") == "tunelab" and r["config"] in stock and "losses" in r:
            pairs = list(zip(r["losses"], stock[r["config"]]))
            r["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in pairs)
            r["loss_steps_compared"] = len(pairs)


if __name__ == "__main__":
    main()
