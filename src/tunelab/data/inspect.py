"""What the model trains on, shown: samples with their loss tokens marked, one packed row's layout,
counts, a length histogram, and loud checks for the silent failures of response-only training.

Everything here reads the *prepared* samples (`prepare.tokenized`): the token ids and labels that
training uses, never a re-rendering of them, so what is marked is exactly what carries the loss.
The checks (each fires on a constructed case in tests/test_inspect.py):

- no loss tokens: samples dropped because no token carried the loss;
- loss on the prompt: a user, system or tool turn's text inside the loss;
- assistant markers: an assistant turn rendered without any marker before it, or not at all;
- pad token in the data: the pad id inside a sample (it would be taken for padding);
- no stop token: a sample whose loss ends without the EOS, so the model never learns to stop.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.batching import best_fit_decreasing
from tunelab.data.templates import IGNORE_INDEX

CHECKED = 200  # samples per source that the text checks read (the token checks read all)
PROMPT_ROLES = ("system", "user", "tool")
LOSS_ON, LOSS_OFF = "\x1b[1;32m", "\x1b[0m"  # bold green for the loss tokens in a terminal
PLAIN_OPEN, PLAIN_CLOSE = "⟦", "⟧"  # around the loss tokens without colours
ELIDE = 1500  # a prompt piece longer than this many characters is shortened in the terminal


@dataclass
class Segment:
    """Consecutive tokens [start, stop) of one sample that all carry the loss, or all do not."""

    start: int
    stop: int
    loss: bool
    text: str


@dataclass
class Shown:
    """One training sample as trained."""

    source: str
    row: int  # position in the training samples
    index: int  # its row in the source's training examples
    input_ids: list[int]
    labels: list[int]
    segments: list[Segment]

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Inspection:
    header: list[str]
    samples: list[Shown]
    layout: list[str]
    counts: list[tuple[str, str]]
    histogram: list[tuple[int, int, int]]  # (from, to, samples)
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def segments(tokenizer, ids: list[int], labels: list[int]) -> list[Segment]:
    """The sample cut where the loss starts or stops, each piece decoded as a whole (decoding token
    by token would break multi-byte characters)."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            out.append(Segment(start, i, labels[start] != IGNORE_INDEX, tokenizer.decode(ids[start:i])))
            start = i
    return out


def shown(tokenizer, source: str, row: int, sample: dict) -> Shown:
    return Shown(source, row, sample["index"], sample["input_ids"], sample["labels"],
                 segments(tokenizer, sample["input_ids"], sample["labels"]))


# ---- checks ----


def loss_mask(segs: list[Segment]) -> tuple[str, list[bool]]:
    """The decoded text and, per character, whether it carries the loss."""
    text = "".join(s.text for s in segs)
    return text, [s.loss for s in segs for _ in s.text]


def prompt_in_loss(segs: list[Segment], messages: list[dict]) -> str | None:
    """The first user/system/tool turn whose text (anywhere it occurs: a template may repeat it)
    lies mostly inside the loss, or None."""
    text, mask = loss_mask(segs)
    for m in messages:
        content = (m.get("content") or "").strip()
        if m["role"] not in PROMPT_ROLES or len(content) < 12:
            continue
        at = text.find(content)
        while at >= 0:
            if sum(mask[at:at + len(content)]) > len(content) / 2:
                return f"{m['role']} turn {content[:40]!r}…"
            at = text.find(content, at + 1)
    return None


def marker_problem(segs: list[Segment], messages: list[dict]) -> str | None:
    """An assistant turn whose text the rendering lacks, or that follows the turn before it with
    nothing but whitespace (no header tells the model that its answer starts)."""
    text, _ = loss_mask(segs)
    cursor = 0
    for i, m in enumerate(messages):
        content = (m.get("content") or "").strip()
        if not content:
            continue
        at = text.find(content, cursor)
        if at < 0:
            if m["role"] == "assistant":
                return f"assistant turn {i + 1} ({content[:30]!r}…) is not in the rendered text"
            continue
        if m["role"] == "assistant" and not text[cursor:at].strip() and i > 0:
            return f"assistant turn {i + 1} follows the turn before with no marker ({text[cursor:at]!r})"
        cursor = at + len(content)
    return None


