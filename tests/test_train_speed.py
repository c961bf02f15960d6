"""Issue #12 on the CPU: the auto batch choice (a fake memory probe), the non-finite-loss stop without
per-step host reads, compiled vs eager losses, the speed accounting in summary.json, repetition loops."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conftest import make_tiny_model
from tests.test_sft import _cfg
from tunelab import autobatch
from tunelab.config import TrainConfig
from tunelab.errors import TunelabError
from tunelab.kernels import regional
from tunelab.stages import sft
from tunelab.trainer import TunelabTrainer

GIB = 2**30


def memory(base_gib: float, per_row_gib: float, out_of_memory_above: int | None = None, calls: list | None = None):
    """A fake probe: peak = base + rows × per_row, out of memory above a size (None)."""

    def probe(rows: int) -> float | None:
        if calls is not None:
            calls.append(rows)
        if out_of_memory_above is not None and rows > out_of_memory_above:
            return None
        return (base_gib + rows * per_row_gib) * GIB

    return probe


def test_auto_batch_fills_the_memory_target_and_keeps_tokens_per_step():
    t = TrainConfig(tokens_per_step=32 * 1024, grad_accum=2)
    big, small = [], []
    on_big = autobatch.plan(t, 1024, 1, memory(10, 2, calls=big), total_bytes=100 * GIB)
    on_small = autobatch.plan(t, 1024, 1, memory(10, 2, calls=small), total_bytes=40 * GIB)
    assert (on_big.batch_size, on_big.grad_accum) == (32, 1)  # 10 + 32·2 = 74 ≤ 85 GiB
    assert big == [1, 2, 32]  # two sizes for the line, then its prediction, confirmed
    assert (on_small.batch_size, on_small.grad_accum) == (8, 4)  # 34 GiB target: ≤ 12 rows, a divisor of 32
    assert small == [1, 2, 8]
    # the optimisation is the recipe's on both GPUs: the same rows and tokens per optimizer step
    assert on_big.tokens_per_step == on_small.tokens_per_step == 32 * 1024
    assert on_small.auto and on_small.peak_gib == pytest.approx(26) and on_small.target_gib == pytest.approx(34)
    assert "8 rows × 1024 tokens per micro-step, grad_accum 4 → 32,768" in on_small.describe()
    assert json.dumps(on_small.summary())  # recorded in summary.json as is


def test_auto_batch_steps_down_where_the_prediction_runs_out_of_memory(caplog):
    t = TrainConfig(tokens_per_step=16 * 512)
    calls = []
    chosen = autobatch.plan(t, 512, 1, memory(1, 1, out_of_memory_above=4, calls=calls), total_bytes=100 * GIB)
    assert calls == [1, 2, 16, 8, 4] and (chosen.batch_size, chosen.grad_accum) == (4, 4)
    assert chosen.probes == [(1, 2.0), (2, 3.0), (4, 5.0), (8, None), (16, None)]
    with caplog.at_level(logging.WARNING, logger="tunelab.autobatch"):
        floor = autobatch.plan(t, 512, 1, memory(90, 1), total_bytes=100 * GIB)
    assert (floor.batch_size, floor.grad_accum) == (1, 16) and "even 1 row" in caplog.text


def test_without_a_probe_the_step_splits_as_the_config_says():
    # the CPU (or several processes): batch_size=auto keeps the recipe's grad_accum split
    assert autobatch.plan(TrainConfig(tokens_per_step=16384, grad_accum=2), 1024, 1, None, None).batch_size == 8
    assert TrainConfig(tokens_per_step=16384, grad_accum=2).planned(1024, processes=2) == (4, 2)
    assert TrainConfig().planned(1024) == (8, 1)  # no target: 8 rows, as before auto existed
    assert TrainConfig(batch_size=4, grad_accum=2).planned(1024) == (4, 2)  # a number is kept
    assert TrainConfig(batch_size=4, tokens_per_step=16384).planned(1024) == (4, 4)  # ... and meets the target
    probe = memory(1, 1, calls=(calls := []))
    fixed = autobatch.plan(TrainConfig(batch_size=4, grad_accum=2), 1024, 1, probe, 100 * GIB)
    assert (fixed.batch_size, fixed.grad_accum, fixed.auto, calls) == (4, 2, False, [])


def test_a_loss_gone_nan_mid_run_stops_before_the_next_checkpoint_and_names_the_step(tmp_path, tiny_model_dir,
                                                                                    task_dir, monkeypatch):
    compute = TunelabTrainer.compute_loss

    def nan_from_step_3(self, model, inputs, *args, **kwargs):
        loss = compute(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(TunelabTrainer, "compute_loss", nan_from_step_3)
    cfg = _cfg(tmp_path, tiny_model_dir, task_dir, "train.save_every=2", "train.logging_steps=100", "eval.before=false")
    with pytest.raises(TunelabError, match=r"loss became nan at step 3 \(found at step 4, before writing "
                                           r"checkpoint-4\); steps 3-4 are not kept, the last good checkpoint is "
                                           r"checkpoint-2"):
        sft.run(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]
    assert (checkpoints / "checkpoint-2" / "tunelab-checkpoint.json").is_file()  # complete: --resume continues it
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_training_step_reads_nothing_back_from_the_device(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    reads, per_step = [], []
    item, step = torch.Tensor.item, TunelabTrainer.training_step

    def counted_step(self, *args, **kwargs):
        before = len(reads)
        out = step(self, *args, **kwargs)
        per_step.append(len(reads) - before)
        return out

    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or item(self))
    monkeypatch.setattr(TunelabTrainer, "training_step", counted_step)
    sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "train.logging_steps=3", "eval.before=false",
                 "eval.generation_samples=0"))
    assert per_step == [0] * 6  # the non-finite check waits for the logging steps
    assert reads  # ... which do read (the loss, the flag)


def test_summary_counts_training_tokens_over_training_time(tmp_path, tiny_model_dir, task_dir):
    s = sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "train.max_steps=null", "train.epochs=1",
                     "train.eval_every=1", "eval.generation_samples=0")).summary
    t = s["train"]
    assert t["tokens"] == s["data"]["train_tokens"]  # one epoch; the validation after every step counts nothing
    parts = t["step_time_s"]
    assert set(parts) == {"data", "forward_backward", "optimizer", "evaluation", "saving"}
    assert parts["forward_backward"] > 0 and parts["evaluation"] > 0 and parts["optimizer"] > 0
    assert t["training_s"] == pytest.approx(t["runtime_s"] - parts["evaluation"])
    assert t["tokens_per_s"] == pytest.approx(t["tokens"] / t["training_s"])
    assert t["mfu"] is None  # no known peak for a CPU
    assert t["batch"]["batch_size"] == 2 and t["batch"]["auto"] is False and t["compiled"] is False
    evals = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert evals == list(range(t["steps"] + 1))  # the last one is "after": validated once, not twice


def test_the_compiled_steps_collator_gives_one_shape_and_counts_only_real_tokens():
    from tunelab.data.batching import Collator
    from tunelab.data.templates import IGNORE_INDEX

    collate = Collator(0, width=8, rows=3)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]}])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {"input_ids": (3, 8), "labels": (3, 8),
                                                             "position_ids": (3, 8)}
    assert batch["position_ids"][0].tolist() == [0, 1, 0, 0, 1, 2, 3, 4]  # the pad tail is a sample of its own
    assert batch["position_ids"][2].tolist() == list(range(8)) and (batch["labels"][1:] == IGNORE_INDEX).all()
    assert (collate.real_tokens, collate.total_tokens) == (3, 24)


def _lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    from tunelab.kernels import lora, varlen

    model = make_tiny_model(tokenizer, layers=3)
    varlen.register()
    model.set_attn_implementation(varlen.NAME)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    lora.patch(model)
    return model


def _packed(tokenizer):
    from tunelab.data.batching import Collator, pack_batch

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (7, 12, 5, 9, 3, 11, 20, 4)]
    packed = pack_batch({"input_ids": rows, "labels": rows}, 32)
    return Collator(tokenizer.pad_token_id, width=32, rows=4)([dict(zip(packed, v)) for v in zip(*packed.values())])


def _losses(model, batch, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_compiled_layers_train_to_the_same_losses_as_eager(tokenizer, monkeypatch):
    """The fast path's stack on the CPU (peft LoRA, the fused LoRA Functions, varlen attention with its
    reference kernel) through regional compilation: same graphs (aot_eager), the same three steps."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from tunelab.kernels import varlen

    monkeypatch.setattr(varlen, "kernel", varlen.reference_varlen)
    batch = _packed(tokenizer)
    eager = _losses(_lora_model(tokenizer), batch)
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(regional, "BACKEND", counter)
    model = _lora_model(tokenizer)
    assert regional.apply(model, "auto") == ["compile:3_layers"] and regional.apply(model, "off") == []
    compiled = _losses(model, batch)
    assert compiled == pytest.approx(eager, rel=1e-5) and compiled[-1] < compiled[0]
    assert 0 < counter.frame_count <= 3  # one layer's graphs (split at the attention), reused by the others
    frames = counter.frame_count
    with torch.no_grad():
        model.eval()(**batch)  # validation and generation run the eager layers
    assert counter.frame_count == frames


