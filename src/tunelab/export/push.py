"""`tunelab push RUN REPO_ID [--private] [--dry-run]`: a run's model, its exports and a model card
to the Hugging Face Hub, through `huggingface_hub.upload_folder`.

What goes up: the adapter (or the full model) at the repo root so peft/transformers load the repo
id directly; the GGUF and Modelfile from `tunelab export`, if the run has them; the run's
config.yaml, summary.json and data_stats.json under `tunelab/` (the card is generated from them);
and the card as README.md. Checkpoints, logs and samples stay home. The files are hard-linked
into a staging folder inside the run (same disk: no copy of a multi-GB GGUF) and uploaded as one
commit. `--dry-run` builds the same plan and uploads nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

_PROVENANCE = ("config.yaml", "summary.json", "data_stats.json")


@dataclass
class PushPlan:
    repo_id: str
    files: dict[str, Path]  # path in the repo -> local file; README.md (the card) comes on top
    card: str
    private: bool = False
    url: str | None = None  # set once uploaded

    @property
    def repo_files(self) -> list[str]:
        return [*self.files, "README.md"]

    def describe(self) -> str:
        """The file list with sizes, then the card: what --dry-run prints."""
        rows = [f"{_size(local):>10}  {path}" for path, local in self.files.items()]
        head = f"{'private' if self.private else 'public'} model repo {self.repo_id}: {len(self.repo_files)} files"
        return "\n".join([head, *rows, f"{'(card)':>10}  README.md", "", self.card])


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _files(run_dir: Path) -> dict[str, Path]:
    """Repo path -> local file: weights, exports, provenance."""
    weights = run_dir / "adapter" if (run_dir / "adapter" / "adapter_config.json").is_file() else run_dir / "model"
    if not (weights / "adapter_config.json").is_file() and not (weights / "config.json").is_file():
        raise TunelabError(f"push: {run_dir} is not a finished run folder (no adapter/ or model/ inside)")
    files = {p.name: p for p in sorted(weights.iterdir()) if p.is_file() and p.name != "README.md"}
    ollama, gguf = run_dir / "export" / "ollama", run_dir / "export" / "gguf"
    for p in [*sorted(ollama.glob("*.gguf")), *(ollama / "Modelfile",), *sorted(gguf.glob("*.gguf"))]:
        if p.is_file():
            files.setdefault(p.name, p)  # a GGUF in both folders goes up once
    files.update({f"tunelab/{name}": run_dir / name for name in _PROVENANCE if (run_dir / name).is_file()})
    return files


def plan(run: str | Path, repo_id: str, private: bool = False) -> PushPlan:
    from tunelab.export.card import model_card

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise TunelabError(f"push: REPO_ID {repo_id!r} is not of the form owner/name")
    run_dir = Path(run)
    files = _files(run_dir)
    return PushPlan(repo_id, files, model_card(run_dir, repo_id, [*files, "README.md"]), private)


def stage(push: PushPlan, folder: Path) -> None:
    """Lay the plan out in `folder` as the repo will hold it (hard links where the disk allows)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(push.card)
    for path, local in push.files.items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(local, target)
        except OSError:  # another filesystem
            shutil.copy2(local, target)


def run(run: str | Path, repo_id: str, private: bool = False, dry_run: bool = False) -> PushPlan:
    """Upload the run as `repo_id` (created if missing); with dry_run, only return the plan."""
    push = plan(run, repo_id, private)
    if dry_run:
        return push
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(dir=run, prefix=".push-") as tmp:
        stage(push, Path(tmp))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                     commit_message=f"tunelab push of {Path(run).name}")
        except Exception as err:  # network, token, permissions: all the user's to fix; say what failed
            raise TunelabError(f"push: uploading to {repo_id} failed: {err} (log in with `hf auth login` or set "
                               "HF_TOKEN; check the network)") from None
    push.url = getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}"
    return push
