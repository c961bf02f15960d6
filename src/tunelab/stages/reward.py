"""`tunelab reward RECIPE`: a reward model from preference pairs.

The base model with a one-output score head (AutoModelForSequenceClassification, num_labels=1;
the score is read at the last non-pad token, which is why the dedicated pad token matters),
LoRA/QLoRA on the body and the new head trained in full, with the pairwise Bradley–Terry loss
−log σ(r(prompt, chosen) − r(prompt, rejected)) (Ouyang et al. 2022, eq. 1) by trl's RewardTrainer.
Reports held-out pairwise accuracy before and after; `tunelab rl` loads the result by run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunelab.config import Config, load_config
from tunelab.errors import TunelabError
from tunelab.stages.preference import RunResult, Stage, pair_metrics, run_stage


def load_classifier(cfg: Config, tokenizer):
    """The base (a preceding LoRA run merged in: a classifier cannot continue a causal-LM adapter)
    with a fresh score head."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.build import build_model, model_options
    from tunelab.models.loading import resolve

    return build_model(resolve(cfg.model.name), tokenizer, auto_class=AutoModelForSequenceClassification,
                       num_labels=1, **model_options(cfg))


def build(cfg: Config, tokenizer, data, args_for, callbacks):
    from trl import RewardConfig, RewardTrainer

    from tunelab.models.build import lora_config, precision

    args = args_for(RewardConfig, max_length=cfg.data.max_length)
    trainer = RewardTrainer(
        model=load_classifier(cfg, tokenizer), args=args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, callbacks=callbacks,
        peft_config=None if cfg.peft.method == "full" else lora_config(cfg.peft, task_type="SEQ_CLS"),
    )
    if cfg.quantization.bits:
        # trl 1.16 casts every trainable parameter of a quantized model to bf16 (QLoRA's adapter dtype). LoRA
        # layers cast their input to match, the trained copy of the score head does not: give it the dtype of
        # the hidden states again (a no-op on a bf16 GPU; on the CPU, fp32). Can go once trl casts adapters only.
        dtype = precision(cfg.train.precision, cfg.model.dtype).dtype
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and ".score." in name:
                param.data = param.data.to(dtype)
    return trainer


@torch.no_grad()
def pair_margins(trainer) -> torch.Tensor:
    """r(chosen) − r(rejected) for every validation pair (the collator stacks chosen over rejected)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    margins = []
    for batch in tqdm(trainer.get_eval_dataloader(), desc="scoring validation pairs", leave=False):
        batch = trainer._prepare_inputs(batch)
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        chosen, rejected = scores.logits[:, 0].float().chunk(2)
        margins.append(chosen - rejected)
    model.train(was_training)
    return torch.cat(margins).cpu()


def evaluate(trainer, cfg: Config, data, label: str) -> tuple[dict, list[dict]]:
    return pair_metrics(pair_margins(trainer)), []


STAGE = Stage(
    name="reward",
    build=build,
    evaluate=evaluate,
    curves={
        "accuracy": ("Pairwise accuracy", {"accuracy": "train", "eval_accuracy": "validation"}),
        "margin": ("Reward margin", {"margin": "train", "eval_margin": "validation"}),
    },
)


def run(cfg: Config) -> RunResult:
    return run_stage(cfg, STAGE)


def reward_run_problem(run: str) -> str | None:
    """Why `run` cannot serve as preference.reward_model, or None."""
    summary = Path(run) / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text()).get("command") != "reward":
        return (f"preference.reward_model: {run} is not a finished `tunelab reward` run folder (no summary.json "
                "written by tunelab reward); train one with `tunelab reward recipes/reward.yaml`")
    return None


def load_reward_model(run: str):
    """(reward model in eval mode, its tokenizer) from a `tunelab reward` run folder, built as that
    run built it: its config's base (with any LoRA run merged), then its adapter and score head."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.build import build_model, load_tokenizer
    from tunelab.models.loading import ModelSource

    run_dir = Path(run)
    if problem := reward_run_problem(run):
        raise TunelabError(problem)
    if (run_dir / "model" / "config.json").is_file():  # full fine-tuning
        source = ModelSource(str(run_dir / "model"))
        tokenizer = load_tokenizer(source)
        model = build_model(source, tokenizer, dtype="auto", auto_class=AutoModelForSequenceClassification)
    else:
        tokenizer = load_tokenizer(ModelSource(str(run_dir / "adapter")))
        model = PeftModel.from_pretrained(load_classifier(load_config(run_dir / "config.yaml"), tokenizer),
                                          run_dir / "adapter")
        if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
            model = model.merge_and_unload()  # one plain classifier: faster, and what trl expects
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False), tokenizer
