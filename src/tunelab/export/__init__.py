"""`tunelab export RUN --format gguf|ollama|hf`: a trained model in the forms other tools load.

`hf` is the merged transformers folder (transformers, vLLM, TGI); `gguf` one file for llama.cpp
and LM Studio; `ollama` the GGUF plus a Modelfile (`ollama create NAME -f Modelfile`). A LoRA run
is merged into its base first (into a temporary folder for gguf/ollama); a full fine-tuning run's
model folder is converted as it is. Everything is checked before the merge starts, so a run
that cannot be exported fails in seconds, not after minutes of merging.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.export.gguf import DTYPES

FORMATS = ("gguf", "ollama", "hf")


def run(run: str | Path, format: str = "gguf", dtype: str | None = None, output: Path | None = None) -> Path:
    """Export `run` (a run folder, adapter folder or model folder); returns the GGUF file (gguf)
    or the folder written (ollama, hf). Default output: <run>/export/<format>/."""
    from tunelab.models.loading import resolve

    if format not in FORMATS:
        raise TunelabError(f"export --format: {format!r} is not one of {', '.join(FORMATS)}")
    allowed = ("f16", "bf16") if format == "hf" else DTYPES
    if dtype is not None and dtype not in allowed:
        raise TunelabError(f"export --dtype: {dtype!r} is not one of {', '.join(allowed)} for --format {format}")
    source = resolve(str(run))
    if source.adapter is None and not (Path(source.path) / "config.json").is_file():
        raise TunelabError(f"export: {run} is not a local run, adapter or model folder")
    folder = Path(run)
    name = folder.resolve().parent.name if folder.name in ("adapter", "model") else folder.resolve().name
    out = Path(output) if output else folder / "export" / format
    if format == "hf":
        return _export_hf(run, source, dtype, out)
    if format == "ollama":  # refuse an unknown chat template now, not after the merge
        from transformers import AutoTokenizer

        from tunelab.export.ollama import chat_format

        chat_format(AutoTokenizer.from_pretrained(source.adapter or source.path))
    dtype = dtype or "f16"
    with _merged(run, source, out) as model_dir:
        if format == "ollama":
            from tunelab.export.ollama import write_ollama

            return write_ollama(model_dir, out, dtype, name)
        from tunelab.export.gguf import write_gguf

        return write_gguf(model_dir, out / f"{name}-{dtype}.gguf", dtype, name)


def _export_hf(run, source, dtype: str | None, out: Path) -> Path:
    import torch

    from tunelab.models.build import merge_and_save

    if source.adapter is None:
        raise TunelabError(f"export --format hf: {source.path} is a full model folder already; load it as it is")
    options = {"dtype": {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]} if dtype else {}
    return merge_and_save(name=str(run), output=out, **options)


@contextmanager
def _merged(run, source, out: Path):
    """A model folder with any LoRA adapter folded in (a temporary one beside `out`, removed after)."""
    if source.adapter is None:
        yield Path(source.path)
        return
    from tunelab.models.build import merge_and_save

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".merged-") as tmp:
        yield merge_and_save(name=str(run), output=Path(tmp))
