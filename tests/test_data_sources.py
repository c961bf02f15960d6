"""Sources: real datasets load through each data format; bad rows are reported by file:line:field."""

import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.data import sources
from tunelab.data.formats import get_format
from tunelab.data.sources import find_splits, iter_rows, load_examples
from tunelab.errors import TunelabError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real datasets not found at {DATA}")
    return DATA


@pytest.fixture
def load(tmp_path):
    """load_examples with the datasets cache in tmp_path, so tests never touch the home cache."""

    def run(source, data_format, **options):
        return load_examples(str(source), get_format(data_format), cache_dir=str(tmp_path / "cache"), **options)

    return run


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def roles(example: dict) -> list[str]:
    return [m["role"] for m in example["messages"]]


# Real datasets


def test_samsum_folder_train_and_validation(data, load):
    examples, stats = load(data / "samsum", "samsum")
    assert stats["rows"] == {"train": 14689, "validation": 814} and stats["bad_rows"] == 0
    assert stats["files"]["validation"] == [str(data / "samsum" / "validation.jsonl")]
    assert examples["train"].column_names == ["messages"]
    first_summary = json.loads((data / "samsum" / "train.jsonl").open().readline())["summary"]
    user, assistant = examples["train"][0]["messages"]
    assert user["role"] == "user" and user["content"].startswith("Summarize this dialogue:\n\nAmanda: I baked")
    assert assistant == {"role": "assistant", "content": first_summary}


def test_cnn_dailymail_folder_validation_and_test(data, load):
    examples, stats = load(data / "cnn_dailymail", "cnn_dailymail")
    assert stats["rows"] == {"validation": 500, "test": 500}
    example = examples["test"][0]
    assert roles(example) == ["user", "assistant"]
    assert example["messages"][0]["content"].startswith("Summarize this news article in a few sentences:\n\n(CNN)")


def test_openorca_sample_has_system_prompts(data, load):
    examples, stats = load(data / "openorca_sample" / "validation.jsonl", "openorca")
    assert stats["rows"] == {"train": 284}
    assert roles(examples["train"][0]) == ["system", "user", "assistant"]
    assert examples["train"][0]["messages"][2]["content"].startswith("Step 1: Identify the names")


def test_guanaco_multi_turn_rows_alternate(data, load):
    examples, stats = load(data / "oasst_guanaco_style", "guanaco")
    assert stats["rows"] == {"train": 100}
    multi = [e for e in examples["train"] if len(e["messages"]) >= 4]
    assert multi
    for example in multi:
        assert roles(example) == ["user", "assistant"] * (len(example["messages"]) // 2)


def test_alpaca_skip_drops_the_49_empty_outputs(data, load, caplog):
    with caplog.at_level(logging.WARNING, logger="tunelab.data.sources"):
        examples, stats = load(data / "alpaca", "alpaca", bad_rows="skip")
    assert stats["bad_rows"] == 49 and stats["rows"] == {"train": 52002 - 49}
    assert "dropped 49 of 52002" in caplog.text
    assert all(e["messages"][-1]["content"] for e in examples["train"].select(range(280, 290)))


def test_alpaca_error_names_file_line_and_field(data, load):
    with pytest.raises(TunelabError) as error:
        load(data / "alpaca", "alpaca")
    message = str(error.value)
    assert f"{data / 'alpaca' / 'alpaca_data_en.jsonl'}:285: field 'output' is empty" in message
    assert "49 of 52002 rows" in message and "… and 39 more problems" in message
    assert "data.bad_rows=skip" in message


# Malformed rows


def test_jsonl_problems_name_file_line_and_field(tmp_path, load):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"dialogue": "A: hi", "summary": "ok"},
            {"dialogue": "A: hi"},
            "",
            {"dialogue": "A: hi", "summary": "   "},
            '{"dialogue": "A: hi", "summary": ',
            {"dialogue": "A: hi", "summary": 7},
            '["not", "an object"]',
        ],
    )
    with pytest.raises(TunelabError) as error:
        load(path, "samsum")
    message = str(error.value)
    for expected in [
        f"{path}:2: field 'summary' is missing",
        f"{path}:4: field 'summary' is empty",
        f"{path}:5: not valid JSON: Expecting value at column 33",
        f"{path}:6: field 'summary' should be a string, got int",
        f"{path}:7: not valid JSON: expected an object {{...}}, got list",
    ]:
        assert expected in message
    assert "5 of 6 rows are unusable" in message
    assert ":1:" not in message and "Traceback" not in message


