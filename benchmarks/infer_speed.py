"""Generation throughput at the same KV memory: static `generate()` batches vs the paged engine.

    PYTHONPATH=src python benchmarks/infer_speed.py [--shape llama2-7b] [--budget-tokens 16384] [--n 256]
    python benchmarks/infer_speed.py --write-lengths ../shared/data/samsum   # CPU, once: the data file below

A random-weight Llama of a real shape in bf16 on the GPU (no weights or tokenizer needed), one
process, both backends through tunelab's engine (`tunelab.inference.bench`), greedy. Requests
have SAMSum's real lengths, from `benchmarks/data/samsum_lengths.json` (prompt = the rendered
"Summarize this dialogue" chat prompt, answer = the reference summary, SmolLM2 tokenizer),
contents random. Two workloads: `samsum` (each request generates as many tokens as its reference
summary has — as if it stopped at EOS there) and `samsum-128` (128 new tokens each).
Rows go to `benchmarks/results/infer_speed-<date>-<gpu>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
LENGTHS = HERE / "data" / "samsum_lengths.json"
SHAPES = {  # name → LlamaConfig fields
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,  # CPU smoke run
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048),
}


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


def random_llama(shape: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=True)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-lengths", metavar="SAMSUM_DIR", help="write the lengths file from SAMSum and stop")
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--budget-tokens", type=int, default=16384, help="KV budget for both backends, in tokens")
    parser.add_argument("--n", type=int, default=256, help="requests per workload")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--workloads", default="samsum,samsum-128")
    parser.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                        help="paged: CUDA graphs (auto = transformers decides)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.write_lengths:
        write_lengths(args.write_lengths, 400)
        return

    import torch
    import transformers

    from tunelab.inference.bench import bench, format_table
    from tunelab.inference.kv import bytes_per_token

    pairs = json.loads(LENGTHS.read_text())["pairs"]
    model = random_llama(args.shape)
    # Random weights, random token ids: the engines need only the pad and EOS ids, never text.
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2, bos_token_id=1)
    rng = random.Random(0)
    chosen = [rng.choice(pairs) for _ in range(args.n)]
    prompts = [[1] + [rng.randrange(100, model.config.vocab_size) for _ in range(p - 1)] for p, _ in chosen]
    per_token = bytes_per_token(model.config, 2)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{args.shape} bf16 on {device}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; KV budget {args.budget_tokens} tokens = "
          f"{args.budget_tokens * per_token / 2**30:.2f} GiB; {args.n} requests", flush=True)
    rows = []
    for workload in args.workloads.split(","):
        limits = [a for _, a in chosen] if workload == "samsum" else [int(workload.split("-")[1])] * args.n
        got = bench(model, tokenizer, prompts, limits, kv_budget_tokens=args.budget_tokens, page_size=args.page_size,
                    cuda_graph={"auto": None, "on": True, "off": False}[args.cuda_graph])
        for row in got:
            row |= {"workload": workload, "shape": args.shape, "requests": args.n, "cuda_graph": args.cuda_graph,
                    "kv_budget_gib": round(args.budget_tokens * per_token / 2**30, 2),
                    "torch": torch.__version__, "transformers": transformers.__version__}
        speedup = got[1]["tokens_per_s"] / got[0]["tokens_per_s"]
        print(f"\n{workload}: paged/static throughput {speedup:.2f}x\n{format_table(got)}", flush=True)
        rows += got
    gpu = device.replace("NVIDIA", "").strip().replace(" ", "-")
    out = Path(args.out) / f"infer_speed-{datetime.date.today()}-{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nrows → {out}")


if __name__ == "__main__":
    sys.exit(main())
