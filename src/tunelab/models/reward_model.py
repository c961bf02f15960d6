"""The reward model: a causal LM's body with a one-output score head, built for `tunelab reward`
and rebuilt from its run folder for `tunelab rl` (which scores completions with it)."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.config import Config, load_config
from tunelab.errors import TunelabError


def load_classifier(cfg: Config, tokenizer):
    """The base (a preceding LoRA run merged in: a classifier cannot continue a causal-LM adapter)
    with a fresh score head."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.build import build_model, model_options
    from tunelab.models.loading import resolve

    return build_model(resolve(cfg.model.name), tokenizer, auto_class=AutoModelForSequenceClassification,
                       num_labels=1, **model_options(cfg))


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
