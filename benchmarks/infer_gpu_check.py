"""GPU check of the paged engine before the benchmark: the Triton kernels and the varlen prefill
against their torch references in bf16, CUDA-graph capture, both step programs on the SmolLM2
shape (speed, where the time goes, tokens vs generate()), a short 7B-shape run, and the
benchmark's hf_static_compile path on a tiny model.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/infer_gpu_check.py --out $OUT/check.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from infer_speed import equality, graph_replay_ms, hf_run, random_llama, top_kernels, tunelab_run  # noqa: E402


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def kernels() -> dict:
    """Each kernel on fresh random inputs vs its reference; decode timed vs gather + sdpa."""
    from tunelab.inference import attention, fused, triton_ops
    from tunelab.inference.attention import Prefill

    out, dev, dt = {}, "cuda", torch.bfloat16
    torch.manual_seed(0)
    for heads, kv_heads, dim, batch, ctx in [(9, 3, 64, 64, 320), (32, 32, 128, 64, 320), (32, 32, 128, 16, 3000)]:
        page, blocks = 16, batch * (ctx // 16 + 2) + 1
        cache = torch.randn(2, blocks, page, kv_heads, dim, dtype=dt, device=dev)
        width = ctx // page + 2
        tables = torch.stack([torch.randperm(blocks - 1, device=dev)[:width] + 1 for _ in range(batch)])
        lens = torch.randint(1, ctx, (batch,), device=dev)
        lens[0], lens[-1] = 1, ctx
        q = torch.randn(batch, heads, dim, dtype=dt, device=dev)
        ref = attention.reference_decode(q, cache, tables, lens, dim**-0.5)
        got = triton_ops.paged_decode(q, cache, tables, lens, dim**-0.5)
        name = f"decode_{heads}x{kv_heads}x{dim}_b{batch}_ctx{ctx}"
        from triton.testing import do_bench

        kv_bytes = int(lens.sum()) * 2 * kv_heads * dim * 2
        t_k = do_bench(lambda: triton_ops.paged_decode(q, cache, tables, lens, dim**-0.5), return_mode="median")
        t_r = do_bench(lambda: attention.reference_decode(q, cache, tables, lens, dim**-0.5), return_mode="median")
        out[name] = {"rel_err": rel(got, ref), "triton_ms": round(t_k, 4), "reference_ms": round(t_r, 4),
                     "triton_tb_s": round(kv_bytes / t_k / 1e9, 2)}
    x, w, r = torch.randn(37, 576, dtype=dt, device=dev), torch.randn(576, dtype=dt, device=dev), torch.randn(37, 576, dtype=dt, device=dev)
    r1, r2 = r.clone(), r.clone()
    out["rmsnorm_equal"] = torch.equal(triton_ops.rmsnorm(x, w, 1e-5), fused.rmsnorm(x, w, 1e-5))
    out["add_rmsnorm_equal"] = (torch.equal(triton_ops.rmsnorm(x, w, 1e-5, r1), fused.rmsnorm(x, w, 1e-5, r2))
                                and torch.equal(r1, r2))
    tokens, hq, hk, dim = 37, 9, 3, 64
    qq, kk, vv = (torch.randn(tokens, h * dim, dtype=dt, device=dev) for h in (hq, hk, hk))
    cos, sin = torch.randn(tokens, dim, dtype=dt, device=dev), torch.randn(tokens, dim, dtype=dt, device=dev)
    c1, c2 = torch.zeros(2, 8, 16, hk, dim, dtype=dt, device=dev), torch.zeros(2, 8, 16, hk, dim, dtype=dt, device=dev)
    slots = torch.randperm(8 * 16, device=dev)[:tokens]
    q1, q2 = qq.clone(), qq.clone()
    triton_ops.rope_write(q1, kk, vv, cos, sin, c1, slots)
    fused.rope_write(q2, kk, vv, cos, sin, c2, slots)
    out["rope_write_equal"] = torch.equal(q1, q2) and torch.equal(c1, c2)
    g, u = torch.randn(37, 1536, dtype=dt, device=dev), torch.randn(37, 1536, dtype=dt, device=dev)
    out["silu_mul_rel_err"] = rel(triton_ops.silu_mul(g, u), fused.silu_mul(g, u))
    # varlen prefill with a cached prefix (bottom-right causal) vs the reference
    for heads, kv_heads in [(9, 3), (32, 32)]:
        dim = 64 if heads == 9 else 128
        q_lens, k_lens = [5, 300, 64], [5, 812, 64]
        q = torch.randn(sum(q_lens), heads, dim, dtype=dt, device=dev)
        keys = torch.randn(sum(k_lens), kv_heads, dim, dtype=dt, device=dev)
        values = torch.randn_like(keys)
        cu = lambda n: torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device=dev)  # noqa: E731
        p = Prefill(cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), torch.empty(0), q_lens, k_lens)
        out[f"varlen_prefix_{heads}x{kv_heads}_rel_err"] = rel(attention.varlen_prefill(q, keys, values, p, dim**-0.5),
                                                               attention.reference_prefill(q, keys, values, p, dim**-0.5))
    return out


def engine_runs(shape: str, n: int, prompt: int, new: int, programs=("fused", "hf")) -> dict:
    model = random_llama(shape, "cuda")
    import random

    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(100, model.config.vocab_size) for _ in range(prompt - 1)] for _ in range(n)]
    limits = [new] * n
    res = {}
    for program in programs:
        t = time.perf_counter()
        row, engine = tunelab_run(model, prompts, limits, program)
        row["total_s"] = round(time.perf_counter() - t, 2)
        row["graph_replay_ms"] = graph_replay_ms(engine, next(b for b in engine.runner.buckets if b >= n))
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        outputs = row.pop("outputs")
        if shape == "smollm2-135m":
            row["top_kernels"] = top_kernels(engine, prompts, limits)
        engine.close()
        res[program] = row
        res[program + "_outputs_head"] = outputs[:2]
        res.setdefault("outputs", {})[program] = outputs
    hf = hf_run(model, prompts[:16], limits[:16], static=False)
    for program in programs:
        res[program] |= equality(res["outputs"][program][:16], hf["outputs"])
    res.pop("outputs")
    res["hf_generate_16_tokens_per_s"] = hf["tokens_per_s"]
    del model
    torch.cuda.empty_cache()
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=180)
    args = parser.parse_args()
    began = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - began)  # noqa: E731
    import transformers
    import triton

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "triton": triton.__version__}
    path = Path(args.out)

    def save():
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    steps = [("kernels", 150, kernels),
             ("pytest_gpu", 140, lambda: subprocess.run(
                 [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_paged_engine.py", "-k",
                  "triton"], capture_output=True, text=True, timeout=60).stdout[-800:]),
             ("smollm2", 110, lambda: engine_runs("smollm2-135m", 64, 256, 128)),
             ("llama2_7b", 60, lambda: engine_runs("llama2-7b", 64, 256, 32, programs=("fused",))),
             ("static_compile_tiny", 45, lambda: subprocess.run(
                 [sys.executable, str(HERE / "infer_speed.py"), "--shapes", "tiny", "--scale", "0.1", "--workloads",
                  "uniform", "--impls", "hf_static_compile,hf_generate", "--budget-s", "40", "--out",
                  str(path.with_name("tiny_rows.json"))], capture_output=True, text=True, timeout=max(5, left() - 5)
             ).stdout[-2000:])]
    for name, need, fn in steps:
        if left() < need:
            result[name] = f"skipped: {left():.0f} s left"
            continue
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # noqa: BLE001 — keep what the other checks found
            import traceback

            traceback.print_exc()
            result[name] = f"failed: {type(err).__name__}: {err}"
        print(f"== {name} ({time.perf_counter() - t:.1f} s)\n{json.dumps(result[name], indent=1, default=str)[:3000]}",
              flush=True)
        save()
    save()


if __name__ == "__main__":
    main()