def text_checks(samples: list[tuple[Shown, list[dict]]], train_on: str) -> list[Check]:
    prompt = [(s, found) for s, messages in samples if (found := prompt_in_loss(s.segments, messages))]
    markers = [(s, found) for s, messages in samples if (found := marker_problem(s.segments, messages))]
    n = len(samples)
    checks = []
    if train_on == "all":
        checks.append(Check("loss on the prompt", True, "by choice: data.train_on=all trains on every token"))
    else:
        checks.append(Check("loss on the prompt", not prompt, f"none in {n} samples checked" if not prompt else
                            f"{len(prompt)} of {n} samples checked carry the loss on prompt text, e.g. train row "
                            f"{prompt[0][0].row}: {prompt[0][1]}. The chat template renders turns so that the "
                            "assistant spans cover the prompt; try model.chat_template"))
    checks.append(Check("assistant markers", not markers, f"every assistant turn found after a marker ({n} samples "
                        "checked)" if not markers else f"{len(markers)} of {n} samples checked: e.g. train row "
                        f"{markers[0][0].row}: {markers[0][1]}. The chat template marks no assistant turn; "
                        "set model.chat_template (chatml, llama-3, ...)"))
    return checks


def _per_row(rows, column: str):
    """(values, row of each value) of a list column over all rows, as numpy arrays."""
    import numpy as np
    import pyarrow.compute as pc

    lists = rows.with_format("arrow")[:][column].combine_chunks()
    return pc.list_flatten(lists).to_numpy(zero_copy_only=False), np.asarray(pc.list_parent_indices(lists))


def pad_check(rows, tokenizer) -> Check:
    """The pad id inside samples: the collator pads with it, so such a token reads as padding."""
    import numpy as np

    ids, parent = _per_row(rows, "input_ids")
    hit = np.unique(parent[ids == tokenizer.pad_token_id])
    name = f"{tokenizer.pad_token} (id {tokenizer.pad_token_id})"
    if not len(hit):
        return Check("pad token", True, f"{name} occurs in no sample")
    return Check("pad token", False, f"{name} occurs in {len(hit)} samples, e.g. train row {int(hit[0])}: the data "
                                     "holds the pad token's text; remove it from the data")


def eos_check(rows, stops: dict[int, str], last: int = 4) -> Check:
    """Every sample's last few loss tokens hold a stop token (else the model never learns to stop)."""
    import numpy as np

    labels, parent = _per_row(rows, "labels")
    keep = labels != IGNORE_INDEX
    labels, parent = labels[keep], parent[keep]
    ends = np.r_[np.nonzero(np.diff(parent))[0], len(parent) - 1] if len(parent) else np.array([], dtype=int)
    found = np.zeros(len(ends), dtype=bool)
    for back in range(last):
        at = ends - back
        valid = (at >= 0) & (parent[np.maximum(at, 0)] == parent[ends])
        found |= valid & np.isin(labels[np.maximum(at, 0)], list(stops))
    missing = parent[ends[~found]]
    names = ", ".join(sorted(set(stops.values())))
    if not len(missing):
        return Check("stop token", True, f"every sample's loss ends with a stop token ({names})")
    return Check("stop token", False, f"{len(missing)} of {len(ends)} samples' loss ends without a stop token ({names}), "
                                      f"e.g. train row {int(missing[0])}: the model would not learn to stop. The chat "
                                      "template ends answers without the EOS; set model.chat_template")


def no_loss_check(dropped: int, total: int, train_on: str) -> Check:
    if not dropped:
        return Check("no loss tokens", True, "every sample has loss tokens")
    return Check("no loss tokens", False, f"{dropped} of {total} samples had no loss tokens under data.train_on="
                                          f"{train_on} and were dropped (an empty answer, or a template whose "
                                          "assistant turns render as nothing)")