def test_a_layer_that_does_not_compile_trains_eagerly(tokenizer, monkeypatch, caplog):
    def broken(graph, example_inputs):
        raise RuntimeError("no code for this op")

    monkeypatch.setattr(regional, "BACKEND", broken)
    model = make_tiny_model(tokenizer)
    regional.apply(model, "auto")
    batch = {"input_ids": torch.randint(10, 1000, (2, 16))}
    batch["labels"] = batch["input_ids"]
    with caplog.at_level(logging.WARNING, logger="tunelab.kernels.regional"):
        assert not regional.check(model, lambda: model.train()(**batch).loss.backward())
    assert "did not compile" in caplog.text
    assert all("forward" not in layer.__dict__ for layer in regional.decoder_layers(model))
    model(**batch).loss.backward()  # eager again


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_run(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    """The whole `tunelab train` path with train.compile (aot_eager on the CPU): static [rows, max_length]
    batches, the compile check, validation on the eager layers."""
    common = ("eval.generation_samples=0", "train.eval_every=3")
    eager = sft.run(_cfg(tmp_path / "eager", tiny_model_dir, task_dir, *common, "train.compile=off")).summary
    monkeypatch.setattr(regional, "BACKEND", "aot_eager")
    compiled = sft.run(_cfg(tmp_path / "compiled", tiny_model_dir, task_dir, *common)).summary
    assert compiled["train"]["compiled"] and not eager["train"]["compiled"]
    assert compiled["train"]["final_loss"] == pytest.approx(eager["train"]["final_loss"], rel=1e-4)
    assert compiled["eval"]["after"]["loss"] == pytest.approx(eager["eval"]["after"]["loss"], rel=1e-4)
    assert compiled["train"]["pad_fraction"] >= eager["train"]["pad_fraction"]  # every batch [2, 256]


def test_repetition_loops_are_outputs_that_repeat_to_the_token_limit():
    from tunelab.evals.metrics import loops

    assert loops([5, 6, 7, 8] + [1, 2, 3] * 4, 16)  # a 3-gram said 4 times, up to the limit
    assert loops([9] * 8, 8)
    assert not loops([1, 2, 3] * 4, 16)  # stopped by itself before the limit
    assert not loops(list(range(16)), 16)  # at the limit, but no repeated tail
    assert not loops([1, 2, 3, 4] * 2 + [5, 6, 7, 8], 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_batch_is_probed_on_the_gpu(tmp_path, tiny_model_dir, task_dir):
    """The probe and the compile check run before the Trainer moves the model to the GPU; on the CPU
    they failed in liger's Triton kernels (the shipped recipe crashed on every GPU)."""
    s = sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "train.batch_size=auto", "train.tokens_per_step=2048",
                     "eval.generation_samples=0")).summary["train"]
    assert s["batch"]["auto"] and s["batch"]["probes"] and all(peak for _, peak in s["batch"]["probes"])
    assert s["batch"]["batch_size"] * s["batch"]["grad_accum"] == 8 and s["steps"] == 6  # 2048 slots / 256
