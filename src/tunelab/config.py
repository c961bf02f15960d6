"""The one typed config every command reads: YAML recipe + `a.b=c` overrides, validated up front.

Every key is declared here with its default and one docstring; unknown keys and bad values
fail before any model loads, all errors reported together with the field path and the fix.
This module imports no torch/transformers so `--help` and validation stay fast.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.data.templates import CHAT_TEMPLATES
from tunelab.errors import TunelabError, did_you_mean

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunConfig(_Section):
    name: str = "run"
    """Run name; also the W&B run name."""
    dir: str | None = None
    """Run folder; default `runs/<name>`."""
    seed: int = 42
    """Seed for data splits, shuffling, LoRA init and dropout."""

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name


class ModelConfig(_Section):
    name: str = "embedded"
    """Hub id, local model folder, `.gguf` file, a previous run folder, or `embedded` (SmolLM2-135M-Instruct)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; `auto` = bfloat16 on a GPU that supports it, else float32."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel; both keep packed samples isolated."""
    trust_remote_code: bool = False
    """Allow model code from the Hub (off by default: it runs arbitrary code)."""
    chat_template: str | None = None
    """Render chats with chatml, llama-2, llama-3 or a PATH.jinja template instead of the model's own
    (or for a base model that has none); saved with the tokenizer, so evaluation, export and serving
    render as training did. null = the model's own."""

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None and value not in CHAT_TEMPLATES and not value.endswith(".jinja"):
            raise ValueError(f"got {value!r}; use one of {', '.join(CHAT_TEMPLATES)} or a .jinja file")
        return value


class QuantizationConfig(_Section):
    bits: Literal[4, 8] | None = None
    """Load the frozen base in 4-bit (QLoRA) or 8-bit via bitsandbytes; null = no quantization."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type (NF4 from the QLoRA paper, Dettmers et al. 2023)."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit/param)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of the dequantized matmuls; `auto` follows the training precision."""


