"""Build the tokenizer and model a stage trains or evaluates: pad token, dtype, quantization, PEFT."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tunelab import kernels
from tunelab.config import Config, PeftConfig, QuantizationConfig
from tunelab.errors import TunelabError
from tunelab.models.loading import DEFAULT_CHAT_TEMPLATE, ModelSource, resolve
from tunelab.models.vocab import generation_stop_ids, saved_embedding_rows, set_pad_token

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Precision:
    """How a run computes, decided in one place: the weights' dtype, and the mixed precision the
    Trainer autocasts to (None = none: the CPU, fp32, or a GPU without bf16)."""

    dtype: torch.dtype
    autocast: str | None = None

    @property
    def bf16(self) -> bool:
        return self.autocast == "bf16"

    @property
    def fp16(self) -> bool:
        return self.autocast == "fp16"


def precision(train: str = "auto", model_dtype: str = "auto") -> Precision:
    """`train.precision` and `model.dtype` → Precision. An explicit model.dtype wins for the
    weights; else bf16 on a bf16-capable GPU (or when asked), fp16 when asked, fp32 elsewhere.
    Autocast needs CUDA: bf16 for `auto`/`bf16` where the GPU supports it, fp16 for `fp16`."""
    cuda = has_cuda()
    bf16_gpu = cuda and torch.cuda.is_bf16_supported()
    if model_dtype != "auto":
        dtype = getattr(torch, model_dtype)
    elif train == "bf16" or (train == "auto" and bf16_gpu):
        dtype = torch.bfloat16
    elif train == "fp16":
        dtype = torch.float16
    else:
        dtype = torch.float32
    autocast = "bf16" if bf16_gpu and train in ("auto", "bf16") else "fp16" if cuda and train == "fp16" else None
    return Precision(dtype, autocast)


def load_tokenizer(source: ModelSource, chat_template: str | None = None):
    """Tokenizer with a dedicated pad token (never EOS, a spare special token where there is one:
    `models/vocab.py`), right padding, and a chat template: `chat_template`
    (model.chat_template) if given, else the saved or the model's own, else a plain default."""
    from transformers import AutoTokenizer

    path = source.adapter if source.adapter and (source.adapter / "tokenizer_config.json").is_file() else source.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise TunelabError(f"model.name: cannot load a tokenizer from {path}: {err}") from None
    if chat_template is not None:
        override_template(tokenizer, chat_template, path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if set_pad_token(tokenizer, generation_stop_ids(str(source.path))):
        log.info("the tokenizer has no special token to spare: added %s as the pad token (the vocabulary grows by "
                 "one; a plain-peft load of the adapter must resize the base's embeddings to %d)",
                 tokenizer.pad_token, len(tokenizer))
    tokenizer.padding_side = "right"
    return tokenizer


def override_template(tokenizer, name: str, path) -> None:
    """model.chat_template replaces the tokenizer's template. A run folder's tokenizer holds the
    template its training used, so replacing that one by another is said out loud."""
    from tunelab.data.templates import use_chat_template

    saved = tokenizer.chat_template
    try:
        added = use_chat_template(tokenizer, name)
    except FileNotFoundError as err:
        raise TunelabError(str(err)) from None
    if saved and saved != tokenizer.chat_template and (Path(path).parent / "config.yaml").is_file():
        log.warning("%s was trained with another chat template than model.chat_template=%s: prompts now render "
                    "differently from training (leave model.chat_template unset to use the saved one)", path, name)
    if added:
        log.warning("model.chat_template=%s: added %s to the vocabulary; their embeddings start untrained (LoRA "
                    "leaves embeddings frozen: prefer a template whose markers the model already knows)",
                    name, ", ".join(added))


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


AdapterUse = Literal["merge", "continue", "ignore"]


def build_model(source: ModelSource, tokenizer, *, dtype: torch.dtype | str, adapter: AdapterUse = "merge",
                quantization=None, attn_implementation: str = "sdpa", revision: str | None = None,
                trust_remote_code: bool = False, auto_class=None, for_generation: bool = False, **model_kwargs):
    """The one place a model is built from a ModelSource: weights → embeddings sized to the
    tokenizer → the source's adapter → pad ids → cache setting.

    adapter: what to do with `source.adapter` (a LoRA run named as the model): `merge` folds it
    into the base (SFT trains a new adapter on top; evaluation and serving run the merged
    model), `continue` loads it as the trainable adapter (preference tuning keeps one adapter on
    the original base, and trl's frozen copy of it is the reference), `ignore` leaves it out.
    quantization: a BitsAndBytesConfig (`quantization_config`) or None; a quantized base cannot
    have an adapter merged into it. auto_class (default AutoModelForCausalLM) and model_kwargs
    pick another head, e.g. the reward model's AutoModelForSequenceClassification, num_labels=1.
    for_generation: keep the KV cache on (training needs it off: a cache disables the
    packed-sequence detection of transformers' masks).
    """
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, revision=revision,
                  trust_remote_code=trust_remote_code, quantization_config=quantization, **model_kwargs)
    if quantization is not None and has_cuda():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    from safetensors import SafetensorError

    try:
        model = auto_class.from_pretrained(source.path, **kwargs)
    except (OSError, SafetensorError) as err:  # SafetensorError: a weights file cut short or not safetensors
        raise TunelabError(f"model.name: cannot load weights from {source.path}: {err}") from None
    fit_embeddings(model, tokenizer, saved_embedding_rows(source.adapter) if adapter != "ignore" else None)
    if source.adapter is not None and adapter != "ignore":
        from peft import PeftModel

        if adapter == "continue":
            model = PeftModel.from_pretrained(model, source.adapter, is_trainable=True)
        elif quantization is not None:
            raise TunelabError(f"model.name: {source.adapter} is a LoRA run; merge it first (`tunelab merge`) "
                               "to train a quantized model on top of it")
        else:  # a causal-LM adapter folds into any head's body (the reward model's classifier too)
            from peft import PeftConfig

            config = PeftConfig.from_pretrained(source.adapter)
            if auto_class is not AutoModelForCausalLM:
                config.task_type = None  # else peft wraps a classifier as a causal LM and fails
            model = PeftModel.from_pretrained(model, source.adapter, config=config).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # a classifier (reward model) has none
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = for_generation
    return model


