"""Weights & Biases wiring for transformers' built-in WandbCallback.

The callback is configured only through environment variables, so this module sets them.
Without an API key it switches W&B to offline mode, so a run never stops at a login prompt
or fails for lack of network: the data lands in run_dir/wandb/ and can be uploaded later.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)

_DEFAULT_HOST = "https://api.wandb.ai"


def _has_api_key() -> bool:
    """True if W&B would find a key: WANDB_API_KEY, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", _DEFAULT_HOST)).netloc
    netrc_path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(netrc_path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def finish_wandb() -> None:
    """Finish the active W&B run and reset wandb's process state, if wandb was used.

    transformers' WandbCallback never finishes its run: a later Trainer in the same process
    would keep logging into it, and wandb ignores env changes once set up. Call this after
    training; it is a no-op when wandb was never imported.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.finish()
        wandb.teardown()


def wandb_report_to(
    enabled: bool, project: str, run_name: str, run_dir: Path, extra: list[str]
) -> list[str]:
    """The `report_to` list for TrainingArguments: `extra` deduplicated, "wandb" last if used.

    W&B is used when `enabled` or when `extra` names "wandb" (both mean the user asked for
    it, and either way it needs the env setup below): the run gets `project`/`run_name`,
    lands in run_dir/wandb/, and is offline unless an API key exists or WANDB_MODE is set.
    """
    report_to = [r for r in dict.fromkeys(extra) if r not in ("wandb", "none")]
    missing = [r for r in report_to if importlib.util.find_spec(r) is None]
    if missing:  # transformers would fail later, after the model has loaded
        raise TunelabError(f"tracking.report_to: {', '.join(missing)} is not installed; pip install {' '.join(missing)}")
    if not (enabled or "wandb" in extra):
        return report_to
    finish_wandb()  # a stale run or settings from an earlier run in this process
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(WANDB_PROJECT=project, WANDB_NAME=run_name, WANDB_DIR=str(run_dir))
    # Quiet drops the banner and run summary; unlike WANDB_SILENT it still prints errors.
    os.environ.setdefault("WANDB_QUIET", "true")
    if "WANDB_MODE" not in os.environ and not _has_api_key():
        os.environ["WANDB_MODE"] = "offline"
    if os.environ.get("WANDB_MODE") == "offline":
        logger.info(
            "W&B is offline (no API key found, or WANDB_MODE=offline): logging to %s. "
            "Upload later with `wandb sync %s` (after `wandb login`).",
            run_dir / "wandb",
            run_dir / "wandb" / "offline-run-*",
        )
    return [*report_to, "wandb"]
