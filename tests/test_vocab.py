"""The pad token: a spare special token where the tokenizer has one (the vocabulary stays the
base's), a new one only when it has none; adapters written by earlier versions still load."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model
from tunelab.models.vocab import PAD_TOKEN, saved_embedding_rows, set_pad_token, spare_special_token

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(specials: list[str], unk: str | None = None, template: str = CHATML):
    """A word-level tokenizer whose first ids are `specials` (bos, eos, ... in that order)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*specials, "hello", "world"])}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=unk or specials[0])),
                                   bos_token=specials[0], eos_token=specials[1], unk_token=unk)
    fast.add_special_tokens({"additional_special_tokens": specials[2:]})
    fast.chat_template = template
    return fast


def test_smollm2_reuses_an_unused_special_token(tokenizer):
    """The embedded tokenizer's pad is EOS (<|im_end|>); an unused code-model marker replaces it."""
    assert tokenizer.pad_token == "<empty_output>" and len(tokenizer) == 49152
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)


def test_llama_families_reuse_their_spare_tokens():
    llama2 = _tokenizer(["<s>", "</s>", "<unk>"], unk="<unk>", template="{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    assert spare_special_token(llama2) == "<unk>"
    llama31 = _tokenizer(["<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>",
                          "<|start_header_id|>"])
    assert spare_special_token(llama31) == "<|finetune_right_pad_id|>"


def test_markers_the_template_writes_and_stop_ids_are_never_the_pad():
    chatml = _tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>"], unk="<|endoftext|>")
    assert spare_special_token(chatml) is None  # <|im_start|> is written by the template, the others end text
    assert set_pad_token(chatml) and chatml.pad_token == PAD_TOKEN and len(chatml) == 6  # added: the only way
    other = _tokenizer(["<s>", "</s>", "<a>", "<b>"])
    assert spare_special_token(other, stop_ids={3}) == "<a>"


def test_an_adapter_with_the_old_resized_vocabulary_still_loads(tmp_path, tokenizer):
    """Earlier versions added <|pad|> and saved embeddings resized to a multiple of 64 in the adapter."""
    from peft import LoraConfig, get_peft_model

    from tunelab.models.build import build_model, load_tokenizer
    from tunelab.models.loading import ModelSource

    base = make_tiny_model(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    old_tok = load_tokenizer(ModelSource(str(tmp_path / "base")))
    old_tok.add_special_tokens({"pad_token": "<|pad|>"})
    model = make_tiny_model(tokenizer)
    model.resize_token_embeddings(len(old_tok), pad_to_multiple_of=64)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    old_tok.save_pretrained(tmp_path / "adapter")
    assert saved_embedding_rows(tmp_path / "adapter") == 49216

    source = ModelSource(str(tmp_path / "base"), adapter=tmp_path / "adapter")
    loaded = build_model(source, load_tokenizer(source), dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([[1, 50, 60]])
        assert torch.allclose(loaded(ids).logits, lora.merge_and_unload().eval()(ids).logits, atol=1e-5)
    assert saved_embedding_rows(tmp_path / "base") is None


def test_training_data_holding_the_pad_token_is_refused(tmp_path, tokenizer):
    """A reused special token must occur in no training sample (a classifier reads it as padding)."""
    import json

    from tunelab.config import DataConfig
    from tunelab.data.prepare import prepare
    from tunelab.errors import TunelabError

    rows = [{"q": f"question {i}", "a": f"answer {i}" + (" <empty_output>" if i == 3 else "")} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path / "train.jsonl"), format="custom", fields={"prompt": "q", "completion": "a"},
                     max_length=64, validation_fraction=0.25)
    with pytest.raises(TunelabError, match=r"data: the pad token <empty_output> \(id \d+\) occurs in 1 samples"):
        prepare(cfg, tokenizer, seed=0)
