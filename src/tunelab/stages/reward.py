"""`tunelab reward RECIPE`: a reward model from preference pairs.

The base model with a one-output score head (AutoModelForSequenceClassification, num_labels=1;
the score is read at the last non-pad token, which is why the dedicated pad token matters),
LoRA/QLoRA on the body and the new head trained in full, with the pairwise Bradley–Terry loss
−log σ(r(prompt, chosen) − r(prompt, rejected)) (Ouyang et al. 2022, eq. 1) by trl's RewardTrainer.
Reports held-out pairwise accuracy before and after; `tunelab rl` loads the result by run folder.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tunelab import lifecycle
from tunelab.config import Config
from tunelab.evals.pairs import pair_metrics
from tunelab.lifecycle import Loaded, RunResult


def build(cfg: Config, loaded: Loaded, args_for, callbacks):
    from trl import RewardConfig, RewardTrainer

    from tunelab.models.build import lora_config, precision
    from tunelab.models.reward_model import load_classifier

    args = args_for(RewardConfig, max_length=cfg.data.max_length)
    trainer = RewardTrainer(
        model=load_classifier(cfg, loaded.tokenizer), args=args, train_dataset=loaded.data.train,
        eval_dataset=loaded.data.eval, processing_class=loaded.tokenizer, callbacks=callbacks,
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


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    return pair_metrics(pair_margins(trainer)), []


STAGE = lifecycle.Stage(
    name="reward",
    load=lifecycle.load_pairs,
    build=build,
    measure=measure,
    perplexity=False,
    curves={
        "accuracy": ("Pairwise accuracy", {"accuracy": "train", "eval_accuracy": "validation"}),
        "margin": ("Reward margin", {"margin": "train", "eval_margin": "validation"}),
    },
)


def run(cfg: Config) -> RunResult:
    return lifecycle.run(cfg, STAGE)
