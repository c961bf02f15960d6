"""Shared fixtures: the embedded tokenizer and tiny random Llama models built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 converted to a plain folder (cached across runs in ~/.cache/tunelab)."""
    from tunelab.models.loading import resolve

    return Path(resolve("embedded").path)


@pytest.fixture(scope="session")
def tokenizer(request):
    """The embedded model's tokenizer; `TUNELAB_TEST_TOKENIZER=DIR` takes it from a folder instead
    (the GPU machines have no embedded GGUF)."""
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import ModelSource

    folder = os.environ.get("TUNELAB_TEST_TOKENIZER") or request.getfixturevalue("embedded_dir")
    return load_tokenizer(ModelSource(str(folder)))


def make_tiny_model(tokenizer, seed: int = 0, layers: int = 2, attn: str = "sdpa"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, use_cache=False,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama saved with the embedded tokenizer: `model.name=<this folder>` in recipes."""
    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """The quickstart's generated meetup-chat task (train/validation jsonl of `messages`)."""
    from tunelab.data.synthetic import write_task

    folder = tmp_path_factory.mktemp("meetup")
    write_task(folder, seed=0)
    return folder
