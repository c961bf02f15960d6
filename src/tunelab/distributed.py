"""Training on several processes with PyTorch's own stack: torchrun starts them, the Trainer
(through accelerate) shards data and, with FSDP2, parameters, gradients and optimizer state.

tunelab adds no parallelism of its own. `tunelab train --nproc N` re-runs itself under
`torch.distributed.run`; every process builds the same model and Trainer. What lives here is
only what differs by rank or by strategy: launching, the FSDP2 settings handed to
transformers, which process writes files, and gathering the shards into one HF folder.
Ranks are global (RANK), never node-local, so nothing assumes a single machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from tunelab.config import Config
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """The process that writes the run folder (global rank 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def fsdp_enabled(cfg: Config) -> bool:
    return world_size() > 1 and cfg.distributed.strategy == "fsdp"


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m tunelab ARGS` (one machine; see the README for several)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tunelab", *argv]


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`, for the processes torchrun starts."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: list[str]):
    """Replace this process by torchrun running `tunelab ARGV` on `nproc` processes (one per GPU)."""
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise TunelabError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); one process "
                           "per GPU (for several machines see README 'Scaling out')")
    cmd = launch_command(nproc, strip_nproc(argv))
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


def check(cfg: Config, processes: int) -> None:
    """Refuse settings FSDP2 cannot honour on `processes` processes, before any starts (one
    process ignores the distributed section, so 8-bit LoRA on one GPU stays fine)."""
    if processes == 1 or cfg.distributed.strategy != "fsdp":
        return
    problems = []
    if cfg.quantization.bits == 8:
        problems.append("distributed.strategy: FSDP cannot shard 8-bit bitsandbytes weights; use quantization.bits=4 "
                        "(QLoRA shards) or distributed.strategy=ddp")
    if cfg.train.activation_offload:
        problems.append("train.activation_offload: not tested under FSDP (each process would offload its shards); "
                        "set it to false for several processes")
    if cfg.distributed.cpu_ram_efficient_loading and cfg.quantization.bits:
        problems.append("distributed.cpu_ram_efficient_loading: not with quantization.bits (every process "
                        "quantizes its own copy on its GPU); set it to false")
    if problems:
        raise TunelabError("invalid config for several processes:\n  - " + "\n  - ".join(problems))


def init(cfg: Config) -> None:
    """Join the process group before the model loads, so each process loads onto its own GPU
    (LOCAL_RANK) and `cpu_ram_efficient_loading` can tell rank 0 from the others. No-op alone."""
    check(cfg, world_size())  # torchrun / accelerate launch started us without `--nproc`
    if world_size() == 1:
        return
    import torch
    from accelerate import PartialState

    if fsdp_enabled(cfg) and cfg.distributed.cpu_ram_efficient_loading:
        # transformers' from_pretrained reads these to load real weights on rank 0 only (the others
        # get empty tensors that FSDP2 fills by broadcast); TrainingArguments sets them too late.
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    if fsdp_enabled(cfg) and not torch.cuda.is_available():
        log.warning("no GPU: accelerate runs FSDP on GPUs only, so these processes train as DDP (whole model each)")
    PartialState(cpu=not torch.cuda.is_available())


def main_process_first():
    """Rank 0 of each node fills the local caches (converted GGUF, tokenized datasets) while the
    others wait, then they read them: concurrent writers would race on the same cache files."""
    if world_size() == 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().local_main_process_first()


def trainer_arguments(cfg: Config) -> dict:
    """Extra TrainingArguments for a multi-process run; {} for one process.

    Keys as transformers 5.17-5.23 `TrainingArguments._process_fsdp_args` reads them (`fsdp=True`:
    the `"full_shard auto_wrap"` string form is deprecated there; FSDP2's full shard is
    `reshard_after_forward=True`, and auto-wrapping by decoder layer is the default policy).
    Checkpoints are sharded: every rank writes its own part, and a resumed run reads them back.
    Re-check these keys on a transformers upgrade past 5.23 (test_fsdp2_settings_are_the_keys_transformers_reads).
    """
    if world_size() == 1:
        return {}
    d = cfg.distributed
    if d.strategy == "ddp":
        # LoRA leaves no trainable parameter unused; the search for unused ones costs a pass per step.
        return {"ddp_find_unused_parameters": False}
    fsdp_config = {
        "version": 2,
        "reshard_after_forward": d.reshard_after_forward,
        # The model's own checkpointing (train.gradient_checkpointing) stays on instead: FSDP's wraps each
        # layer in a CheckpointWrapper, and peft 0.21 then finds no adapter weights in the gathered state
        # dict (it matches them to module names, which gain `_checkpoint_wrapped_module`). Can go once peft
        # strips that prefix (test_distributed's FSDP2 run then saves the same adapter with FSDP's checkpointing).
        "activation_checkpointing": False,
        "cpu_ram_efficient_loading": d.cpu_ram_efficient_loading,
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    if d.wrap:
        fsdp_config["transformer_layer_cls_to_wrap"] = list(d.wrap)
    return {"fsdp": True, "fsdp_config": fsdp_config}


def after_sharding(trainer, fn):
    """Defer `fn` (e.g. the before-training evaluation) until FSDP2 has sharded the model inside
    `trainer.train()`: before that the model sits unsharded on the CPU, and accelerate shards it
    only together with the optimizer. Returns the callback; read its `.result` after training."""
    from transformers import TrainerCallback

    class AtTrainBegin(TrainerCallback):
        result = None

        def on_train_begin(self, args, state, control, **kwargs):
            if self.result is None:
                self.result = fn()

    hook = AtTrainBegin()
    trainer.add_callback(hook)
    return hook


def eval_loader(trainer, dataset=None):
    """Validation batches. Under several processes every process reads every row: accelerate's
    sharded loader repeats rows so that all processes get as many batches (FSDP2 needs them in
    lockstep), and a repeated row would count twice in the token-weighted loss."""
    if world_size() == 1:
        return trainer.get_eval_dataloader(dataset)
    from torch.utils.data import DataLoader

    rows = dataset if dataset is not None else trainer.eval_dataset
    return DataLoader(rows, batch_size=trainer.args.eval_batch_size,
                      collate_fn=getattr(trainer, "eval_collator", trainer.data_collator))


def full_state_dict(trainer, cast_to=None) -> dict | None:
    """The whole model's weights gathered from the FSDP2 shards (a collective: every rank calls it;
    rank 0 gets the tensors, on the CPU), for an ordinary HF folder; None when nothing is sharded.
    `cast_to`: dtype for floating tensors (FSDP2 keeps fp32 master copies of trainable weights)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    state = trainer.accelerator.get_state_dict(trainer.model)
    if cast_to is not None:
        state = {k: v.to(cast_to) if v.is_floating_point() else v for k, v in state.items()}
    return state


def total(value: int) -> int:
    """Sum of an integer over all processes (a collective); the value itself alone."""
    if world_size() == 1:
        return value
    import torch
    from accelerate import PartialState

    t = torch.tensor(value, device=PartialState().device)
    torch.distributed.all_reduce(t)
    return int(t.item())
