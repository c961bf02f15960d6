"""End-to-end SFT on tiny random Llamas: run folder, LoRA/QLoRA/full training, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_tiny_model
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.stages import sft
from tunelab.tracking.metrics import read_jsonl

RUN_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "report.html", "samples.jsonl", "plots", "checkpoints"}


def _cfg(tmp_path, model_dir, task_dir, *overrides):
    return load_config(None, [
        f"model.name={model_dir}", f"data.source={task_dir}", "data.format=custom",
        "data.fields={messages: messages}", f"run.dir={tmp_path / 'run'}", "data.max_length=256",
        "data.max_train_samples=48", "data.max_eval_samples=8", "train.batch_size=2", "train.lr=3e-3",
        "train.max_steps=6", "eval.generation_samples=2", "eval.max_new_tokens=4", *overrides,
    ])


def test_lora_run_writes_the_complete_run_folder(tmp_path, tiny_model_dir, task_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, task_dir, "train.eval_every=3", "tracking.wandb=true")
    result = sft.run(cfg)
    run = result.run_dir
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "tokenizer_config.json").is_file()  # inference pads/renders as training did
    assert list((run / "plots").glob("*.png"))
    assert list((run / "wandb").glob("offline-run-*/*.wandb"))  # W&B offline, no key needed
    s = json.loads((run / "summary.json").read_text())
    assert s["method"] == "lora"
    assert s["data"]["train_samples"] == 48 and s["data"]["eval_samples"] == 8
    assert 0 < s["data"]["packing_efficiency"] <= 1
    assert s["train"]["steps"] == 6 and s["train"]["tokens_per_s"] > 0
    for key in ("loss", "perplexity", "exact_match", "rouge_l"):
        assert key in s["eval"]["before"] and key in s["eval"]["after"]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]  # before, every 3 steps (the last is also "after")
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "messages", "reference", "before", "after"} <= set(samples[0])
    assert samples[0]["messages"][-1]["role"] == "user"  # the conversation up to the answer, for the report


def test_full_finetuning_lowers_validation_loss(tmp_path, tiny_model_dir, task_dir):
    s = sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "peft.method=full", "train.max_steps=8")).summary
    assert s["eval"]["after"]["loss"] < s["eval"]["before"]["loss"] - 0.5
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_qlora_trains_on_cpu(tmp_path, tiny_model_dir, task_dir):
    s = sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "quantization.bits=4", "peft.r=8",
                     "train.lr=1e-2", "train.max_steps=8")).summary
    assert s["method"] == "qlora"
    assert s["eval"]["after"]["loss"] < s["eval"]["before"]["loss"] - 0.1


def test_padding_batching_reports_pad_fraction(tmp_path, tiny_model_dir, task_dir):
    s = sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "data.batching=padding", "train.max_steps=2")).summary
    assert s["data"]["packing_efficiency"] is None
    assert 0 <= s["train"]["pad_fraction"] < 0.5  # length-grouped batches of similar samples


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the stack handles it."""


