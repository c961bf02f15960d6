"""Training throughput: plain transformers + peft (+ bitsandbytes) vs. tunelab's train path, same GPU, same run.

    python benchmarks/train_speed.py --model-dir DIR --lengths samsum_lengths.json --out OUT [--steps 20]

One process per (config, impl), as issue #6 asks. Samples have real lengths (drawn from SAMSum's
token lengths, contents random), so what packing saves shows:
- `baseline`: what a user writes with transformers + peft: batches of `batch` samples padded
  to the longest (DataCollatorWithPadding style), attention_mask, loss on every real token.
- `tunelab`: tunelab's building blocks (model/peft loading, best-fit packing into rows of
  `seq` tokens with restarting position_ids, the same collator `tunelab train` uses).
tokens/s counts real (non-pad) tokens, timed over the steps after 3 warm-up steps.
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

CONFIGS = {  # name → (quantized, batch, seq)
    "qlora_all_r16_b4_s2048": (True, 4, 2048),
    "lora_all_r16_b4_s2048": (False, 4, 2048),
}


def samples(lengths: list[int], n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.choice(lengths))] for _ in range(n)]


def batches(impl: str, rows: list[list[int]], batch: int, seq: int, pad_id: int):
    """Yield model inputs: padded sample batches (baseline) or packed rows (tunelab)."""
    from tunelab.data.batching import Collator, pack_batch

    collate = Collator(pad_id)
    if impl == "tunelab":
        packed = pack_batch({"input_ids": rows, "labels": rows}, seq)
        rows_ = [dict(zip(packed, vals)) for vals in zip(*packed.values())]
    else:
        rows_ = [{"input_ids": r, "labels": r} for r in rows]
    for i in range(0, len(rows_) - batch + 1, batch):
        yield collate(rows_[i : i + batch]), sum(len(r["input_ids"]) for r in rows_[i : i + batch])


def one(config: str, impl: str, model_dir: str, lengths: list[int], steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized, batch, seq = CONFIGS[config]
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0}}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
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
    times, tokens = [], 0
    torch.cuda.reset_peak_memory_stats()
    for step, (inputs, real) in enumerate(batches(impl, rows, batch, seq, pad_id=0)):
        if step == steps:
            break
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # what Trainer(bf16=True) does
            loss = model(**{k: v.cuda() for k, v in inputs.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)
            tokens += real
    return {"config": config, "impl": impl, "tokens_per_s": tokens / sum(times),
            "step_time_median_s": statistics.median(times), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss_max_rel_diff": None, "gpu": torch.cuda.get_device_name(), "steps_timed": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--lengths", type=Path, required=True, help="JSON list of sample token lengths")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = json.loads(args.lengths.read_text())
    if args.one:
        print(json.dumps(one(*args.one, args.model_dir, lengths, args.steps)))
        return
    rows = []
    for config in CONFIGS:
        for impl in ("baseline", "tunelab"):
            proc = subprocess.run([sys.executable, __file__, "--model-dir", args.model_dir, "--lengths",
                                   str(args.lengths), "--out", str(args.out), "--steps", str(args.steps),
                                   "--one", config, impl], capture_output=True, text=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "config": config, "impl": impl, "error": proc.stderr[-2000:]}
            print(json.dumps(row), flush=True)
            rows.append(row)
            (args.out / "train_speed.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
