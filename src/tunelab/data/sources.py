"""Load `data.source` (a local file or folder, or a Hub dataset id) into validated chat examples.

Every row is checked against its data format *before* Hugging Face `datasets` reads the files, so a bad
row is reported as `file:line: field 'x' …` instead of a pyarrow stack trace deep inside
`load_dataset`. The raw files are then still read by `load_dataset` and converted with
`Dataset.map`, so the result is Arrow on disk and the next run with the same files reuses it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from tunelab.data import synthetic
from tunelab.data.formats import Format
from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""Data file extensions and the `datasets` packaged builder that reads each."""
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
"""A file's split is the word its name starts with (`train-00000.parquet`, `val.jsonl`), so that
`values.jsonl` or `trainer_log.jsonl` are not mistaken for a split."""
MAX_LISTED = 10
FIX = "fix the rows or set data.bad_rows=skip to drop them (the count is reported)"
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _allowed() -> str:
    return " ".join(BUILDERS)


SHARD = re.compile(r"[-_.]?\d+([-_]of[-_]\d+)?")
"""What may follow the split word in the name of one of several files of a split: a shard number
(`train-00000-of-00002.parquet`, `train_1.jsonl`). Other pairs (`train.jsonl`, `train_copy.jsonl`)
are refused: most often the second is a copy, and its rows would be trained on twice."""