class PeftConfig(_Section):
    method: Literal["lora", "dora", "full"] = "lora"
    """`lora`, `dora` (weight-decomposed LoRA) or `full` fine-tuning (no adapter)."""
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear` or a list of module names such as [q_proj, v_proj]."""


def renamed_format(data: Any, where: str) -> Any:
    """Accept `adapter`, the old name of a data `format` key, with a one-line notice (the name meant
    a LoRA folder elsewhere; the data side is called a format now)."""
    if not isinstance(data, dict) or "adapter" not in data:
        return data
    if "format" in data:
        raise ValueError(f"{where}.adapter: the old name of {where}.format; keep only {where}.format")
    log.warning("%s.adapter is now called %s.format (the old name still works)", where, where)
    data = dict(data)
    data["format"] = data.pop("adapter")
    return data


Split = Literal["train", "validation", "test"]


class SourceConfig(_Section):
    """One part of a mixture (`data.sources`); format, fields and subset default to data.*'s."""

    source: str
    """Hub dataset id, a local file, or a folder with train/validation/test files."""
    format: str | None = None
    """Its data format (default data.format)."""
    fields: dict[str, str] | None = None
    """Its column mapping (default data.fields, when format is not given here either)."""
    subset: str | None = None
    """Hub dataset config name."""
    splits: dict[Split, list[str]] | None = None
    """Its files per split, relative to the source folder (see data.splits)."""
    weight: float = Field(1.0, gt=0)
    """Share of the training tokens, relative to the other sources' weights."""
    max_samples: int | None = Field(None, ge=1)
    """Use at most this many of its training samples before mixing (default data.max_train_samples)."""
    name: str | None = None
    """Name in the stats and the per-source validation loss; default: from the source (file or folder name)."""


class DataConfig(_Section):
    format: str = "custom"
    """Data format: samsum, cnn_dailymail, openorca, guanaco, alpaca, sharegpt, messages or custom; for
    reward/dpo/rl: hh_rlhf, orca_dpo, preferences (the review export) or custom with {prompt, chosen, rejected} fields."""
    source: str | None = None
    """Hub dataset id, a local file, or a folder with train/validation/test files."""
    sources: list[SourceConfig] | None = Field(None, min_length=1)
    """A mixture instead of one source: [{source, format, weight, fields, max_samples}, ...], mixed by `mix`."""
    mix: Literal["subsample", "repeat"] = "subsample"
    """How `sources` are mixed to their weights' shares of the training tokens, drawn once per run (seeded):
    `subsample` uses the scarcest source (relative to its weight) whole and draws the others without
    replacement; `repeat` uses the most abundant one whole and repeats the others."""
    subset: str | None = None
    """Hub dataset config name (e.g. `3.0.0` for cnn_dailymail)."""
    fields: dict[str, str] | None = None
    """For `custom`: {prompt: col, completion: col, system: col} or {messages: col}; for `sharegpt` and
    `messages`: other key names, e.g. {conversations: turns, from: role, value: text, tools: functions}."""
    splits: dict[Split, list[str]] | None = None
    """Files per split, relative to the data.source folder, e.g. {train: [a.jsonl, b.jsonl]}: for a folder
    whose file names do not say the split, or several files of one split that are not numbered shards."""
    bad_rows: Literal["error", "skip"] = "error"
    """Malformed rows: `error` stops naming file/line/field; `skip` drops and counts them."""
    max_length: int = Field(1024, ge=16)
    """Longest sequence in tokens (a packed row, or one padded sample)."""
    overlong: Literal["drop", "truncate"] = "drop"
    """Samples longer than max_length: `drop`, or `truncate` their prompt (the completion stays whole); counted either way."""
    batching: Literal["packing", "padding"] = "packing"
    """`packing`: samples share rows, never split, never attend to each other. `padding`: right-padded, length-grouped."""
    train_on: Literal["assistant", "last_assistant", "completion", "all"] = "assistant"
    """Which tokens carry the loss: every `assistant` turn, the `last_assistant` turn only, the
    `completion` (the assistant turns after the last user turn: tool calls and the answer, not the
    tool results), or `all` tokens (the prompt too)."""
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Held-out share of the training data when the source has no validation split."""
    test_fraction: float = Field(0.0, ge=0, lt=1)
    """Held-out test share (carved out when the source has no test split; never used in training)."""
    max_train_samples: int | None = Field(None, ge=1)
    """Use at most this many training samples (after the split; seeded shuffle)."""
    max_eval_samples: int | None = Field(None, ge=1)
    """Use at most this many validation samples."""
    folds: int | None = Field(None, ge=2)
    """k-fold cross-validation (set by `tunelab kfold`): the seeded shuffle of train is cut into this many parts."""
    fold: int | None = Field(None, ge=0)
    """The part (0-based, < folds) that validates; the others train. The source's validation split is unused."""
    num_proc: int | None = Field(None, ge=1)
    """Worker processes for tokenization; default: the number of CPU cores."""

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        data = renamed_format(data, "data")
        if isinstance(data, dict) and "completion_only_loss" in data:  # the old switch (run folders keep it)
            data = dict(data)
            only = data.pop("completion_only_loss")
            if only is False and "train_on" not in data:
                log.warning("data.completion_only_loss=false is now data.train_on=all (the old key still works)")
                data["train_on"] = "all"
        return data

    @property
    def completion_only_loss(self) -> bool:
        return self.train_on != "all"

    @property
    def mixture(self) -> list[SourceConfig]:
        """The sources to read, each with its format, fields, subset and name filled in: `data.sources`,
        or `data.source` as a mixture of one."""
        if not self.sources:
            source = self.source or ""
            return [SourceConfig(source=source, format=self.format, fields=self.fields, subset=self.subset,
                                 splits=self.splits, max_samples=self.max_train_samples, name=source_name(source))]
        return [SourceConfig(
            source=s.source, format=s.format or self.format, fields=s.fields if s.format else (s.fields or self.fields),
            subset=s.subset or self.subset, splits=s.splits, weight=s.weight,
            max_samples=s.max_samples or self.max_train_samples, name=s.name or source_name(s.source),
        ) for s in self.sources]


def source_name(source: str) -> str:
    """A short name for a source: its file or folder name (`../data/samsum` → samsum, `org/set` → set)."""
    path = Path(source.rstrip("/"))
    stem = path.stem if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") else path.name
    return re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_").lower() or "data"


def unknown_format(name: str) -> str | None:
    """The problem with a data format name ("unknown format 'samsun'; did you mean samsum? ..."), or
    None for a known one: checked with the config, not once the stage has imported torch."""
    from tunelab.data import feedback  # noqa: F401  (registers its formats, rankings and ratings)
    from tunelab.data.formats import FORMATS

    names = [*FORMATS, "custom"]
    if name in names:
        return None
    return f"unknown format {name!r}{did_you_mean(name, names)} (formats: {', '.join(names)})"


def _data_problems(d: DataConfig) -> list[str]:
    """The data section's cross-field checks (one source or a mixture)."""
    if d.source is None and not d.sources:
        return ["data.source: required (a Hub dataset id, a file or a folder), or data.sources for a mixture"]
    if d.source is not None and d.sources:
        return ["data.sources: give either data.source or data.sources (a mixture), not both"]
    where = ["data"] if not d.sources else [f"data.sources[{i}]" for i in range(len(d.sources))]
    problems = []
    for at, s in zip(where, d.mixture):
        if (unknown := unknown_format(s.format)) is not None:
            problems.append(f"{at}.format: {unknown}")
        elif s.format == "custom" and not s.fields:
            problems.append(f"{'data' if at == 'data' else at}.fields: required for format custom, "
                            "e.g. {prompt: question, completion: answer}")
    names = [s.name for s in d.mixture]
    if len(set(names)) < len(names):
        problems.append(f"data.sources: two sources are both named {next(n for n in names if names.count(n) > 1)!r}; "
                        "give each a name: {source: ..., name: ...}")
    if d.sources and d.splits:
        problems.append("data.splits: with data.sources, give each source its own splits")
    return problems


class EarlyStoppingConfig(_Section):
    patience: int = Field(3, ge=1)
    """Evaluations without improvement before stopping."""
    threshold: float = Field(0.0, ge=0)
    """Minimum decrease of validation loss that counts as an improvement."""


class EvalGenerationConfig(_Section):
    task: Literal["rouge_l", "rouge", "exact_match", "field_accuracy"] = "rouge_l"
    """Metric on greedy generations during training (`rouge` logs all ROUGE parts, selects on ROUGE-L)."""
    every: int | None = Field(None, ge=1)
    """Steps between generation evaluations: a multiple of train.eval_every (null = at every validation)."""
    samples: int = Field(16, ge=1)
    """Validation rows generated each time (the same first N rows every time)."""

    @property
    def key(self) -> str:
        """The metrics key the task is logged and selected under (without the `eval_` prefix)."""
        return "rouge_l" if self.task == "rouge" else self.task


OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)
"""transformers' `OptimizerNames` (5.23), written out because reading the enum imports torch and
validation must not; `tests/test_config.py` checks that the two lists agree."""


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    batch_size: int | Literal["auto"] = "auto"
    """Rows per device per micro-step (a packed row holds several samples). `auto`: on one CUDA
    device SFT probes the largest micro-batch that fits its memory target and meets the step's rows
    (tokens_per_step) through grad_accum; elsewhere the step's rows split as grad_accum says."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step (with batch_size=auto on CUDA, chosen to meet tokens_per_step)."""
    tokens_per_step: int | None = Field(None, ge=1)
    """Token slots of one optimizer step over all processes (rows × data.max_length × micro-steps): the
    optimisation a recipe asks for, whatever the GPU. null = batch_size × grad_accum rows (8 for auto)."""

    @field_validator("batch_size", mode="before")
    @classmethod
    def _rows_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        raise ValueError(f"got {value!r}: a number of rows ≥ 1, or auto")
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of steps spent warming up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    optim: str = "adamw_torch"
    """Optimizer name as transformers knows it (e.g. paged_adamw_8bit for QLoRA on a GPU)."""

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {value!r}{did_you_mean(value, OPTIMIZERS)} "
                             "(transformers' names: adamw_torch, adamw_8bit, paged_adamw_8bit, sgd, adafactor, ...)")
        return value
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision; `auto` = bf16 where the GPU supports it, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    kernels: Literal["auto", "off"] = "auto"
    """`auto`: on CUDA, Llama-architecture models train with fused kernels (varlen attention for packed
    rows, liger's fused cross-entropy/RMSNorm/SwiGLU/RoPE where installed); `off`: stock transformers."""
    activation_offload: bool = False
    """With gradient_checkpointing: keep the checkpointed hidden states in pinned CPU memory (less GPU memory)."""
    compile: Literal["auto", "off"] = "auto"
    """`auto`: on CUDA, SFT compiles each decoder layer (torch.compile, static [rows, max_length] packed
    batches; falls back to eager, saying so, where the layer does not compile); `off`: eager."""

    @field_validator("kernels", "compile", mode="before")
    @classmethod
    def _off_is_not_false(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` (train.compile=off) as false
    logging_steps: int = Field(1, ge=1)
    """Log train loss every N steps."""
    eval_every: int | None = Field(None, ge=1)
    """Validate every N steps (null = only before and after training)."""
    save_every: int | None = Field(None, ge=1)
    """Checkpoint every N steps (null = at eval steps, or at the end)."""
    save_total_limit: int | None = Field(2, ge=1)
    """Keep at most this many checkpoints."""
    eval_generation: EvalGenerationConfig | None = None
    """Also score generations during training, e.g. {task: rouge_l, every: 50, samples: 32} (needs eval_every)."""
    select_on: Literal["loss", "generation"] = "loss"
    """What early stopping and the best checkpoint follow: validation loss (lower is better) or the
    eval_generation metric (higher is better)."""
    load_best: bool = False
    """Restore the best checkpoint (by select_on) at the end; always on with early_stopping."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop when the select_on metric stops improving (needs eval_every)."""
    resume: bool = False
    """Continue from the last checkpoint in the run folder (the CLI's --resume)."""

    def planned(self, max_length: int, processes: int = 1) -> tuple[int, int]:
        """(rows per micro-step per process, micro-steps per optimizer step) without probing: a number
        batch_size as written; `auto` splits the step's rows (tokens_per_step, else 8 × grad_accum)
        into grad_accum micro-steps. SFT on one CUDA device replaces `auto` by a probed split."""
        rows = self.rows_per_step(max_length, processes)
        if self.batch_size != "auto":
            accum = self.grad_accum if self.tokens_per_step is None else max(1, -(-rows // self.batch_size))
            return self.batch_size, accum
        return max(1, -(-rows // self.grad_accum)), self.grad_accum

    def rows_per_step(self, max_length: int, processes: int = 1) -> int:
        """Rows of one optimizer step on each process."""
        if self.tokens_per_step is not None:
            return max(1, -(-self.tokens_per_step // (max_length * processes)))
        return (8 if self.batch_size == "auto" else self.batch_size) * self.grad_accum


class GenerationSettings(_Section):
    """How evaluation generates and batches (shared by a run's eval section and `tunelab eval`)."""

    max_new_tokens: int = Field(128, ge=1)
    """Generation length limit for task metrics."""
    batch_size: int = Field(8, ge=1)
    """Batch size for validation loss and generation."""


class EvalConfig(GenerationSettings):
    before: bool = True
    """Evaluate the untouched model on the validation rows before training."""
    generation_samples: int = Field(16, ge=0)
    """Validation rows to generate for task metrics and samples.jsonl (0 = none)."""
    metrics: list[Literal["exact_match", "rouge_l", "rouge", "field_accuracy"]] = ["exact_match", "rouge_l"]
    """Task metrics computed on the generations."""


class TrackingConfig(_Section):
    wandb: bool = False
    """Log to Weights & Biases (offline automatically when no API key is set)."""
    project: str = "tunelab"
    """W&B project."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Extra trainer integrations, passed through."""


class DistributedConfig(_Section):
    """How a run launched on several processes (`--nproc N`, torchrun, accelerate launch) splits the
    work; one process ignores it. Each process gets train.batch_size rows per step, so the global
    batch is batch_size x grad_accum x processes."""

    strategy: Literal["fsdp", "ddp"] = "fsdp"
    """`fsdp`: FSDP2 shards weights, gradients and optimizer state across processes (full, LoRA, QLoRA);
    `ddp`: every process holds the whole model (for small models, where sharding costs more than it saves)."""
    reshard_after_forward: bool = True
    """fsdp: free each layer's gathered weights after its forward (least memory); false keeps them for
    the backward (one all-gather fewer per layer, more memory)."""
    wrap: list[Annotated[str, Field(min_length=1)]] | None = None
    """fsdp: layer classes sharded as one unit each, e.g. [LlamaDecoderLayer]; default: the model's own
    (`_no_split_modules`)."""
    cpu_ram_efficient_loading: bool = False
    """fsdp: only rank 0 reads the checkpoint; the others get the weights by broadcast (one copy in host RAM)."""


REWARD_FUNCTIONS = ("exact_match", "rouge", "length")
"""The built-in reward functions of `tunelab rl` (besides `length:N`, `regex:…` and `python:module:function`)."""


class RewardSpec(_Section):
    """One reward of `tunelab rl`: a reward-model run or a function, with its weight. A plain string
    in `preference.rewards` is a function (`- exact_match` is `- {function: exact_match}`)."""

    reward_model: str | None = None
    """A `tunelab reward` run folder; its model scores prompt + completion."""
    function: str | None = None
    """`exact_match` or `rouge` (ROUGE-L F1) against the row's reference answer; `length` (1 when the
    word count equals the reference's, falling linearly to 0 at none or twice as many) or `length:N`
    (the same around N words); `regex:PATTERN` (1 when the completion matches, Python `re.search`);
    `python:module:function` (called as trl calls reward functions: `f(prompts=, completions=,
    reference=, **kwargs) -> list[float]`)."""
    weight: float = 1.0
    """Its weight in the summed reward."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"function": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.reward_model is None) == (self.function is None):
            raise ValueError("give exactly one of reward_model (a `tunelab reward` run) or function")
        if self.function is not None and (problem := _reward_function_problem(self.function)):
            raise ValueError(problem)
        return self

    @property
    def name(self) -> str:
        """How metrics.jsonl and summary.json name this reward."""
        if self.reward_model is not None:
            return Path(self.reward_model).name or "reward_model"
        return self.function.rsplit(":", 1)[-1] if self.function.startswith("python:") else self.function


def _reward_function_problem(function: str) -> str | None:
    import re

    kind, _, rest = function.partition(":")
    if function in REWARD_FUNCTIONS:
        return None
    if kind == "length" and rest.isdigit() and int(rest) > 0:
        return None
    if kind == "regex" and rest:
        try:
            re.compile(rest)
        except re.error as err:
            return f"function {function!r}: not a valid regular expression ({err})"
        return None
    if kind == "python" and re.fullmatch(r"[\w.]+:\w+", rest):
        return None
    return (f"function {function!r}: use one of {', '.join(REWARD_FUNCTIONS)}, length:N (N words), regex:PATTERN "
            "or python:module:function")


class PreferenceConfig(_Section):
    """Settings of `tunelab reward`, `dpo`, `kto` and `rl`; the other commands ignore them."""

    method: Literal["dpo", "orpo", "simpo"] = "dpo"
    """dpo: `dpo` (against a reference model, Rafailov et al. 2023), or reference-free: `orpo` (SFT loss on
    the chosen answer + an odds-ratio term, Hong et al. 2024) or `simpo` (length-normalised log-probability
    margin over a target γ, Meng et al. 2024); these two keep no reference model."""
    beta: float = Field(0.1, gt=0)
    """dpo/kto: pull toward the reference model (the starting model); higher stays closer. 0.1 as in the DPO
    paper. orpo: λ, the weight of the odds-ratio term (0.1 in the paper). simpo: the reward scale β (the
    paper uses 2 to 2.5)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """dpo: `sigmoid` (DPO), `ipo`, `hinge` (SLiC) or `robust` (expects label_smoothing of the labels)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """dpo: assumed share of wrongly ordered pairs (conservative/robust DPO); 0 = trust every label."""
    simpo_gamma: float = Field(0.5, ge=0)
    """simpo: the target reward margin γ (trl's default 0.5; the paper keeps γ/β near 0.5)."""
    min_agreement: float | None = Field(None, ge=-1, le=1)
    """Drop pairs (and rankings) whose reviewer agreement (from `tunelab review export`) is below this;
    rows without one stay."""
    loss: Literal["pairwise", "listwise"] = "pairwise"
    """reward: `pairwise` (Bradley–Terry on chosen/rejected pairs, trl's RewardTrainer) or `listwise`
    (Plackett–Luce over each reviewer's whole ranking, ties included, from `tunelab review export --as
    rankings`: data.format=rankings)."""
    weight_by_agreement: bool = False
    """reward with loss=listwise: weight each item's rankings by its reviewer agreement (Kendall's W); an
    item with one reviewer gets the mean W of the others."""
    desirable_weight: float | None = Field(None, gt=0)
    """kto: weight of the desirable examples' loss (undesirable ones weigh 1); null = n_undesirable /
    n_desirable, so both classes weigh the same in all (the KTO paper keeps this ratio in [1, 4/3])."""
    algorithm: Literal["rloo", "grpo"] = "rloo"
    """rl: `rloo` (leave-one-out baseline, KL subtracted from the reward) or `grpo` (group-normalised
    advantages, KL in the loss; for verifiable rewards such as exact_match)."""
    grpo_loss: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = "dapo"
    """rl with algorithm=grpo: how trl aggregates the token losses (`dapo`, trl's default: by the active
    tokens of the whole batch; `grpo`: per sequence; `dr_grpo`: by a constant; `bnpo`; `cispo`; `sapo`)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """rl with algorithm=grpo: divide advantages by the reward std of the `group` (GRPO), the `batch`, or
    `none` (Dr. GRPO: no question-difficulty bias)."""
    reward_model: str | None = None
    """rl: the `tunelab reward` run folder whose model scores the sampled completions (shorthand for
    rewards: [{reward_model: ...}])."""
    rewards: list[RewardSpec] = []
    """rl: rewards summed with their weights, e.g. [{reward_model: runs/rm, weight: 1}, {function:
    exact_match, weight: 0.5}, regex:^Yes]; empty = the reward_model alone."""
    kl_coef: float = Field(0.05, ge=0)
    """rl: KL penalty toward the reference (the starting policy): rloo subtracts it from the reward, grpo
    adds it to the loss; 0 = none."""
    num_generations: int = Field(4, ge=2)
    """rl: completions sampled per prompt; each is baselined on the others (RLOO) or its group (GRPO)."""
    max_new_tokens: int = Field(64, ge=1)
    """rl: length limit of a sampled completion (and of the before/after generations)."""
    temperature: float = Field(1.0, gt=0)
    """rl: sampling temperature during training."""

    @property
    def reward_specs(self) -> list[RewardSpec]:
        """rl's rewards: `rewards`, else the reward_model alone (empty when neither is set)."""
        if self.rewards:
            return list(self.rewards)
        return [RewardSpec(reward_model=self.reward_model)] if self.reward_model else []

    @model_validator(mode="after")
    def _one_way_to_name_rewards(self) -> PreferenceConfig:
        if self.rewards and self.reward_model:
            raise ValueError("reward_model: set either preference.reward_model or preference.rewards (which can "
                             "hold {reward_model: ...} with a weight), not both")
        names = [spec.name for spec in self.rewards]
        if len(set(names)) < len(names):
            raise ValueError(f"rewards: two rewards are both called {next(n for n in names if names.count(n) > 1)!r}; "
                             "each reward model run folder and each function can appear once")
        return self


class EvalRunConfig(GenerationSettings):
    """`tunelab eval TARGET`: what to evaluate, on which rows, against what. Each option of the
    command sets one of these keys (`--limit 5` is `limit=5`); `key=value` arguments work too."""

    target: str
    """Run folder, adapter or model folder, Hub id, `.gguf` file, or `embedded`."""
    tasks: list[Annotated[str, Field(min_length=1)]] = Field(["perplexity", "rouge"], min_length=1)
    """perplexity, rouge, exact_match, bleu, hellaswag, truthfulqa_mc1, truthfulqa_mc2, or task YAML files."""
    baseline: str = "auto"
    """Model to compare with: `auto` = a run folder's base model (none for other targets), `none`, or a model."""
    limit: int | None = Field(None, ge=1)
    """Evaluate at most this many rows per task (the first N)."""
    output: str | None = None
    """Results folder; default `<run>/eval/<time>/` for a run folder, else `evals/<time>/`."""
    data_dir: str | None = None
    """Local copies of the benchmark data (hellaswag/, truthfulqa/), for offline use."""
    split: str = "validation"
    """Dataset split for perplexity and generation tasks."""
    dataset: str | None = None
    """Rows for perplexity/generation tasks when the target is not a run folder (with `format`)."""
    format: str | None = None
    """Data format of `dataset` (samsum, alpaca, custom, ...)."""
    fields: dict[str, str] | None = None
    """Column mapping for format `custom`."""
    export_manual: int | None = Field(None, ge=1)
    """Also write this many held-out prompts with both models' outputs to manual.jsonl (the review app imports it)."""

    @model_validator(mode="after")
    def _dataset_with_format(self) -> EvalRunConfig:
        if (self.dataset is None) != (self.format is None):
            raise ValueError("dataset: --dataset and --format go together: --dataset SOURCE --format NAME")
        if self.format is not None and (unknown := unknown_format(self.format)) is not None:
            raise ValueError(f"format: {unknown}")
        return self


class KfoldConfig(_Section):
    """Settings of `tunelab kfold` (its --folds and --metric); the other commands ignore them."""

    folds: int = Field(5, ge=2)
    """Number of folds (K): the training data is cut into K parts, each validates one run."""
    metric: str = "loss"
    """The after-training metric that picks the best sweep point (loss, rouge_l, exact_match, ...)."""


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    peft: PeftConfig = PeftConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()
    preference: PreferenceConfig = PreferenceConfig()
    kfold: KfoldConfig = KfoldConfig()
    sweep: dict[str, Annotated[list, Field(min_length=1)]] | None = None
    """Hyperparameter grid for `tunelab kfold`, e.g. {peft.r: [8, 16], train.lr: [1e-4, 2e-4]}: every
    combination is cross-validated. `tunelab train` ignores it."""

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems = []
        problems += _data_problems(self.data)
        if self.quantization.bits and self.peft.method == "full":
            problems.append(
                "quantization.bits: a quantized base cannot be fully fine-tuned; use peft.method=lora (QLoRA) "
                "or set quantization.bits=null"
            )
        problems += _selection_problems(self.train)
        if self.train.activation_offload and not self.train.gradient_checkpointing:
            problems.append("train.activation_offload: offloads the hidden states that checkpointing keeps; "
                            "set train.gradient_checkpointing=true too")
        if (self.data.folds is None) != (self.data.fold is None):
            problems.append("data.fold: data.folds and data.fold are set together (or neither)")
        elif self.data.folds is not None and self.data.fold >= self.data.folds:
            problems.append(f"data.fold: got {self.data.fold}; must be below data.folds={self.data.folds}")
        problems += [f"sweep.{key}: {why}" for key in self.sweep or {} if (why := _sweep_key_problem(key))]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def method(self) -> str:
        """The name users know: full, lora, dora, qlora (4-bit base) or lora-8bit."""
        if self.peft.method == "full":
            return "full"
        if self.quantization.bits == 4:
            return "qdora" if self.peft.method == "dora" else "qlora"
        if self.quantization.bits == 8:
            return f"{self.peft.method}-8bit"
        return self.peft.method


def _selection_problems(t: TrainConfig) -> list[str]:
    """Mid-run evaluation settings that only work together (transformers would fail later, deep inside)."""
    problems = []
    for name, on in (("early_stopping", t.early_stopping), ("eval_generation", t.eval_generation),
                     ("load_best", t.load_best)):
        if on and not t.eval_every:
            problems.append(f"train.{name}: needs train.eval_every (validation every N steps)")
    gen = t.eval_generation
    if t.eval_every and gen and gen.every and gen.every % t.eval_every:
        problems.append(f"train.eval_generation.every: {gen.every} is not a multiple of train.eval_every={t.eval_every}")
    if t.select_on == "generation" and not gen:
        problems.append("train.select_on: `generation` needs train.eval_generation (e.g. {task: rouge_l})")
    elif t.select_on == "generation" and gen.every not in (None, t.eval_every):
        problems.append("train.select_on: selecting on generation needs a generation score at every validation; "
                        "leave train.eval_generation.every unset")
    selects = t.load_best or t.early_stopping
    if selects and t.eval_every and t.save_every and t.save_every % t.eval_every:
        problems.append(f"train.save_every: the best checkpoint is chosen at validations, so save_every "
                        f"({t.save_every}) must be a multiple of train.eval_every ({t.eval_every})")
    return problems


SET_BY_KFOLD = ("data.folds", "data.fold", "run.dir", "sweep", "kfold.folds", "kfold.metric")


def _sweep_key_problem(path: str) -> str | None:
    """Why `path` cannot be swept (not a declared key, or one kfold sets itself), or None."""
    if path in SET_BY_KFOLD:
        return f"set by tunelab kfold itself; cannot be swept (these are: {', '.join(SET_BY_KFOLD)})"
    section: Any = Config
    for part in path.split("."):
        if section is None or part not in section.model_fields:
            return "unknown key; a sweep key is a config path such as peft.r or train.lr"
        section = _section_type(section.model_fields[part].annotation)
    return None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (unwrapping `X | None`), or None for a plain value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` → (["a", "b"], value parsed as YAML, so 3 → int, true → bool, [1,2] → list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise TunelabError(f"override {text!r}: expected key.sub=value, e.g. train.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise TunelabError(f"override {text!r}: the value of {key.strip()} is not valid YAML ({problem}); "
                           "to pass it as text, quote it in YAML inside the shell's quotes: 'key=\"text\"'") from None
    return key.strip().split("."), value


def set_path(data: dict, path: list[str], value: Any) -> None:
    """data[a][b]... = value for path [a, b, ...], creating missing (or null) sections on the way."""
    node = data
    for part in path[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise TunelabError(f"{'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        set_path(data, *parse_override(text))
    return data


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The keys declared beside the last part of `loc` (a field path), as full paths."""
    section: Any = schema
    for part in loc[:-1]:
        field = section.model_fields.get(part) if isinstance(part, str) else None
        section = _section_type(field.annotation) if field else None
        if section is None:
            return []
    prefix = ".".join(map(str, loc[:-1]))
    return [f"{prefix}.{name}" if prefix else name for name in section.model_fields]


def _format_errors(err: ValidationError, origin: str, schema: type[BaseModel] = None) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            near = did_you_mean(field, _known_keys(schema, e["loc"])) if schema else ""
            msg = f"unknown key{near} (see recipes/ and the README for the keys)"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; allowed: {e['ctx']['expected']}"
        elif e["type"] == "value_error":
            msg = str(e["ctx"]["error"])
        else:
            msg = f"{e['msg']} (got {e['input']!r})"
        if field == "(top level)":  # the cross-field checks: one problem a line, each naming its field
            lines += [f"  - {problem}" for problem in msg.splitlines()]
        else:
            lines.append(f"  - {field}: {msg}")
    return "\n".join(lines)


def build_config(data: dict, origin: str = "config", schema: type[BaseModel] = Config):
    """Validate `data` against `schema` (a run's Config, or a command's own, e.g. EvalRunConfig)."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise TunelabError(_format_errors(err, origin, schema)) from None


def recipe_names() -> list[str]:
    """The recipes shipped in the package (`tunelab/recipes/*.yaml`), by name."""
    from importlib.resources import files

    return sorted(p.name.removesuffix(".yaml") for p in files("tunelab").joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))


def find_recipe(name: str | Path) -> Path:
    """A recipe file: the path itself when it exists, else the packaged recipe of that name
    (`samsum-lora` or `samsum-lora.yaml`), else an error that lists the near names."""
    path = Path(name)
    if path.is_file():
        return path
    from importlib.resources import as_file, files

    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and stem in recipe_names():
        with as_file(files("tunelab").joinpath("recipes", f"{stem}.yaml")) as packaged:
            return Path(packaged)
    raise TunelabError(f"recipe {name}: no such file or packaged recipe{did_you_mean(stem, recipe_names())} "
                       f"(packaged: {', '.join(recipe_names())})")


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a file that is not UTF-8 or not YAML is an error naming it (never a traceback)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TunelabError(f"{what} {path}: cannot read it ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise TunelabError(
            f"{what} {path}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}; the file is probably "
            f"Latin-1 or Windows-1252); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > new.yaml"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TunelabError(f"{what} {path}: not valid YAML: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a recipe (a file or a packaged recipe's name; None: defaults only), apply `a.b=c`
    overrides, validate everything."""
    data: dict = {}
    origin = "command line"
    if path is not None:
        path = find_recipe(path)
        data = read_yaml(path, "recipe") or {}
        if not isinstance(data, dict):
            raise TunelabError(f"recipe {path}: expected a mapping of sections (run, model, data, ...)")
        origin = str(path) + (" + overrides" if overrides else "")
    return build_config(apply_overrides(data, list(overrides)), origin)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
