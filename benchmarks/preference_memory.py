"""Peak memory of `tunelab dpo` with preference.method dpo, orpo and simpo, each in its own process.

On a CPU `lifecycle.peak_memory_gb` is the process's peak resident set size (ru_maxrss: everything
the process held — Python, torch, the data, the model copies), on a GPU torch's peak allocated CUDA
memory; one process per run so no run inherits another's peak. DPO keeps a reference model: with
LoRA the reference is the base with the adapter disabled (no extra weights, one extra forward), with
full fine-tuning a second frozen copy of the model — the copy ORPO and SimPO do without.

    PYTHONPATH=src .venv/bin/python benchmarks/preference_memory.py MODEL [--peft lora full] [--out FILE.json]

MODEL: a model folder or `embedded`; the pairs are generated (short, so the model dominates).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = "apple river stone cloud paper green quick slow bright dark".split()


def pairs_file(folder: Path, n: int = 64) -> Path:
    rng = random.Random(0)
    phrase = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"question": phrase(12), "chosen": f"yes {phrase(20)}",
                                        "rejected": f"no {phrase(20)}"}) + "\n" for _ in range(n)))
    return path


def one_run(model: str, method: str, peft: str, data: Path, run_dir: Path, steps: int) -> dict:
    overrides = [
        f"model.name={model}", f"data.source={data}", f"run.dir={run_dir}", "data.format=custom",
        "data.fields={prompt: question, chosen: chosen, rejected: rejected}", "data.max_length=128",
        "data.max_eval_samples=4", f"preference.method={method}", f"peft.method={peft}", "train.batch_size=2",
        f"train.max_steps={steps}", "train.warmup_ratio=0", "eval.before=false", "eval.generation_samples=0",
        "eval.batch_size=2",
    ]
    code = ("import json, sys; from tunelab.config import load_config; from tunelab.stages import dpo; "
            "s = dpo.run(load_config(None, sys.argv[1:])).summary; "
            "print('SUMMARY ' + json.dumps({'train': s['train'], 'after': s['eval']['after']}))")
    done = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True)
    line = next((line for line in done.stdout.splitlines() if line.startswith("SUMMARY ")), None)
    if line is None:
        raise RuntimeError(f"{method}/{peft} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(line[len("SUMMARY "):])
    return {"method": method, "peft": peft, "peak_memory_gb": summary["train"]["peak_memory_gb"],
            "device": summary["train"]["device"], "runtime_s": summary["train"]["runtime_s"],
            "steps": summary["train"]["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--peft", nargs="+", default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = pairs_file(Path(tmp))
        for peft in args.peft:
            for method in ("dpo", "orpo", "simpo"):
                rows.append(one_run(args.model, method, peft, data, Path(tmp) / f"{peft}-{method}", args.steps))
                print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "rows": rows,
              "measure": "peak RSS of the process (CPU) or peak allocated CUDA memory (GPU), GiB"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