def test_skip_with_unparseable_lines_keeps_the_good_rows(tmp_path, load, caplog):
    """load_dataset cannot read a file with broken JSON: the split is built from the scanned rows."""
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"dialogue": "A", "summary": "a"}, "{oops", {"dialogue": "B", "summary": "b"}]
    )
    with caplog.at_level(logging.WARNING, logger="tunelab.data.sources"):
        examples, stats = load(path, "samsum", bad_rows="skip")
    assert "(some rows are not valid JSON); loading them in memory" in caplog.text
    assert stats == {"rows": {"train": 2}, "bad_rows": 1, "files": {"train": [str(path)]}}
    assert [e["messages"][1]["content"] for e in examples["train"]] == ["a", "b"]


@pytest.mark.parametrize("blank", [False, True])
def test_skip_with_mixed_types_drops_the_right_rows(tmp_path, load, blank):
    """datasets 5 reads a str/int column as its Json type, but fails on it when the file also has
    a blank line; either way the dropped rows must be the bad ones."""
    rows = [{"dialogue": f"D{i}", "summary": f"s{i}", "id": i if i % 2 else str(i)} for i in range(6)]
    rows[3]["summary"] = 3
    path = write_jsonl(tmp_path / "d.jsonl", rows[:2] + [""] * blank + rows[2:])
    examples, stats = load(path, "samsum", bad_rows="skip")
    assert stats["bad_rows"] == 1
    assert [e["messages"][1]["content"] for e in examples["train"]] == ["s0", "s1", "s2", "s4", "s5"]


CUSTOM = {"prompt": "q", "completion": "a", "system": "sys"}


def test_csv_problems_name_file_line_and_field(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(
        "q,a,sys\n"
        '"2+2?",4,\n'
        '"multi\nline",,x\n'  # lines 3-4: empty answer
        "only one value\n"  # line 5: no answer
        "a,b,c,d\n"  # line 6: too many values
    )
    with pytest.raises(TunelabError) as error:
        load_examples(str(path), get_format("custom", CUSTOM), cache_dir=str(tmp_path / "c"))
    message = str(error.value)
    assert f"{path}:3: field 'a' is empty" in message
    assert f"{path}:5: field 'a' is missing" in message
    assert f"{path}:6: has more values than the header's 3 columns" in message


def test_csv_values_stay_strings(tmp_path):
    """As the csv module reads them: "4" stays a string and an empty cell is "" (not NaN/None)."""
    path = tmp_path / "data.csv"
    path.write_text('q,a,sys\n"2+2?",4,\n"3+3?",6,Be brief.\n')
    examples, _ = load_examples(str(path), get_format("custom", CUSTOM), cache_dir=str(tmp_path / "c"))
    assert examples["train"].cache_files  # read by load_dataset, not the in-memory fallback
    assert examples["train"][0]["messages"] == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert examples["train"][1]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_skip_when_datasets_counts_rows_differently(tmp_path, caplog):
    """pandas skips a whitespace-only CSV line that the csv module reads as a (bad) row: the row
    indices no longer match, so the split is built from the scanned rows instead."""
    path = tmp_path / "data.csv"
    path.write_text("q,a\nx,1\n   \ny,2\n,\nz,3\n")
    with caplog.at_level(logging.WARNING, logger="tunelab.data.sources"):
        examples, stats = load_examples(
            str(path), get_format("custom", CUSTOM), bad_rows="skip", cache_dir=str(tmp_path / "c")
        )
    assert stats["bad_rows"] == 2
    assert [e["messages"][1]["content"] for e in examples["train"]] == ["1", "2", "3"]
    assert "read 4 rows where the scan found 5" in caplog.text


def test_parquet_wrong_type_and_good_load(tmp_path, load):
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"dialogue": ["A: hi", "B: yo"], "summary": [1, 2]}), path)
    with pytest.raises(TunelabError, match=f"{path}:2: field 'summary' should be a string, got int"):
        load(tmp_path, "samsum")
    pq.write_table(pa.table({"dialogue": ["A: hi", "B: yo"], "summary": ["a", "b"]}), path)
    examples, stats = load(tmp_path, "samsum")
    assert stats["rows"] == {"train": 2}
    assert examples["train"][1]["messages"][1] == {"role": "assistant", "content": "b"}


