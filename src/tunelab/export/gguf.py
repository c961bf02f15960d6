"""Write a merged Llama-architecture model folder as one GGUF file (llama.cpp, Ollama, LM Studio).

Follows llama.cpp's `convert_hf_to_gguf.py` for Llama, written small with the `gguf` package:
- tensors get llama.cpp's names from gguf's own name map; q/k rows are permuted from HF's
  rotate-half RoPE layout (each head: all real parts, then all imaginary parts) to GGML's
  interleaved pairs; 1-D tensors (norms) stay F32, 2-D ones become f16, bf16 or Q8_0 (a row
  that is not a multiple of Q8_0's 32-wide block stays f16, as llama.cpp does); a tied output
  layer is left out (llama.cpp then reuses token_embd, transformers re-ties it);
- the tokenizer is written from the training tokenizer itself: byte-level BPE (SmolLM2,
  Llama-3) as `gpt2` with its pre-tokenizer name and merges, SentencePiece-style BPE with byte
  fallback (Llama-2) as `llama` with scores that replay its merge order; ids beyond the
  tokenizer (embeddings rounded up) become unused `[PAD<id>]` entries;
- the chat template and the BOS, EOS, end-of-turn and pad ids go in the metadata, so the file
  prompts and stops the way training did.
Tensors are streamed one at a time, so memory stays at one tensor, not the whole model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

DTYPES = ("f16", "bf16", "q8_0")

# llama.cpp's name for a byte-level BPE pre-tokenizer, keyed by the tokenizer.json pre_tokenizer
# steps that define it (llama.cpp src/llama-vocab.cpp: "gpt-2", "smollm", "llama-bpe").
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
}


@dataclass
class _Tensor:
    name: str  # llama.cpp's
    shape: tuple[int, ...]
    qtype: int  # gguf.GGMLQuantizationType
    load: Callable  # () -> torch.Tensor in llama.cpp's layout


def write_gguf(model_dir: Path, out_file: Path, dtype: str = "f16", name: str | None = None) -> Path:
    """`model_dir` (config.json + safetensors + tokenizer) as a GGUF file at `out_file`."""
    import gguf
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    if dtype not in DTYPES:
        raise TunelabError(f"export --dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    config = AutoConfig.from_pretrained(model_dir)
    if config.architectures != ["LlamaForCausalLM"]:
        raise TunelabError(f"export: {model_dir} is a {config.architectures} model; GGUF export "
                           "supports the Llama architecture (LlamaForCausalLM) only")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".partial")  # a killed export leaves no file that looks whole
    with ExitStack() as files:
        tensors, n_vocab = _tensors(model_dir, config, dtype, files)
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_hparams(writer, config, n_vocab, dtype, name or model_dir.name)
        _add_tokenizer(writer, tokenizer, n_vocab)
        for t in tensors:
            nbytes = math.prod(gguf.quant_shape_to_byte_shape(t.shape, t.qtype))
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(gguf.quantize(t.load().float().numpy(), t.qtype))
        writer.close()
    tmp.replace(out_file)
    return out_file


def _tensor_type(shape: tuple[int, ...], dtype: str) -> int:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1:
        return Q.F32
    if dtype == "q8_0" and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.BF16 if dtype == "bf16" else Q.F16


def _rope_interleave(w, n_head: int):
    """(n_head * head_dim, in): per head [re_0..re_h/2, im_0..im_h/2] → [re_0, im_0, re_1, im_1, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise TunelabError(f"export: {model_dir} holds no model.safetensors (save the model with safetensors)")


def _tensors(model_dir: Path, config, dtype: str, files: ExitStack) -> tuple[list[_Tensor], int]:
    """Every tensor to write, in file order, with llama.cpp's name and layout; and the vocab size."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tensors, n_vocab = [], None
    for path in _safetensors_files(model_dir):
        f = files.enter_context(safe_open(path, framework="pt"))
        for hf_name in f.keys():
            if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise TunelabError(f"export: tensor {hf_name} in {path} has no llama.cpp name; "
                                   "only plain Llama models (no extra modules) export to GGUF")
            shape = tuple(f.get_slice(hf_name).get_shape())
            proj = hf_name.split(".")[-2]
            if proj in heads:
                load = lambda f=f, n=hf_name, h=heads[proj]: _rope_interleave(f.get_tensor(n), h)  # noqa: E731
            else:
                load = lambda f=f, n=hf_name: f.get_tensor(n)  # noqa: E731
            if name == "token_embd.weight":
                n_vocab = shape[0]
            tensors.append(_Tensor(name, shape, _tensor_type(shape, dtype), load))
    if (freqs := _rope_freqs(config)) is not None:
        tensors.append(_Tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", tuple(freqs.shape),
                               gguf.GGMLQuantizationType.F32, lambda: freqs))
    return tensors, n_vocab or config.vocab_size


def _rope(config) -> dict:
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise TunelabError(f"export: RoPE type {rope['rope_type']!r} has no GGUF equivalent here "
                           "(supported: default, linear, llama3)")
    return rope


def _rope_freqs(config):
    """llama3 RoPE: llama.cpp divides each frequency by a stored factor (the `rope_freqs` tensor)."""
    if _rope(config).get("rope_type") != "llama3":
        return None
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")  # (head_dim / 2,)
    dim = scaled.shape[0] * 2
    plain = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return plain / scaled


def _add_hparams(writer, config, n_vocab: int, dtype: str, name: str) -> None:
    import gguf

    rope = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer(backend: dict) -> str:
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    signature = tuple(
        (s.get("type"), {"ByteLevel": s.get("use_regex"), "Digits": s.get("individual_digits"),
                         "Split": (s.get("pattern") or {}).get("Regex")}.get(s.get("type")))
        for s in steps
    )
    if signature not in _PRE_TOKENIZERS:
        raise TunelabError(f"export: the tokenizer's pre-tokenizer {signature} is not one llama.cpp is known to "
                           f"reproduce ({', '.join(_PRE_TOKENIZERS.values())}); GGUF export supports those")
    return _PRE_TOKENIZERS[signature]


def _add_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    from tunelab.export.tokens import end_of_turn

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = backend["model"]
    if bpe["type"] != "BPE":
        raise TunelabError(f"export: the tokenizer is a {bpe['type']} model; GGUF export supports BPE tokenizers "
                           "(byte-level as in SmolLM2/Llama-3, or with byte fallback as in Llama-2)")
    spm = bool(bpe.get("byte_fallback"))  # Llama-2: sentencepiece pieces ("▁the", "<0x0A>")
    merges = _merges(bpe)
    tokens, types = _vocabulary(tokenizer, n_vocab, spm)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    if spm:
        writer.add_token_scores(_merge_scores(tokens, merges))
        writer.add_add_space_prefix(tokenizer.tokenize("a")[0].startswith("\u2581"))
        if (backend.get("pre_tokenizer") or {}).get("prepend_scheme") == "first":
            log.warning("export: this tokenizer puts no '\u2581' before text that follows a special token "
                        "(transformers' legacy=False); llama.cpp and Ollama do, so such text (e.g. '[INST]' after "
                        "'<s>') tokenizes one token differently there than in training")
    else:
        writer.add_tokenizer_pre(_pre_tokenizer(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    eot = end_of_turn(tokenizer)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id, "eot": tokenizer.convert_tokens_to_ids(eot) if eot else None}
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    plain = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and plain[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and plain[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _merges(bpe: dict) -> list[str]:
    """Merges as llama.cpp reads them, "left right" (tokenizers >= 0.20 stores [left, right] pairs)."""
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    if any(m.count(" ") != 1 for m in merges):
        raise TunelabError("export: the tokenizer has merges whose parts contain spaces; GGUF stores "
                           "merges as 'left right' and cannot hold them")
    return merges


def _vocabulary(tokenizer, n_vocab: int, spm: bool) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types for ids 0..n_vocab-1."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:  # embedding rows past the tokenizer (rounded-up vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if spm and token == tokenizer.unk_token:
            types.append(TokenType.UNKNOWN)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return tokens, types


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest: score each
    token by minus the rank of the first merge that makes it, so it replays the BPE merge order."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]