def listed_splits(folder: Path, splits: dict[str, list[str]]) -> dict[str, list[Path]]:
    """data.splits: the files the user named for each split (relative to the source folder)."""
    found = {}
    for split, names in splits.items():
        files = [(folder / name).expanduser().resolve() for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TunelabError(f"data.splits.{split}: no such file: {', '.join(missing)}")
        found[split] = files
    return found


def find_splits(source: str, splits: dict[str, list[str]] | None = None) -> dict[str, list[Path]] | None:
    """Data files by split for a local file or folder (or as data.splits lists them); None when
    `source` is no local path."""
    path = Path(source).expanduser()
    if not path.exists():
        return None
    if splits:
        if not path.is_dir():
            raise TunelabError(f"data.splits: names files in the data.source folder, but {path} is not a folder")
        return listed_splits(path, splits)
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise TunelabError(f"data.source: {path} is not a data file; use one of {_allowed()}")
        return {"train": [path.resolve()]}
    files = sorted(p.resolve() for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise TunelabError(f"data.source: folder {path} holds no data files ({_allowed()})")
    split_of = {f: SPLIT_WORDS.get(re.match(r"[a-z]*", f.name.lower()).group()) for f in files}
    unknown = [f.name for f, split in split_of.items() if split is None]
    if len(unknown) == len(files):
        return {"train": files}
    if unknown:
        raise TunelabError(
            f"data.source: folder {path}: cannot tell the split of {', '.join(unknown)}; "
            f"start each file name with train, validation (val, valid, dev) or test"
        )
    found = {split: [f for f in files if split_of[f] == split] for split in ("train", "validation", "test")}
    for split, claim in found.items():
        words = [re.match(r"[a-z]*", f.name.lower()).group() for f in claim]
        if len(claim) > 1 and not all(SHARD.fullmatch(f.stem.lower()[len(w):]) for f, w in zip(claim, words)):
            names = ", ".join(f.name for f in claim)
            raise TunelabError(
                f"data.source: folder {path}: {len(claim)} files claim the {split} split ({names}), and they are not "
                f"numbered shards; remove the extra one (a copy is trained on twice), or list the files to use "
                f"together: data.splits={{{split}: [{names}]}}"
            )
    return {split: files for split, files in found.items() if files}


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(position, row, error) for each row of a data file; exactly one of row and error is None.

    The position is the 1-based line (.jsonl, JSON-lines .json, .csv: the record's first line) or
    the 1-based item/row (JSON array .json, .parquet). Rows that cannot be parsed come with an error
    instead of stopping the scan, so every bad row of a file is reported at once.
    """
    path = Path(path)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if path.suffix.lower() not in readers:
        raise TunelabError(f"{path}: unsupported file type; use one of {_allowed()}")
    return readers[path.suffix.lower()](path)


def _object(value: object) -> tuple[dict | None, str | None]:
    if isinstance(value, dict):
        return value, None
    return None, f"not valid JSON: expected an object {{...}}, got {type(value).__name__}"


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    with open(path, "rb") as f:  # bytes: json detects the encoding, so a bad byte is one bad row
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip())
            except json.JSONDecodeError as e:
                yield number, None, f"not valid JSON: {e.msg} at column {e.colno}"
            except ValueError as e:
                yield number, None, f"not valid JSON: {e}"
            else:
                yield number, *_object(value)


def _json_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    with open(path, "rb") as f:
        if f.read(1 << 10).removeprefix(b"\xef\xbb\xbf").lstrip()[:1] != b"[":
            yield from _jsonl_rows(path)
            return
    try:
        items = json.loads(path.read_bytes())
    except ValueError as e:
        yield getattr(e, "lineno", 1), None, f"not valid JSON: {e}"
        return
    for number, item in enumerate(items, start=1):
        yield number, *_object(item)


def _csv_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long articles exceed the 128 KiB default
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                # line_num is the record's last line; quoted newlines tell how many lines it spans
                first = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
                if None in row:
                    yield first, None, f"has more values than the header's {len(reader.fieldnames)} columns"
                else:
                    yield first, row, None
        except (csv.Error, UnicodeDecodeError) as e:
            raise TunelabError(f"{path}:{reader.line_num}: not readable as UTF-8 CSV ({e})") from e


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except (pa.ArrowException, OSError) as e:
        raise TunelabError(f"{path}: not a readable parquet file ({e})") from e
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield number, row, None


@dataclass
class _Scan:
    """What the validation pass found in one split: row count and the indices of bad rows."""

    total: int = 0
    bad: list[int] = field(default_factory=list)
    unparsed: bool = False  # some rows are not even JSON: load_dataset cannot read these files
    columns: list[str] = field(default_factory=list)  # of the first row, for the CSV reader


@dataclass
class _Problems:
    """Bad rows across all splits; keeps the first few messages for the report."""

    rows: int = 0
    listed: list[str] = field(default_factory=list)
    more: int = 0

    def add(self, location: str, problems: list[str]) -> None:
        self.rows += 1
        for problem in problems:
            if len(self.listed) < MAX_LISTED:
                self.listed.append(f"{location}: {problem}")
            else:
                self.more += 1


def _scan(rows: Iterable[tuple[str, dict | None, str | None]], data_format: Format, found: _Problems) -> _Scan:
    """Check every (location, row, parse error) of one split against the data format."""
    scan = _Scan()
    for index, (location, row, error) in enumerate(rows):
        if not scan.columns and row is not None:
            scan.columns = list(row)
        scan.total += 1
        problems = [error] if error else data_format.problems(row)
        if problems:
            scan.bad.append(index)
            scan.unparsed |= error is not None
            found.add(location, problems)
    return scan


def _local_rows(files: list[Path]) -> Iterator[tuple[str, dict | None, str | None]]:
    for path in files:
        for number, row, error in iter_rows(path):
            yield f"{path}:{number}", row, error


def _wrong_columns(source: str, scans: dict[str, _Scan], data_format: Format) -> None:
    """Stop when no row of a split has the fields the format reads: the columns are wrong, not the
    rows, so name the columns there are (data.bad_rows=skip would drop every row)."""
    for split, scan in scans.items():
        missing = [f for f in data_format.required if f not in scan.columns]
        if scan.columns and scan.total == len(scan.bad) and missing:
            raise TunelabError(
                f"data.source {source}: split '{split}' has the columns {', '.join(scan.columns)}; format "
                f"'{data_format.name}' reads {', '.join(data_format.required)} (no {', '.join(missing)}). Set data.format "
                "to this data's format, or data.format=custom with data.fields naming its columns"
            )


def _report(source: str, scans: dict[str, _Scan], found: _Problems, bad_rows: str, data_format: Format) -> None:
    """Stop on wrong columns; stop on bad rows (`error`) or warn how many will be dropped (`skip`);
    stop on empty splits."""
    _wrong_columns(source, scans, data_format)
    total = sum(s.total for s in scans.values())
    if found.rows and bad_rows == "error":
        listed = "\n  ".join(found.listed + ([f"… and {found.more} more problems"] if found.more else []))
        raise TunelabError(
            f"data.source {source}: {found.rows} of {total} rows are unusable:\n  {listed}\nTo go on, {FIX}."
        )
    if found.rows:
        logger.warning(
            "data.source %s: dropped %d of %d unusable rows (data.bad_rows=skip); first: %s",
            source, found.rows, total, found.listed[0],
        )  # fmt: skip
    for split, scan in scans.items():
        if scan.total == len(scan.bad):
            raise TunelabError(f"data.source {source}: split '{split}' has no usable rows")


def _digest(files: list[Path]) -> str:
    """Content hash of the files: names the `load_dataset` config, so its cache follows the bytes
    (datasets alone keys local files by path and mtime only)."""
    digest = hashlib.blake2b(digest_size=8)
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _without(ds: datasets.Dataset, bad: list[int]) -> datasets.Dataset:
    """`ds` minus the rows at `bad`; `select` only keeps an index mapping (and hashes deterministically)."""
    if not bad:
        return ds
    drop = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in drop])


def _read_split(split: str, files: list[Path], scan: _Scan, data_format: Format, cache_dir: str | None):
    """The raw rows of one split without its bad rows, read (and cached) by `load_dataset`.

    When `load_dataset` cannot read the files (lines that are not JSON, differing CSV headers, a
    blank line in a JSON file whose columns mix types) or sees another number of rows than the
    scan, the split is built in memory from the scanned rows instead: correct, just not cached.
    """
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise TunelabError(f"data.source: split '{split}' mixes file types: {', '.join(map(str, files))}")
    builder = builders.pop()
    options = {}
    if builder == "csv":  # as the csv module reads them: every column a string, empty cells ""
        options = {"features": datasets.Features(dict.fromkeys(scan.columns, datasets.Value("string")))}
        options["keep_default_na"] = False
    reason = "some rows are not valid JSON"
    if not scan.unparsed:
        try:
            raw = datasets.load_dataset(
                builder, _digest(files), data_files={split: [str(f) for f in files]},
                split=split, cache_dir=cache_dir, **options,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any reader failure: the scanned rows are still good
            reason = f"{type(e).__name__}: {e}"
        else:
            if len(raw) == scan.total:
                return _without(raw, scan.bad)
            reason = f"it read {len(raw)} rows where the scan found {scan.total}"
    logger.warning("data.source: datasets could not read the %s files (%s); loading them in memory", split, reason)
    bad = set(scan.bad)
    columns = [*data_format.required, *data_format.optional]
    rows = (row for i, (_location, row, _error) in enumerate(_local_rows(files)) if i not in bad)
    return datasets.Dataset.from_list([{c: row.get(c) for c in columns} for row in rows])


def _batch_rows(batch: dict[str, list]) -> Iterator[dict]:
    """The rows of a column batch: datasets reads Arrow in slices several times faster than row
    by row (most of all after `select` left an index mapping)."""
    return (dict(zip(batch, values)) for values in zip(*batch.values()))


def _hub_rows(source: str, split: str, ds: datasets.Dataset) -> Iterator[tuple[str, dict, None]]:
    rows = (row for batch in ds.iter(batch_size=1024) for row in _batch_rows(batch))
    return ((f"{source}[{split}]:row {i}", row, None) for i, row in enumerate(rows))


def _convert_batch(batch: dict[str, list], convert, columns: tuple[str, ...]) -> dict[str, list]:
    converted = [convert(row) for row in _batch_rows(batch)]
    return {column: [example[column] for example in converted] for column in columns}


def load_examples(
    source: str,
    data_format: Format,
    *,
    bad_rows: str = "error",
    subset: str | None = None,
    splits: dict[str, list[str]] | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
) -> tuple[datasets.DatasetDict, dict]:
    """Validated examples (the format's `columns`: `messages`, or prompt/chosen/rejected) per split, and stats:
    `{"rows": {split: kept}, "bad_rows": dropped, "files": {split: [paths]}}`.

    `source` is a local file or folder (see `find_splits`; `splits` lists a folder's files per split)
    or else a Hub dataset id (`subset` is its config). `bad_rows`: `error` raises one TunelabError
    listing the first problems as `file:line: field …`; `skip` drops the bad rows and logs how many.
    `cache_dir` defaults to datasets' own cache.
    """
    if bad_rows not in ("error", "skip"):
        raise TunelabError(f"data.bad_rows: '{bad_rows}' is not one of error, skip")
    found = _Problems()
    source = synthetic.local_source(source)
    listed = splits
    splits = find_splits(source, listed)
    if listed and splits is None:
        raise TunelabError(f"data.splits: data.source {source} is not a local folder")
    if splits is not None:
        scans = {split: _scan(_local_rows(files), data_format, found) for split, files in splits.items()}
        _report(source, scans, found, bad_rows, data_format)
        raws = {split: _read_split(split, files, scans[split], data_format, cache_dir) for split, files in splits.items()}
        files = {split: [str(f) for f in paths] for split, paths in splits.items()}
    else:
        if not _HUB_ID.fullmatch(source) or Path(source).suffix.lower() in BUILDERS:
            raise TunelabError(f"data.source: {source} does not exist (no such file or folder)")
        from tunelab.hub import dataset_or_cache

        offline = dataset_or_cache()
        try:
            hub = datasets.load_dataset(source, subset, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - offline, unknown id, wrong subset: all one answer
            raise TunelabError(
                f"data.source '{source}' is neither an existing local path nor a reachable Hugging Face Hub "
                f"dataset{offline} ({type(e).__name__}: {e})"
            ) from e
        scans = {split: _scan(_hub_rows(source, split, ds), data_format, found) for split, ds in hub.items()}
        _report(source, scans, found, bad_rows, data_format)
        raws = {split: _without(ds, scans[split].bad) for split, ds in hub.items()}
        files = {split: [f"{source}[{split}]"] for split in hub}
    examples = datasets.DatasetDict(
        {
            split: raw.map(
                _convert_batch, batched=True, fn_kwargs={"convert": data_format.convert, "columns": data_format.columns},
                remove_columns=raw.column_names, num_proc=num_proc, desc=f"{data_format.name} rows → messages ({split})",
            )  # fmt: skip
            for split, raw in raws.items()
        }
    )
    stats = {"rows": {split: len(ds) for split, ds in examples.items()}, "bad_rows": found.rows, "files": files}
    return examples, stats