def test_custom_messages_column_with_num_proc(tmp_path, load):
    conversations = [
        [
            {"role": "user", "content": f"Hi {i}"},
            {"role": "assistant", "content": f"Hello {i}", **({"name": "x"} if i % 2 else {})},  # mixed keys
        ]
        for i in range(8)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conv": c} for c in conversations])
    examples, _ = load_examples(
        str(path), get_format("custom", {"messages": "conv"}), num_proc=2, cache_dir=str(tmp_path / "c")
    )
    assert examples["train"][7]["messages"] == [
        {"role": "user", "content": "Hi 7"},
        {"role": "assistant", "content": "Hello 7"},
    ]


def test_empty_split_is_an_error(tmp_path, load):
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "A", "summary": " "}])
    with pytest.raises(TunelabError, match="split 'train' has no usable rows"):
        load(path, "samsum", bad_rows="skip")


def test_bad_rows_value_is_checked(tmp_path, load):
    with pytest.raises(TunelabError, match="data.bad_rows: 'ignore'"):
        load(tmp_path, "samsum", bad_rows="ignore")


# Caching


def test_second_load_reuses_the_cache_and_a_changed_file_does_not(tmp_path, load):
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialogue": f"D{i}", "summary": f"s{i}"} for i in range(50)])
    first, _ = load(path, "samsum")
    (cached,) = [f["filename"] for f in first["train"].cache_files]
    stamp = os.stat(cached).st_mtime_ns
    again, _ = load(path, "samsum")
    assert [f["filename"] for f in again["train"].cache_files] == [cached]
    assert os.stat(cached).st_mtime_ns == stamp  # read back, not recomputed
    mtime = os.stat(path).st_mtime_ns
    write_jsonl(path, [{"dialogue": f"D{i}", "summary": f"new {i}"} for i in range(50)])
    os.utime(path, ns=(mtime, mtime))  # same mtime: datasets alone would serve the old rows
    changed, _ = load(path, "samsum")
    assert changed["train"][0]["messages"][1]["content"] == "new 0"
    assert changed["train"].cache_files and changed["train"].cache_files != first["train"].cache_files


# Files and splits


def test_find_splits_groups_a_folder_by_name(tmp_path):
    names = ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "val.jsonl", "Test.csv", "README.md"]
    for name in names:
        (tmp_path / name).touch()
    assert find_splits(str(tmp_path)) == {
        "train": [tmp_path / "train-00000-of-00002.parquet", tmp_path / "train-00001-of-00002.parquet"],
        "validation": [tmp_path / "val.jsonl"],
        "test": [tmp_path / "Test.csv"],
    }
    (tmp_path / "values.jsonl").touch()
    with pytest.raises(TunelabError, match="cannot tell the split of values.jsonl"):
        find_splits(str(tmp_path))


def test_find_splits_file_unnamed_folder_and_missing(tmp_path):
    (tmp_path / "dev.jsonl").touch()
    assert find_splits(str(tmp_path / "dev.jsonl")) == {"train": [tmp_path / "dev.jsonl"]}
    assert find_splits(str(tmp_path)) == {"validation": [tmp_path / "dev.jsonl"]}
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(TunelabError, match="holds no data files"):
        find_splits(str(other))
    for name in ["a.jsonl", "b.json"]:
        (other / name).touch()
    assert find_splits(str(other)) == {"train": [other / "a.jsonl", other / "b.json"]}
    assert find_splits(str(tmp_path / "nope")) is None


def test_iter_rows_json_array_and_unknown_extension(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1}, 2, {"a": 3}], indent=2))
    assert [(n, row) for n, row, _ in iter_rows(path)] == [(1, {"a": 1}), (2, None), (3, {"a": 3})]
    with pytest.raises(TunelabError, match=r"d\.txt: unsupported file type; use one of .jsonl .json .csv .parquet"):
        iter_rows(tmp_path / "d.txt")


