"""Several processes train exactly like one: FSDP2 through the Trainer (torchrun, gloo on the CPU),
sharded checkpoints that resume, one consolidated adapter; plus the launch and settings plumbing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tunelab import cli, distributed
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.stages import sft
from tunelab.tracking.metrics import read_jsonl

# accelerate turns FSDP on only for GPU process groups (MULTI_GPU, ...): on the CPU the Trainer would
# quietly run DDP. FSDP2 itself runs on gloo (torch 2.13), so this launcher marks accelerate's state
# FSDP right after accelerate built it; everything else is the path a GPU run takes
# (Trainer -> accelerate -> fully_shard, DCP checkpoints, the gathered state dict).
FSDP_ON_CPU = """
import sys
from accelerate.state import AcceleratorState, DistributedType, PartialState

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
from tunelab.cli import main

sys.exit(main())
"""


def _overrides(run_dir, model_dir, task_dir, *extra) -> list[str]:
    return [
        f"model.name={model_dir}", f"data.source={task_dir}", "data.format=custom", "data.fields={messages: messages}",
        f"run.dir={run_dir}", "data.max_length=256", "data.max_train_samples=48", "data.max_eval_samples=8",
        "train.lr=3e-3", "train.max_steps=4", "train.save_every=2", "train.warmup_ratio=0",
        "train.gradient_checkpointing=true", "eval.generation_samples=1", "eval.max_new_tokens=2",
        "peft.dropout=0",  # dropout masks come from each process's own RNG stream: not comparable
        *extra,
    ]


def _torchrun(tmp_path, overrides: list[str], *flags: str) -> str:
    launcher = tmp_path / "fsdp_on_cpu.py"
    launcher.write_text(FSDP_ON_CPU)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(launcher),
           "train", str(recipe), *overrides, *flags]
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "TQDM_DISABLE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _losses(run_dir) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, task_dir):
    """The same global batch of 2 packed rows: one process with batch 2, two FSDP2 processes with 1 each."""
    base = tmp_path_factory.mktemp("distributed")
    one = sft.run(load_config(None, _overrides(base / "one", tiny_model_dir, task_dir, "train.batch_size=2"))).run_dir
    _torchrun(base, _overrides(base / "two", tiny_model_dir, task_dir, "train.batch_size=1"))
    return one, base / "two"


def test_two_fsdp2_processes_train_like_one_process_with_the_same_global_batch(runs):
    one, two = runs
    # Same rows, same order, same token-weighted loss; only float summation order differs (the
    # gradient reduce-scatter adds two halves), ~1e-7 relative in fp32. A lost or repeated row, or a
    # per-process mean instead of the global token mean, moves the loss by > 1e-3.
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-5), step
        assert b[step][1] == pytest.approx(a[step][1], rel=1e-4), step
    evals = [[(r["eval_loss"], r["eval_tokens"]) for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
             for run in runs]
    assert len(evals[0]) == len(evals[1]) == 2  # before (deferred until FSDP2 sharded the model) and after
    for (loss_1, tokens_1), (loss_2, tokens_2) in zip(*evals):
        assert tokens_2 == tokens_1  # every validation token counted once, none repeated to even out processes
        assert loss_2 == pytest.approx(loss_1, rel=1e-6)
    # the shards were gathered into one ordinary adapter, equal to the single-process one
    single, gathered = _adapter(one), _adapter(two)
    assert sorted(gathered) == sorted(single)
    for key in single:
        torch.testing.assert_close(gathered[key], single[key], rtol=0, atol=1e-5)


def test_every_process_writes_its_shard_and_only_rank_0_the_run_folder(runs):
    _, two = runs
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {p.name for p in (two / "checkpoints" / "checkpoint-2" / part).iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
    steps = [r["step"] for r in read_jsonl(two / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one line per step, not one per process
    assert (two / "summary.json").is_file() and (two / "report.html").is_file()


def test_a_killed_fsdp2_run_resumes_from_its_sharded_checkpoint(runs, tmp_path, tiny_model_dir, task_dir):
    _, two = runs
    killed = tmp_path / "killed"
    shutil.copytree(two, killed)  # as if killed right after the step-2 checkpoint: nothing later exists
    shutil.rmtree(killed / "checkpoints" / "checkpoint-4")
    shutil.rmtree(killed / "adapter")
    for later in ("summary.json", "report.html", "samples.jsonl"):
        (killed / later).unlink()
    _torchrun(tmp_path, _overrides(killed, tiny_model_dir, task_dir, "train.batch_size=1"), "--resume")
    resumed, straight = _losses(killed), _losses(two)
    assert sorted(resumed) == sorted(straight)
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
    resumed, straight = _adapter(killed), _adapter(two)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_qlora_shards_its_4bit_weights_and_trains_like_one_process(tmp_path, tiny_model_dir, task_dir):
    qlora = ("quantization.bits=4", "peft.r=8", "train.max_steps=2", "eval.before=false")
    one = sft.run(load_config(None, _overrides(tmp_path / "one", tiny_model_dir, task_dir, *qlora,
                                               "train.batch_size=2"))).run_dir
    output = _torchrun(tmp_path, _overrides(tmp_path / "two", tiny_model_dir, task_dir, *qlora, "train.batch_size=1"))
    assert "Excluding from FSDP2 sharding" not in output  # accelerate's note when 4-bit storage is uint8
    a, b = _losses(one), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-5), step
    single, gathered = _adapter(one), _adapter(tmp_path / "two")
    for key in single:
        torch.testing.assert_close(gathered[key], single[key], rtol=0, atol=1e-5)


def test_fsdp2_settings_are_the_keys_transformers_reads(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    cfg = load_config(None, ["data.source=x", "data.format=samsum", "distributed.wrap=[LlamaDecoderLayer]",
                             "distributed.reshard_after_forward=false"])
    assert distributed.trainer_arguments(cfg) == {}  # one process: nothing distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    extra = distributed.trainer_arguments(cfg)
    monkeypatch.delenv("WORLD_SIZE")
    # TrainingArguments with WORLD_SIZE=2 would join a process group; run its FSDP parsing alone.
    args = TrainingArguments("unused", use_cpu=True)
    args.fsdp, args.fsdp_config = extra["fsdp"], extra["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(**args._process_fsdp_args())
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)  # each rank saves its own part


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype():
    from tunelab.config import QuantizationConfig
    from tunelab.models.build import quantization_config

    q = QuantizationConfig(bits=4)
    assert quantization_config(q, torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(q, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default


@pytest.mark.parametrize("overrides, field", [
    (["quantization.bits=8", "peft.method=lora"], "distributed.strategy"),
    (["quantization.bits=4", "distributed.cpu_ram_efficient_loading=true"], "distributed.cpu_ram_efficient_loading"),
])
def test_config_rejects_what_fsdp_cannot_do(overrides, field):
    from tunelab.distributed import check

    cfg = load_config(None, ["data.source=x", "data.format=samsum", *overrides])
    check(cfg, 1)  # one process: the distributed section does not apply
    with pytest.raises(TunelabError, match=field):
        check(cfg, 2)
    check(load_config(None, ["data.source=x", "data.format=samsum", "distributed.strategy=ddp", "quantization.bits=8"]), 2)


def test_nproc_relaunches_the_same_command_under_torchrun(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {source: x, adapter: samsum}\n")
    launched = []

    def execv(path, cmd):
        launched.append(cmd)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    for argv in (["train.max_steps=3", "--nproc", "2"], ["--nproc=2", "train.max_steps=3"]):
        with pytest.raises(SystemExit):
            cli.main(["train", str(recipe), *argv])
    expected = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "tunelab", "train", str(recipe), "train.max_steps=3"]
    assert launched == [expected, expected]  # overrides after --nproc are overrides too
    # a bad config, or more processes than GPUs, stops before any process starts
    assert cli.main(["train", str(recipe), "train.epoks=1", "--nproc", "2"]) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["train", str(recipe), "--nproc", "2"]) == 2
    assert len(launched) == 2
