"""What the trainer's tracker integrations (W&B, TensorBoard) do not do on their own.

They send the numbers the trainer logs while it trains. A run's results come after training:
`send_results` gives both trackers the before/after table and the sample generations at the end
of the lifecycle, and `tensorboard_dir` keeps TensorBoard's files in the run folder
(`<run>/tensorboard/`, said at the start) instead of transformers' `checkpoints/runs/<date>/`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tunelab.tracking.stat_tables import format_before_after

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("prompt", "reference", "before", "after")


def tensorboard_dir(run_dir: Path, report_to: list[str]) -> Path | None:
    """`<run>/tensorboard/` when the run reports to TensorBoard (else None), said on the terminal.
    transformers' TensorBoardCallback reads TENSORBOARD_LOGGING_DIR when the trainer is built."""
    if "tensorboard" not in report_to:
        return None
    folder = run_dir / "tensorboard"
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)
    log.info("TensorBoard: %s  (view with: tensorboard --logdir %s)", folder, folder)
    return folder


def send_results(before: dict, after: dict, samples: list[dict], step: int, tensorboard: Path | None) -> None:
    """The before/after metrics and the sample generations ({prompt, reference, before, after})
    to the W&B run (if one is active) and to TensorBoard (if `tensorboard` is its folder)."""
    _to_wandb(before, after, samples)
    if tensorboard is not None:
        _to_tensorboard(tensorboard, before, after, samples, step)


def _change(before: dict, after: dict, metric: str) -> float | None:
    b, a = before.get(metric), after.get(metric)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return a - b if numbers else None


def _to_wandb(before: dict, after: dict, samples: list[dict]) -> None:
    wandb = sys.modules.get("wandb")  # imported by transformers' WandbCallback when the run uses W&B
    if wandb is None or wandb.run is None:
        return
    metrics = list(dict.fromkeys([*before, *after]))
    wandb.run.summary.update({f"{side}/{metric}": values[metric] for side, values in (("before", before), ("after", after))
                              for metric in values})
    table = wandb.Table(columns=["metric", "before", "after", "change"],
                        data=[[m, before.get(m), after.get(m), _change(before, after, m)] for m in metrics])
    rows = wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[s.get(c) for c in SAMPLE_COLUMNS] for s in samples])
    wandb.log({"results/before_after": table, "results/samples": rows})


def _to_tensorboard(folder: Path, before: dict, after: dict, samples: list[dict], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(folder)) as writer:  # a file of its own beside the trainer's
        writer.add_text("results/before_after", _code(format_before_after({"before": before, "after": after})), step)
        writer.add_text("results/samples", "\n\n".join(_sample_markdown(i, s) for i, s in enumerate(samples, 1))
                        or "no samples (eval.generation_samples=0)", step)


def _code(text: str) -> str:
    """Text as a Markdown code block (TensorBoard renders Markdown), fenced longer than any run of
    backticks inside it."""
    fence = "`" * max(3, max((len(run) for run in text.split() if set(run) == {"`"}), default=0) + 1)
    return f"{fence}\n{text}\n{fence}"


def _sample_markdown(number: int, sample: dict) -> str:
    return f"#### sample {number}\n\n" + "\n\n".join(f"**{c}**\n\n{_code(str(sample.get(c) or ''))}"
                                                    for c in SAMPLE_COLUMNS)