# Hub ids


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path, load):
    with pytest.raises(TunelabError, match="does not exist"):
        load(tmp_path / "trian.jsonl", "samsum")


def test_unreachable_hub_id_is_one_clear_error(monkeypatch, load):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TunelabError, match="'nobody/no-such-set' is neither an existing local path nor a reachable"):
        load("nobody/no-such-set", "samsum")


def test_hub_rows_are_validated_by_split_and_row(monkeypatch, load):
    hub = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"dialogue": ["A: hi", "B: yo", "C"], "summary": ["a", "", "c"]})}
    )
    calls = []
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *args, **kw: calls.append(args) or hub)
    with pytest.raises(TunelabError, match=r"someone/set\[train\]:row 1: field 'summary' is empty"):
        load("someone/set", "samsum", subset="v1")
    examples, stats = load("someone/set", "samsum", subset="v1", bad_rows="skip")
    assert calls[0] == ("someone/set", "v1")
    assert stats["rows"] == {"train": 2} and examples["train"][1]["messages"][1]["content"] == "c"


def test_real_subset_copy_loads(data, tmp_path, load):
    """A 2000-line copy with a blank line and a CRLF line loads like the original (line count stays exact)."""
    lines = (data / "samsum" / "train.jsonl").read_text().splitlines()[:2000]
    copy = tmp_path / "train.jsonl"
    copy.write_text("\n".join(lines[:10]) + "\n\n" + "\r\n".join(lines[10:]) + "\n")
    shutil.copy(data / "samsum" / "validation.jsonl", tmp_path / "validation.jsonl")
    _, stats = load(tmp_path, "samsum")
    assert stats["rows"] == {"train": 2000, "validation": 814}


# Copies, duplicates and wrong columns (issue 15, items 7 and 13)


def test_a_copy_of_a_split_file_is_refused_unless_listed(tmp_path, load):
    rows = [{"dialogue": f"A: hi {i}", "summary": f"s {i}"} for i in range(6)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    shutil.copy(tmp_path / "train.jsonl", tmp_path / "train_copy.jsonl")
    with pytest.raises(TunelabError, match=r"2 files claim the train split \(train.jsonl, train_copy.jsonl\), and they "
                                           r"are not numbered shards.*"
                                           r"data.splits=\{train: \[train.jsonl, train_copy.jsonl\]\}"):
        find_splits(str(tmp_path))
    examples, stats = load(tmp_path, "samsum", splits={"train": ["train.jsonl", "train_copy.jsonl"]})
    assert stats["rows"] == {"train": 12}
    with pytest.raises(TunelabError, match=r"data.splits.validation: no such file: .*val.jsonl"):
        find_splits(str(tmp_path), {"validation": ["val.jsonl"]})


def test_duplicates_are_counted_within_and_across_splits(tmp_path, load, caplog):
    from tunelab.data.prepare import duplicates

    rows = [{"dialogue": f"A: hi {i}", "summary": f"s {i}"} for i in range(5)]
    write_jsonl(tmp_path / "train.jsonl", rows + rows[:2])
    write_jsonl(tmp_path / "validation.jsonl", rows[1:3])
    shutil.copy(tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    examples, _ = load(tmp_path, "samsum")
    with caplog.at_level(logging.WARNING, logger="tunelab.data.prepare"):
        found = duplicates([examples["train"]], [examples["validation"]], [examples["test"]])
    assert found == {"train": 2, "validation": 0, "test": 2, "validation_in_train": 2, "test_in_train": 7,
                     "test_in_validation": 3}
    assert "7 of 7 test samples also appear in train (every one: are the two files the same?)" in caplog.text
    assert "2 of 7 train samples are exact duplicates of others in train" in caplog.text


def test_a_csv_with_the_wrong_columns_lists_its_columns(tmp_path, load):
    path = tmp_path / "d.csv"
    path.write_text("id,text,label\n1,hello,x\n2,bye,y\n")
    with pytest.raises(TunelabError) as error:
        load(path, "samsum", bad_rows="skip")
    message = str(error.value)
    assert "has the columns id, text, label; format 'samsum' reads dialogue, summary (no dialogue, summary)" in message
    assert "bad_rows" not in message
