"""Labels cover exactly the assistant turns, rendered with the model's own chat template."""

from __future__ import annotations

from tunelab.data.templates import IGNORE_INDEX, prompt_text, tokenize_example
from tunelab.models.loading import DEFAULT_CHAT_TEMPLATE

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Summarize: Ann meets Bob at noon."},
    {"role": "assistant", "content": "Ann and Bob meet at noon."},
]


def _loss_text(tokenizer, out) -> str:
    return tokenizer.decode([t for t, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX])


def test_labels_are_exactly_the_completion(tokenizer):
    out = tokenize_example(tokenizer, MESSAGES)
    assert len(out["input_ids"]) == len(out["labels"])
    # SmolLM2's template: the assistant turn is "<content><|im_end|>\n"; the prompt is never learned.
    assert _loss_text(tokenizer, out) == "Ann and Bob meet at noon.<|im_end|>\n"
    first = next(i for i, lab in enumerate(out["labels"]) if lab != IGNORE_INDEX)
    prompt_ids = tokenizer(prompt_text(tokenizer, MESSAGES), add_special_tokens=False)["input_ids"]
    assert out["input_ids"][:first] == prompt_ids
    assert all(lab == IGNORE_INDEX for lab in out["labels"][:first])
    assert out["labels"][first:] == out["input_ids"][first:]


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    messages = MESSAGES + [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "At the park."}]
    text = _loss_text(tokenizer, tokenize_example(tokenizer, messages))
    assert text == "Ann and Bob meet at noon.<|im_end|>\nAt the park.<|im_end|>\n"
    assert "Where?" not in text


def test_completion_only_false_learns_everything(tokenizer):
    out = tokenize_example(tokenizer, MESSAGES, train_on="all")
    assert out["labels"] == out["input_ids"]


def test_default_template_for_base_models(tokenizer):
    """A tokenizer without a chat template gets tunelab's; the completion ends with EOS."""
    import copy

    base = copy.deepcopy(tokenizer)
    base.chat_template = DEFAULT_CHAT_TEMPLATE
    text = _loss_text(base, tokenize_example(base, MESSAGES))
    assert text == f"Ann and Bob meet at noon.{base.eos_token}\n\n"


def test_truncate_shortens_the_prompt_and_keeps_the_completion_whole(tokenizer):
    from tunelab.data.templates import tokenize_within

    article = " ".join(f"Sentence number {i} of a long article." for i in range(200))
    messages = [{"role": "user", "content": "Summarize: " + article}, MESSAGES[-1]]
    full = tokenize_example(tokenizer, messages)
    assert len(full["input_ids"]) > 300
    out = tokenize_within(tokenizer, messages, max_length=120)
    assert out["truncated"] == 1 and len(out["input_ids"]) <= 120
    assert _loss_text(tokenizer, out) == "Ann and Bob meet at noon.<|im_end|>\n"
    assert tokenizer.decode(out["input_ids"]).startswith(tokenizer.decode(full["input_ids"][:20]))
    # a sample that already fits is untouched; one whose completion alone is too long cannot fit
    assert tokenize_within(tokenizer, MESSAGES, max_length=500)["truncated"] == 0
    assert tokenize_within(tokenizer, [MESSAGES[1], {"role": "assistant", "content": article}], 120) is None