def test_killed_run_resumes_to_the_same_final_loss(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    common = ("train.save_every=2", "peft.dropout=0.1", "train.max_steps=7")
    straight = sft.run(_cfg(tmp_path / "a", tiny_model_dir, task_dir, *common)).summary

    from tunelab.trainer import TunelabTrainer

    step = TunelabTrainer.training_step

    def dies_at_step_6(self, *args, **kwargs):
        if self.state.global_step == 5:
            raise Killed
        return step(self, *args, **kwargs)

    monkeypatch.setattr(TunelabTrainer, "training_step", dies_at_step_6)
    with pytest.raises(Killed):
        sft.run(_cfg(tmp_path / "b", tiny_model_dir, task_dir, *common))
    monkeypatch.setattr(TunelabTrainer, "training_step", step)
    assert (tmp_path / "b" / "run" / "checkpoints" / "checkpoint-4").is_dir()
    with pytest.raises(TunelabError, match="pass --resume"):
        sft.run(_cfg(tmp_path / "b", tiny_model_dir, task_dir, *common))
    resumed = sft.run(_cfg(tmp_path / "b", tiny_model_dir, task_dir, *common, "train.resume=true")).summary
    assert resumed["train"]["steps"] == 7
    assert resumed["train"]["final_loss"] == pytest.approx(straight["train"]["final_loss"], rel=1e-5)
    assert resumed["eval"]["after"]["loss"] == pytest.approx(straight["eval"]["after"]["loss"], rel=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s > 0]
    assert sorted(set(train_steps)) == list(range(1, 8))  # no step lost, none logged twice
    assert len([s for s in steps if s in range(1, 8)]) == len([s for s in train_steps])


def test_nan_loss_stops_with_the_step(tmp_path, tokenizer, task_dir):
    model = make_tiny_model(tokenizer)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    folder = tmp_path / "nan-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(TunelabError, match="loss became nan at step 1"):
        sft.run(_cfg(tmp_path, folder, task_dir, "peft.method=full", "eval.before=false"))


def test_adapter_reloads_and_merges_to_the_same_model(tmp_path, tiny_model_dir, task_dir):
    from tunelab.models.build import build_model, load_tokenizer, merge_and_save, model_options
    from tunelab.models.loading import resolve

    cfg = _cfg(tmp_path, tiny_model_dir, task_dir, "train.max_steps=3", "peft.dropout=0")
    sft.run(cfg)
    run = tmp_path / "run"
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    # model.name=<run folder>: base + this run's adapter, merged
    source = resolve(str(run))
    assert source.adapter == run / "adapter"
    reloaded_cfg = _cfg(tmp_path, run, task_dir)
    reloaded = build_model(source, load_tokenizer(source), **model_options(reloaded_cfg)).eval()
    merged_dir = merge_and_save(str(run), tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a, b, c = reloaded(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(b, c[..., : b.shape[-1]], atol=1e-3)  # training changed the model

    # Plain peft onto the base that adapter_config.json names gives the same model: the pad token
    # is a spare special token, so the vocabulary is the base's and the adapter holds no embeddings.
    from peft import PeftModel
    from safetensors import safe_open

    base_name = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_name), run / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, a, atol=1e-5)
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "embed_tokens" in k or "lm_head" in k]
    assert merged.config.vocab_size == base.config.vocab_size
    half = AutoModelForCausalLM.from_pretrained(merge_and_save(str(run), tmp_path / "merged16", torch.bfloat16))
    assert half.dtype == torch.bfloat16  # tunelab merge --dtype bf16


def test_early_stopping_stops_when_validation_loss_stalls(tmp_path, tiny_model_dir, task_dir):
    # Any improvement smaller than the threshold counts as none, so patience 1 stops at the second evaluation.
    s = sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "train.eval_every=1", "train.max_steps=6",
                     "train.early_stopping={patience: 1, threshold: 100.0}")).summary
    assert s["train"]["steps"] == 2
    assert s["train"]["best_checkpoint"].endswith("checkpoint-2")  # loss still fell a little: best, not enough


def test_8bit_lora_trains_on_cpu(tmp_path, tiny_model_dir, task_dir):
    s = sft.run(_cfg(tmp_path, tiny_model_dir, task_dir, "quantization.bits=8", "train.max_steps=2")).summary
    assert s["method"] == "lora-8bit" and s["train"]["steps"] == 2


def test_generation_metric_is_scored_mid_run_and_picks_the_best_checkpoint(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    from tunelab.evals import generation

    # Real generation first: the metric is logged at the validations `every` asks for, and only there.
    sft.run(_cfg(tmp_path / "a", tiny_model_dir, task_dir, "train.eval_every=2",
                 "train.eval_generation={task: rouge, every: 4, samples: 2}"))
    logged = read_jsonl(tmp_path / "a/run/metrics.jsonl")
    scored = [r["step"] for r in logged if "eval_rouge_l" in r]
    assert scored == [4] and all(0 <= r["eval_rouge_l"] <= 1 for r in logged if "eval_rouge_l" in r)
    assert "eval_rouge_1" in next(r for r in logged if r["step"] == 4 and "eval_rouge_l" in r)

    # Then selection: scores that peak at step 4 while the loss keeps falling; the run keeps step 4.
    peaks = {2: 0.2, 4: 0.9, 6: 0.1}
    seen = []

    def scripted(model, tokenizer, examples, n, metrics, *args, desc):
        if "step" not in desc:  # the after-training evaluation
            return {}, []
        step = int(desc.split()[-1].rstrip(")"))
        seen.append(step)
        return {"exact_match": peaks[step]}, []

    monkeypatch.setattr(generation, "generation_eval", scripted)
    s = sft.run(_cfg(tmp_path / "b", tiny_model_dir, task_dir, "train.eval_every=2", "eval.before=false",
                     "eval.generation_samples=0", "train.eval_generation={task: exact_match}",
                     "train.select_on=generation", "train.load_best=true")).summary
    assert seen == [2, 4, 6]
    assert s["train"]["best_checkpoint"].endswith("checkpoint-4")

