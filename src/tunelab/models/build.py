"""Build the tokenizer and model a stage trains or evaluates: pad token, dtype, quantization, PEFT."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunelab import kernels
from tunelab.config import Config, PeftConfig, QuantizationConfig
from tunelab.distributed import fsdp_enabled
from tunelab.errors import TunelabError
from tunelab.models.loading import DEFAULT_CHAT_TEMPLATE, PAD_TOKEN, ModelSource, resolve

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def train_dtype(precision: str, dtype: str = "auto") -> torch.dtype:
    """Weights dtype: explicit `model.dtype` wins; else bf16 on a bf16-capable GPU, fp32 elsewhere."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if precision == "bf16" or (precision == "auto" and has_cuda() and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.float32


def load_tokenizer(source: ModelSource):
    """Tokenizer with a dedicated pad token (never EOS: padding would then mask real EOS labels
    and the model would never learn to stop), right padding, and a chat template."""
    from transformers import AutoTokenizer

    path = source.adapter if source.adapter and (source.adapter / "tokenizer_config.json").is_file() else source.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise TunelabError(f"model.name: cannot load a tokenizer from {path}: {err}") from None
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def quantization_config(q: QuantizationConfig, compute_dtype: torch.dtype, sharded: bool = False):
    """`sharded` (FSDP2): pack the 4-bit weights into the compute dtype instead of uint8, so FSDP can
    shard them like any float parameter (accelerate leaves uint8 ones whole on every GPU)."""
    if q.bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = compute_dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": compute} if sharded else {}),
    )


def load_model(cfg: Config, tokenizer, source: ModelSource | None = None, auto_class=None, **model_kwargs):
    """The base model (plus any adapter named by model.name, merged), embeddings sized to the tokenizer.

    `auto_class` (default AutoModelForCausalLM) and `model_kwargs` pick another head, e.g. the
    reward model's AutoModelForSequenceClassification with num_labels=1.
    """
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    source = source or resolve(cfg.model.name)
    dtype = train_dtype(cfg.train.precision, cfg.model.dtype)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        quantization_config=quantization_config(cfg.quantization, dtype, sharded=fsdp_enabled(cfg)),
        **model_kwargs,
    )
    if cfg.quantization.bits and has_cuda():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = auto_class.from_pretrained(source.path, **kwargs)
    except OSError as err:
        raise TunelabError(f"model.name={cfg.model.name}: cannot load weights from {source.path}: {err}") from None
    fit_embeddings(model, tokenizer)
    if source.adapter is not None:  # continue from an earlier LoRA run: fold its adapter in first
        if cfg.quantization.bits:
            raise TunelabError(
                f"model.name={cfg.model.name}: is a LoRA run; merge it first (`tunelab merge`) "
                "to train a quantized model on top of it"
            )
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # a classifier (reward model) has none
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # A cache in training turns off the packed-sequence detection of transformers' masks.
    model.config.use_cache = False
    return model


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer gained tokens (the pad token)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)


def lora_config(peft: PeftConfig, task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig for the peft.* settings; task_type SEQ_CLS also trains the new score head."""
    from peft import LoraConfig

    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=peft.target_modules,
        use_dora=peft.method == "dora",
        task_type=task_type,
    )


def apply_peft(model, peft: PeftConfig, quantized: bool, gradient_checkpointing: bool):
    """Wrap the model in a LoRA/DoRA adapter (QLoRA when the base is quantized); full = unchanged."""
    if peft.method == "full":
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, lora_config(peft))
    except ValueError as err:  # e.g. target module names that the model does not have
        raise TunelabError(f"peft.target_modules={peft.target_modules!r}: {err}") from None


def load_for_training(cfg: Config):
    source = resolve(cfg.model.name)
    tokenizer = load_tokenizer(source)
    model = load_model(cfg, tokenizer, source)
    kernels.apply(model, cfg.train.kernels, sharded=fsdp_enabled(cfg))
    model = apply_peft(model, cfg.peft, bool(cfg.quantization.bits), cfg.train.gradient_checkpointing)
    return model, tokenizer


def save_trained(model, tokenizer, run_dir: Path, full: bool, state_dict: dict | None = None) -> Path:
    """Adapter (or full model) plus the tokenizer, so inference renders and pads exactly as training did.
    `state_dict`: the weights gathered from FSDP shards (the model's own are only this rank's part)."""
    out = run_dir / ("model" if full else "adapter")
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    return out


def merge_and_save(name: str, output: Path) -> Path:
    """Fold a LoRA run's adapter into its (unquantized) base and save a plain HF model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = resolve(name)
    if source.adapter is None:
        raise TunelabError(f"merge: {name} is not a LoRA run or adapter folder (no adapter_config.json)")
    tokenizer = load_tokenizer(source)
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype="auto")
    fit_embeddings(base, tokenizer)
    merged = PeftModel.from_pretrained(base, source.adapter).merge_and_unload()
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def load_for_eval(name: str):
    """(model, tokenizer) to evaluate: unquantized, any adapter merged in, fp32 on CPU or bf16 on a
    bf16 GPU, in eval mode with the KV cache on (training turns it off; generation wants it)."""
    from transformers import AutoModelForCausalLM

    source = resolve(name)
    tokenizer = load_tokenizer(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=train_dtype("auto"))
    except OSError as err:
        raise TunelabError(f"{name}: cannot load weights from {source.path}: {err}") from None
    fit_embeddings(model, tokenizer)
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    return model.to("cuda" if has_cuda() else "cpu").eval(), tokenizer
