"""model.chat_template: a built-in or .jinja template replaces the model's own, is saved with the
run's tokenizer and is what `tunelab generate` renders with; replacing a run's saved template is said."""

from __future__ import annotations

import logging

import pytest

from tunelab.config import load_config
from tunelab.data.templates import chat_template_text
from tunelab.errors import TunelabError
from tunelab.models.build import load_tokenizer
from tunelab.models.loading import ModelSource, resolve


def test_unknown_template_name_is_a_config_error():
    with pytest.raises(TunelabError, match=r"model.chat_template: got 'chatlm'; use one of chatml, llama-2, llama-3 "
                                           r"or a .jinja file"):
        load_config(None, ["data.source=x", "data.format=samsum", "model.chat_template=chatlm"])


def test_a_missing_jinja_file_names_it(embedded_dir, tmp_path):
    with pytest.raises(TunelabError, match=f"model.chat_template: {tmp_path}/none.jinja: no such file"):
        load_tokenizer(ModelSource(str(embedded_dir)), str(tmp_path / "none.jinja"))


def test_llama3_markers_become_special_tokens_and_its_end_of_turn_the_eos(embedded_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="tunelab.models.build"):
        tokenizer = load_tokenizer(ModelSource(str(embedded_dir)), "llama-3")
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("<|start_header_id|>user<|end_header_id|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and ids[0] == tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    assert "their embeddings start untrained" in caplog.text


def test_the_override_is_saved_with_the_run_and_used_by_generate(tmp_path, tiny_model_dir, task_dir, caplog):
    from tunelab.inference.base import eos_ids
    from tunelab.inference.prompts import prompt_ids
    from tunelab.models.build import load_for_eval
    from tunelab.stages import sft

    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.source={task_dir}", "data.format=custom", "model.chat_template=llama-3",
        "data.fields={messages: messages}", f"run.dir={tmp_path / 'run'}", "data.max_length=256", "train.max_steps=1",
        "data.max_train_samples=8", "data.max_eval_samples=2", "eval.before=false", "eval.generation_samples=0",
    ])
    run = sft.run(cfg).run_dir
    model, tokenizer = load_for_eval(str(run))  # what `tunelab generate RUN` loads (inference/backends.load_engine)
    assert tokenizer.chat_template == chat_template_text("llama-3")
    prompt = tokenizer.decode(prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}]))
    assert prompt.endswith("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in eos_ids(model, tokenizer)  # generation stops there
    with caplog.at_level(logging.WARNING, logger="tunelab.models.build"):
        load_tokenizer(resolve(str(run)), "llama-3")
        assert "trained with another chat template" not in caplog.text
        load_tokenizer(resolve(str(run)), "chatml")
    assert f"{run / 'adapter'} was trained with another chat template than model.chat_template=chatml" in caplog.text
