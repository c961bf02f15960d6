"""Where a `tunelab train` step spends its time on a GPU (issue #12): torch.profiler over a few
steady steps of the real trainer loop, on random weights of a model's shape and real text.

    python benchmarks/profile_train_step.py --shape DIR --out OUT [RECIPE] [key=value ...]

`--shape`: a model folder without weights (config.json, tokenizer files); random bf16 weights of
that shape are written next to OUT once. Writes OUT/profile.json: the median wall time of a step
after warm-up, the GPU kernel time per profiled step (busy share = kernel time / wall time), the
step split tunelab records in summary.json, and the top kernels (GPU time) and top ops (host time)
as text tables. What is timed: optimizer steps `--skip` .. `--skip + --steps` (profiled) of one
`tunelab train` process; data preparation, the batch probe and the compile check come before.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def random_weights(shape: Path, target: Path) -> Path:
    from transformers import AutoConfig, LlamaForCausalLM

    if (target / "model.safetensors").exists():
        return target
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(shape)).to(torch.bfloat16).save_pretrained(target)
    for f in shape.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copy(f, target / f.name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip", type=int, default=12, help="steps before profiling (warm-up)")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps")
    parser.add_argument("args", nargs="*", help="RECIPE (default recipes/samsum-lora.yaml), then overrides")
    a = parser.parse_args()
    recipe = a.args[0] if a.args and "=" not in a.args[0] else str(REPO / "recipes" / "samsum-lora.yaml")
    overrides = [x for x in a.args if "=" in x]
    a.out.mkdir(parents=True, exist_ok=True)
    model = random_weights(a.shape, a.out.parent / "random-model")

    from transformers import TrainerCallback

    from tunelab.config import load_config
    from tunelab.stages import sft
    from tunelab.trainer import TunelabTrainer

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        schedule=torch.profiler.schedule(wait=a.skip - 2, warmup=2, active=a.steps, repeat=1))
    ends: list[float] = []

    class Profiled(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            prof.step()

    init = TunelabTrainer.__init__

    def with_profiler(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Profiled())

    TunelabTrainer.__init__ = with_profiler
    cfg = load_config(recipe, [f"model.name={model}", f"run.dir={a.out / 'run'}", "train.eval_every=null",
                               "train.save_every=null", "eval.before=false", "eval.generation_samples=0",
                               f"train.max_steps={a.skip + a.steps + 4}", *overrides])
    prof.start()
    summary = sft.run(cfg).summary
    prof.stop()
    steps = [b - e for e, b in zip(ends, ends[1:])][a.skip // 2:]
    averages = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in averages  # the step ranges' GPU spans are not kernels
                    if not e.key.startswith("ProfilerStep"))
    wall = statistics.median(steps)
    result = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "recipe": recipe, "overrides": overrides,
        "step_wall_median_s": wall, "step_walls_s": steps,
        "gpu_kernel_s_per_step": kernel_us / 1e6 / a.steps,
        "gpu_busy_share": kernel_us / 1e6 / a.steps / wall,
        "tokens_per_step": summary["train"]["batch"]["tokens_per_step"], "batch": summary["train"]["batch"],
        "compiled": summary["train"]["compiled"], "step_time_s": summary["train"].get("step_time_s"),
        "tokens_per_s_run": summary["train"]["tokens_per_s"],
        "top_kernels": averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70),
        "top_host_ops": averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70),
    }
    (a.out / "profile.json").write_text(json.dumps(result, indent=2))
    print({k: v for k, v in result.items() if not k.startswith("top_")})
    print(result["top_kernels"])
    print(result["top_host_ops"])


if __name__ == "__main__":
    sys.exit(main())
