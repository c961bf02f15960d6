"""Run `tunelab train` itself on a GPU with random-weight models of real shapes; collect the summaries.

    python benchmarks/gpu_spine.py --data DIR_WITH_samsum --tokenizer TOKENIZER_DIR --out OUT [--only NAME,...]

No weights can be downloaded on the GPU machines, so the models are random: speed and memory
are real, losses are not meaningful. The tokenizer is SmolLM2's (the embedded model's), so the
Llama-2-7B shape gets a 49,216-row vocabulary instead of 32,000 (about 2 % more parameters).
One `tunelab train` process per configuration, as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, tie_word_embeddings=False, rope_theta=10000.0),
}

COMMON = ["data.format=samsum", "data.max_eval_samples=64", "eval.generation_samples=4", "eval.max_new_tokens=32",
          "eval.metrics=[rouge_l]", "train.logging_steps=5", "train.warmup_ratio=0.1"]

RUNS = {  # name → (shape, overrides)
    "smollm2_lora_packed": ("smollm2-135m", ["data.max_length=2048", "train.batch_size=8", "train.max_steps=60"]),
    "smollm2_lora_padded": ("smollm2-135m", ["data.batching=padding", "data.max_length=1024", "train.batch_size=64",
                                             "train.max_steps=30"]),
    "llama2_7b_qlora_b4_s2048": ("llama2-7b", ["quantization.bits=4", "data.max_length=2048", "train.batch_size=4",
                                               "train.gradient_checkpointing=true", "train.max_steps=40",
                                               "train.optim=paged_adamw_8bit"]),
    "llama2_7b_lora_b4_s2048": ("llama2-7b", ["data.max_length=2048", "train.batch_size=4",
                                              "train.gradient_checkpointing=true", "train.max_steps=12"]),
}


def build_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random bf16 model of the shape, saved with the tokenizer (4-bit loading needs a checkpoint on disk)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = out / shape
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = -(-(len(tokenizer) + 1) // 64) * 64  # room for tunelab's pad token
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=Path("/tmp/tunelab-models"))
    parser.add_argument("--only", default=",".join(RUNS))
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.get_device_name()
    rows = []
    for name in args.only.split(","):
        shape, overrides = RUNS[name]
        model_dir = build_model(shape, args.tokenizer, args.models)
        run_dir = Path("/tmp/tunelab-runs") / name
        recipe = Path("/tmp/tunelab-empty.yaml")
        recipe.write_text("{}\n")  # everything comes from the overrides below
        cmd = [sys.executable, "-m", "tunelab", "train", str(recipe), f"model.name={model_dir}",
               f"data.source={args.data / 'samsum'}", f"run.dir={run_dir}", f"run.name={name}", *COMMON, *overrides]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        row = {"config": name, "gpu": gpu, "wall_s": round(time.time() - start, 1), "exit": proc.returncode}
        if proc.returncode == 0:
            s = json.loads((run_dir / "summary.json").read_text())
            row.update(method=s["method"], **{k: s["train"][k] for k in ("steps", "tokens_per_s", "peak_memory_gb",
                                                                          "final_loss", "pad_fraction")},
                       packing_efficiency=s["data"]["packing_efficiency"], eval=s["eval"])
        else:
            row["stderr_tail"] = proc.stderr[-3000:]
        print(json.dumps(row), flush=True)
        rows.append(row)
        (args.out / "gpu_spine.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
