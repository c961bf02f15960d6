"""`tunelab data inspect | prepare RECIPE`: a recipe's data as training will see it, with the
tokenizer only (no model weights, no GPU).

`inspect` runs the same preparation as `tunelab train` (`data/prepare.tokenized`, cached, so a
later run reuses it) and shows the result (`data/inspect.py`); `prepare` builds and caches the
batched rows ahead of a GPU job.
"""

from __future__ import annotations

from tunelab.config import Config


def _tokenizer(cfg: Config):
    """(tokenizer, where its model is, how its chat template was chosen)."""
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import DEFAULT_CHAT_TEMPLATE, resolve

    source = resolve(cfg.model.name)
    tokenizer = load_tokenizer(source, cfg.model.chat_template)
    if cfg.model.chat_template:
        template = f"model.chat_template={cfg.model.chat_template}"
    elif tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE:
        template = "tunelab's default (### User / ### Assistant): the model has none; see model.chat_template"
    else:
        template = f"the one saved with {source.adapter}" if source.adapter else "the model's own"
    return tokenizer, source, template


def counts(stats: dict) -> list[tuple[str, str]]:
    """The data stats as (what, how many) lines, a mixture's sources each on their own."""
    rows = [("source", str(stats["source"])), ("format", str(stats["format"])), ("train_on", stats["train_on"])]
    sources = stats.get("sources") or {"": stats}
    for name, s in sources.items():
        at = f"{name}: " if name else ""
        drawn = (f"{s['train_samples']:,} drawn of {s['available_train_samples']:,}"
                 + (f" ({s['repeated']:,} repeats)" if s["repeated"] else "")) if name else f"{s['train_samples']:,}"
        rows.append((f"{at}train samples", drawn))
        rows.append((f"{at}validation / test samples", f"{s['eval_samples']:,} / {s['test_samples']:,}"))
        rows.append((f"{at}dropped", f"{s['dropped']:,} (malformed rows {s['bad_rows']:,}, over max_length "
                                     f"{s['overlong']:,}, no loss tokens {s['no_loss']:,}; prompts shortened "
                                     f"{s['truncated']:,})"))
        if name:
            rows.append((f"{at}share of training tokens", f"{s['token_share']:.1%} (weight {s['weight']:g} → "
                                                          f"{s['target_share']:.1%}; of loss tokens "
                                                          f"{s['loss_token_share']:.1%})"))
    if "mix" in stats:
        rows.append(("mixture", f"data.mix={stats['mix']}, drawn once per run (seeded)"))
    loss = stats["train_loss_tokens"] / stats["train_tokens"] if stats["train_tokens"] else 0
    rows.append(("training tokens", f"{stats['train_tokens']:,} ({stats['train_loss_tokens']:,} with loss, {loss:.1%})"))
    dup = {k: v for k, v in stats["duplicates"].items() if v}
    rows.append(("exact duplicates", ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in dup.items()) or "none"))
    if stats.get("train_rows") is not None:
        rows.append(("batched rows", f"{stats['train_rows']:,}" + (f", packing efficiency {stats['packing_efficiency']:.1%}"
                                                                   if stats.get("packing_efficiency") else "")))
    return rows


def inspect(cfg: Config, n: int = 3, recipe: str = ""):
    """The `Inspection` of the first `n` training samples (of each source, for a mixture)."""
    from tunelab.data import inspect as look
    from tunelab.data.prepare import column, tokenized

    tokenizer, source, template = _tokenizer(cfg)
    data = cfg.data
    samples = tokenized(data, tokenizer, cfg.run.seed)
    names = [name for part, (start, stop) in zip(samples.parts, samples.bounds) for name in [part.name] * (stop - start)]
    shown, checked = [], []
    for part, (start, stop) in zip(samples.parts, samples.bounds):
        rows = samples.train.select(range(start, min(stop, start + look.CHECKED)))
        messages = column(part.train_examples.select(column(rows, "index")), "messages")
        for k, (row, turns) in enumerate(zip(rows, messages)):
            sample = look.shown(tokenizer, part.name, start + k, row)
            checked.append((sample, turns))
            if k < n:
                shown.append(sample)
    lengths = column(samples.train, "length") if len(samples.train) else []
    stats = dict(samples.stats)
    if data.batching == "packing" and lengths:
        _row, layout, packed_rows = look.packed_layout(lengths, names, data.max_length)
        stats.update(train_rows=packed_rows, packing_efficiency=sum(lengths) / (packed_rows * data.max_length))
    else:
        layout = [f"padding: one sample per row, right-padded with {tokenizer.pad_token} to the longest of its batch "
                  f"(train.batch_size={cfg.train.batch_size}, grouped by length); the pad carries no loss"]
    total = sum(len(p.train_examples) + len(p.eval_examples) for p in samples.parts)
    checks = [look.no_loss_check(stats["no_loss"], total, data.train_on)]
    if lengths:
        checks += look.text_checks(checked, data.train_on)
        checks += [look.pad_check(samples.train, tokenizer),
                   look.eos_check(samples.train, look.stop_tokens(tokenizer, source.path))]
    else:
        checks.append(look.Check("training samples", False, "none left after filtering: see the checks above"))
    header = [
        f"tunelab data inspect {recipe}".rstrip(),
        f"model {cfg.model.name} (tokenizer only) · chat template: {template}",
        f"data.train_on={data.train_on} · data.batching={data.batching} · data.max_length={data.max_length} · "
        f"{len(samples.train):,} training samples",
    ]
    return look.Inspection(header, shown, layout, counts(stats), look.histogram(lengths, data.max_length), checks)


def prepare(cfg: Config) -> dict:
    """Build (and cache) the rows `tunelab train` will use; returns the data stats."""
    from tunelab.data.prepare import prepare as prepare_rows

    tokenizer, _source, _template = _tokenizer(cfg)
    return prepare_rows(cfg.data, tokenizer, cfg.run.seed).stats