def stop_tokens(tokenizer, model_path: str | None) -> dict[int, str]:
    """Ids inference stops on: the tokenizer's EOS and the model's generation_config.json eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = Path(model_path or "") / "generation_config.json"
    if model_path and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return {i: tokenizer.convert_ids_to_tokens(i) for i in ids}


# ---- layout, histogram ----


def packed_layout(lengths: list[int], sources: list[str], max_length: int) -> tuple[int, list[str], int]:
    """(row, its layout, the number of rows): the middle one of the packed rows as training builds
    them (best-fit decreasing over all samples, as `batching.pack_batch` does; the first rows hold
    the longest samples, often one each)."""
    bins = best_fit_decreasing(lengths, max_length)
    row = len(bins) // 2
    members = bins[row]
    used = sum(lengths[i] for i in members)
    lines = [f"packed row {row:,} of {len(bins):,}: {len(members)} sample{'s' if len(members) > 1 else ''}, "
             f"{used:,} of {max_length:,} tokens (positions restart at 0 for each; none attends to another)"]
    offset = 0
    for i in members:
        lines.append(f"  tokens {offset:>5}–{offset + lengths[i] - 1:<5} train row {i:<6} {sources[i]:<12} "
                     f"{lengths[i]:>5} tokens, positions 0–{lengths[i] - 1}")
        offset += lengths[i]
    if used < max_length:
        lines.append(f"  ({max_length - used:,} tokens free: the row is {used:,} long, a batch pads its rows to the "
                     "longest with the pad token, no loss)")
    return row, lines, len(bins)


def histogram(lengths: list[int], max_length: int, bins: int = 10) -> list[tuple[int, int, int]]:
    width = -(-max_length // bins)
    counts = [0] * bins
    for n in lengths:
        counts[min((n - 1) // width, bins - 1)] += 1
    return [(k * width + 1, min((k + 1) * width, max_length), c) for k, c in enumerate(counts)]


# ---- output ----


def _elided(text: str) -> str:
    if len(text) <= ELIDE:
        return text
    return f"{text[:600]}\n  … [{len(text) - 1200:,} characters] …\n{text[-600:]}"


def terminal(report: Inspection, color: bool, ids: bool = False) -> str:
    """The inspection as terminal text: loss tokens in green, or between ⟦ ⟧ without colours."""
    on, off = (LOSS_ON, LOSS_OFF) if color else (PLAIN_OPEN, PLAIN_CLOSE)
    out = [*report.header, f"loss tokens: {on}like this{off}", ""]
    for s in report.samples:
        out.append(f"── {s.source} · train row {s.row} (example {s.index}) · {len(s.input_ids)} tokens, "
                   f"{s.loss_tokens} with loss ──")
        out.append("".join(f"{on}{seg.text}{off}" if seg.loss else _elided(seg.text) for seg in s.segments))
        if ids:
            out.append(f"input_ids: {s.input_ids}")
            out.append(f"labels:    {s.labels}")
        out.append("")
    out += ["── packing ──", *report.layout, "", "── counts ──"]
    width = max(len(k) for k, _ in report.counts)
    out += [f"  {k:<{width}}  {v}" for k, v in report.counts]
    out += ["", "── sample lengths (training samples, tokens) ──"]
    top = max((c for *_, c in report.histogram), default=0) or 1
    out += [f"  {lo:>6}–{hi:<6} {'█' * round(40 * c / top):<40} {c:,}" for lo, hi, c in report.histogram]
    out += ["", "── checks ──"]
    for c in report.checks:
        mark = ("ok  " if c.ok else "FAIL") if not color else ("\x1b[32mok  \x1b[0m" if c.ok else "\x1b[1;31mFAIL\x1b[0m")
        out.append(f"  {mark} {c.name}: {c.detail}")
    return "\n".join(out)


_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#222}
pre{white-space:pre-wrap;background:#f6f6f4;padding:.8rem;border-radius:6px;font:13px/1.4 ui-monospace,monospace}
.loss{background:#c8f0c8;color:#064}.prompt{color:#555}table{border-collapse:collapse}
td,th{padding:.15rem .6rem;text-align:left;border-bottom:1px solid #eee}.bar{background:#6a6;height:.8rem}
.ok{color:#070}.fail{color:#b00;font-weight:bold}.ids{font-size:12px;color:#555;word-break:break-all}"""


def page(report: Inspection, ids: bool = False) -> str:
    """The inspection as one self-contained HTML page. Each piece of a sample is a span whose
    `data-tokens="a-b"` names its token positions, class `loss` when they carry the loss."""
    e = html.escape
    parts = [f"<h1>tunelab data inspect</h1><pre>{e(chr(10).join(report.header))}</pre>",
             '<p>Loss tokens are <span class="loss">marked</span>; hover a piece for its token positions.</p>']
    for s in report.samples:
        spans = "".join(f'<span class="{"loss" if seg.loss else "prompt"}" data-tokens="{seg.start}-{seg.stop}" '
                        f'title="tokens {seg.start}–{seg.stop - 1}">{e(seg.text)}</span>' for seg in s.segments)
        parts.append(f"<h2>{e(s.source)} · train row {s.row} (example {s.index}) · {len(s.input_ids)} tokens, "
                     f"{s.loss_tokens} with loss</h2><pre>{spans}</pre>")
        if ids:
            parts.append(f'<p class="ids">input_ids: {s.input_ids}<br>labels: {s.labels}</p>')
    parts.append(f"<h2>Packing</h2><pre>{e(chr(10).join(report.layout))}</pre>")
    parts.append("<h2>Counts</h2><table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in report.counts)
                 + "</table>")
    top = max((c for *_, c in report.histogram), default=0) or 1
    parts.append("<h2>Sample lengths</h2><table>" + "".join(
        f'<tr><th>{lo}–{hi}</th><td><div class="bar" style="width:{30 * c / top:.1f}rem"></div></td><td>{c:,}</td></tr>'
        for lo, hi, c in report.histogram) + "</table>")
    parts.append("<h2>Checks</h2><ul>" + "".join(
        f'<li class="{"ok" if c.ok else "fail"}">{"ok" if c.ok else "FAIL"} {e(c.name)}: {e(c.detail)}</li>'
        for c in report.checks) + "</ul>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>tunelab data inspect</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