def model_options(cfg: Config, *, sharded: bool = False) -> dict:
    """build_model's keyword arguments for a training run's model.*, quantization.* and
    train.precision. sharded: FSDP2 will shard the model (see `quantization_config`)."""
    m = cfg.model
    dtype = precision(cfg.train.precision, m.dtype).dtype
    return dict(dtype=dtype, quantization=quantization_config(cfg.quantization, dtype, sharded=sharded),
                attn_implementation=m.attn_implementation, revision=m.revision, trust_remote_code=m.trust_remote_code)


def fit_embeddings(model, tokenizer, rows: int | None = None) -> None:
    """Grow the embeddings when the tokenizer gained tokens (an added pad token), to exactly its
    size, or to `rows` (what an adapter written by earlier tunelab versions carries)."""
    rows = max(rows or 0, len(tokenizer))
    if rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)


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


def apply_peft(model, peft: PeftConfig, quantized: bool, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM"):
    """Wrap the model in a LoRA/DoRA adapter (QLoRA when the base is quantized); full = unchanged.
    task_type SEQ_CLS: a reward model (the new score head trains in full, see lora_config)."""
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
        return get_peft_model(model, lora_config(peft, task_type=task_type))
    except ValueError as err:  # e.g. target module names that the model does not have
        raise TunelabError(f"peft.target_modules={peft.target_modules!r}: {err}") from None


def load_for_training(cfg: Config, *, sharded: bool = False, tokenizer=None):
    """(model, tokenizer) for SFT: the base (a LoRA run as model.name merged in), the fast path,
    then a new adapter from peft.* (none for full fine-tuning). `tokenizer`: the one already loaded
    (`load_tokenizer(source, model.chat_template)`), which rendered the data."""
    source = resolve(cfg.model.name)
    tokenizer = tokenizer or load_tokenizer(source, cfg.model.chat_template)
    model = build_model(source, tokenizer, **model_options(cfg, sharded=sharded))
    kernels.apply(model, cfg.train.kernels, sharded=sharded)
    model = apply_peft(model, cfg.peft, bool(cfg.quantization.bits), cfg.train.gradient_checkpointing)
    kernels.apply_lora(model, cfg.train.kernels, sharded=sharded, activation_offload=cfg.train.activation_offload)
    return model, tokenizer


def load_policy(cfg: Config, tokenizer):
    """(causal LM, peft_config for trl or None): a fresh adapter comes from peft.*, full
    fine-tuning has none, and a preceding LoRA run (`model.name=runs/<sft run>`) is continued, not
    merged: its adapter is the trainable one, so QLoRA works on top of it and the result is again
    one adapter on the original base. trl then keeps a frozen copy of that adapter as the
    reference, i.e. the reference is the SFT model, as DPO and RLHF intend."""
    source = resolve(cfg.model.name)
    if source.adapter is not None and cfg.peft.method == "full":
        raise TunelabError(f"peft.method=full: model.name={cfg.model.name} is a LoRA run; merge it first "
                           "(`tunelab merge`) to fine-tune all weights on top of it")
    model = build_model(source, tokenizer, adapter="continue", **model_options(cfg))
    if source.adapter is not None:
        log.info("continuing the adapter of %s (its r/alpha/targets; peft.* shapes only new adapters)", source.adapter)
        return model, None
    return model, (None if cfg.peft.method == "full" else lora_config(cfg.peft))


def save_trained(model, tokenizer, run_dir: Path, full: bool, state_dict: dict | None = None) -> Path:
    """Adapter (or full model) plus the tokenizer, so inference renders and pads exactly as training did.
    `state_dict`: the weights gathered from FSDP shards (the model's own are only this rank's part)."""
    out = run_dir / ("model" if full else "adapter")
    # An adapter keeps to its low-rank weights (and a reward model's score head): the embeddings
    # are the base's, or the base's plus one untrained pad row that any loader re-creates.
    extra = {} if full else {"save_embedding_layers": False}
    model.save_pretrained(out, state_dict=state_dict, **extra)
    tokenizer.save_pretrained(out)
    return out


def merge_and_save(name: str, output: Path, dtype: torch.dtype | None = None) -> Path:
    """Fold a LoRA run's adapter into its (unquantized) base and save a plain HF model folder, in
    `dtype` (default: the base's own). The merge itself runs in the base's dtype, then casts."""
    source = resolve(name)
    if source.adapter is None:
        raise TunelabError(f"merge: {name} is not a LoRA run or adapter folder (no adapter_config.json)")
    tokenizer = load_tokenizer(source)
    merged = build_model(source, tokenizer, dtype="auto", for_generation=True)
    if dtype is not None:
        merged = merged.to(dtype)
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def load_for_eval(name: str):
    """(model, tokenizer) to evaluate or serve: unquantized, any adapter merged in, fp32 on CPU or
    bf16 on a bf16 GPU, on the GPU when there is one, in eval mode with the KV cache on."""
    source = resolve(name)
    tokenizer = load_tokenizer(source)
    model = build_model(source, tokenizer, dtype=precision().dtype, for_generation=True)
    return model.to("cuda" if has_cuda() else "cpu").eval(), tokenizer


def attach_adapters(model, adapters: dict[str, str]):
    """`model` with named LoRA adapters held by peft (the server switches between them per request),
    the base model active until a request names one."""
    if not adapters:
        return model
    from peft import PeftModel

    for i, (name, folder) in enumerate(adapters.items()):
        path = resolve(folder).adapter
        if path is None:
            raise TunelabError(f"--adapters {name}={folder}: not a LoRA run or adapter folder (no adapter_config.json)")
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    model.base_model.disable_adapter_layers()
    return model.eval()
