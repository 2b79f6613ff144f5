import bz2
import gzip
import json
from collections import Counter

import pytest

from peftkit import data
from peftkit.errors import UserError
from peftkit.recipe import DataSection
from peftkit.tasks import TASKS

from .conftest import sentiment_rows, write_csv

TASK = TASKS["classification"]


def load(**cfg):
    cfg.setdefault("columns", {"text": "review", "label": "sentiment"})
    return data.load(DataSection(**cfg), TASK)


def test_stratified_seeded_three_way_split(sentiment_csv):
    splits, labels = load(source=str(sentiment_csv))
    assert labels == ["neg", "pos"]  # read from the data, sorted
    assert {k: len(v) for k, v in splits.items()} == {"train": 160, "validation": 20, "test": 20}
    for split in splits.values():
        assert Counter(split["label"]) == {0: len(split) // 2, 1: len(split) // 2}  # stratified
    again, _ = load(source=str(sentiment_csv))
    assert again["test"]["text"] == splits["test"]["text"]
    other, _ = load(source=str(sentiment_csv), seed=7)
    assert other["test"]["text"] != splits["test"]["text"]
    assert not set(splits["train"]["source_row"]) & set(splits["test"]["source_row"])


def test_label_list_sets_id_order(sentiment_csv):
    splits, labels = load(source=str(sentiment_csv), labels=["pos", "neg"])
    assert labels == ["pos", "neg"]
    row = splits["train"][0]
    assert (row["label"] == 0) == any(
        w in row["text"] for w in ("good", "great", "fine", "superb", "lovely", "brilliant", "charming", "moving")
    )


def test_label_mapping_merges_raw_values(tmp_path):
    rows = [{"review": f"text {i}", "sentiment": str(i % 5 + 1)} for i in range(100)]
    path = write_csv(tmp_path / "stars.csv", rows)
    mapping = {1: "negative", 2: "negative", 3: "neutral", 4: "positive", 5: "positive"}
    splits, labels = load(source=str(path), labels=mapping)
    assert labels == ["negative", "neutral", "positive"]
    assert sum(len(s) for s in splits.values()) == 100


def test_unknown_labels_fail_or_drop(tmp_path):
    rows = sentiment_rows(60) + [{"review": "a plot summary", "sentiment": "plot"}] * 7
    path = write_csv(tmp_path / "mixed.csv", rows)
    match = r"7 row\(s\) have labels not in data.labels: 'plot' \(7\).*unknown_labels: drop"
    with pytest.raises(UserError, match=match):
        load(source=str(path), labels=["neg", "pos"])
    splits, _ = load(source=str(path), labels=["neg", "pos"], unknown_labels="drop")
    assert sum(len(s) for s in splits.values()) == 60


def test_missing_column_names_the_fix(sentiment_csv):
    with pytest.raises(UserError) as err:
        load(source=str(sentiment_csv), columns={"text": "reveiw", "label": "sentiment"})
    message = str(err.value)
    assert "column 'reveiw'" in message and "did you mean 'review'" in message and "data.columns.text" in message
    with pytest.raises(UserError, match="unknown role"):
        load(source=str(sentiment_csv), columns={"txt": "review"})


def test_each_tasks_text_roles_are_among_its_columns():
    """data.load's empty-text check reads the task's TEXT_ROLES, so a role missing from COLUMNS is never checked."""
    for name, task in TASKS.items():
        assert set(task.TEXT_ROLES) <= set(task.COLUMNS), name
        assert task.LABEL_ROLE not in task.TEXT_ROLES, name


def test_empty_text_names_the_source_row(tmp_path):
    rows = sentiment_rows(40)
    rows[12]["review"] = "  "
    with pytest.raises(UserError, match=r"empty 'text' \(source rows 13,.*data.empty_texts: drop"):
        load(source=str(write_csv(tmp_path / "gap.csv", rows)))
    splits, _ = load(source=str(write_csv(tmp_path / "gap.csv", rows)), empty_texts="drop")
    assert sum(len(split) for split in splits.values()) == 39
    assert all(t.strip() for split in splits.values() for t in split["text"])


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.bz2", ".jsonl", ".json.gz", ".parquet"])
def test_formats_and_compression(tmp_path, suffix):
    rows = sentiment_rows(50)
    path = tmp_path / f"reviews{suffix}"
    if suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    else:
        plain = tmp_path / "plain"
        if ".csv" in suffix:
            write_csv(plain, rows)
        else:
            plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
        opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
        with opener(path, "wb") as f:
            f.write(plain.read_bytes())
    splits, labels = load(source=str(path))
    assert sum(len(s) for s in splits.values()) == 50 and labels == ["neg", "pos"]


def test_bad_sources():
    with pytest.raises(UserError, match="file not found"):
        load(source="no/such/file.csv")
    with pytest.raises(UserError, match="package 'no_such_package_xyz' is not installed"):
        load(source="pkg://no_such_package_xyz/data.csv")


def test_package_files_resolve_without_importing():
    from peftkit import assets

    assert assets.package_path("pkg://peftkit/metrics/f1.py").is_file()
    with pytest.raises(UserError, match="no 'nothing.csv' inside"):
        assets.package_path("pkg://peftkit/nothing.csv")


def test_too_small_for_splits(tmp_path):
    path = write_csv(tmp_path / "tiny.csv", sentiment_rows(4))
    with pytest.raises(UserError, match="too few rows"):
        load(source=str(path))


def test_undecodable_bytes_name_the_line_and_the_fix(tmp_path):
    rows = sentiment_rows(30)
    plain = write_csv(tmp_path / "reviews.csv", rows).read_bytes()
    latin = tmp_path / "latin.csv"
    latin.write_bytes(plain.replace(rows[4]["review"].encode(), rows[4]["review"].encode() + b" caf\xe9"))
    with pytest.raises(UserError, match=r"line 6 of latin.csv is not valid utf-8 \(byte 0xe9.*data.encoding"):
        load(source=str(latin))
    splits, _ = load(source=str(latin), encoding="latin-1")
    assert any("café" in t for split in splits.values() for t in split["text"])

    jsonl = tmp_path / "reviews.jsonl.gz"  # compressed: checked after decompression
    with gzip.open(jsonl, "wb") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in rows).replace(b"movie", b"movi\xe9", 1))
    with pytest.raises(UserError, match=r"line \d+ of reviews.jsonl.gz is not valid utf-8.*JSON must be UTF-8"):
        load(source=str(jsonl))


def test_files_without_rows_and_missing_labels(tmp_path):
    for name, text in (("empty.csv", ""), ("header.csv", "review,sentiment\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match="holds no data rows"):
            load(source=str(tmp_path / name))
    rows = sentiment_rows(30)
    rows[7]["sentiment"] = None
    path = tmp_path / "unlabelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"labels not in data.labels: '\(none\)' \(1\) \(source rows 8\)"):
        load(source=str(path))


def test_nothing_left_after_filtering_is_an_error_not_an_empty_split(tmp_path):
    rows = [dict(r, review=" ") for r in sentiment_rows(30)]
    path = write_csv(tmp_path / "blank.csv", rows)
    with pytest.raises(UserError, match="no rows of the source's train split are left"):
        load(source=str(path), empty_texts="drop")
    with pytest.raises(UserError, match="no rows of the source's train split are left"):
        load(source=str(write_csv(tmp_path / "r.csv", sentiment_rows(30))), labels=["x"], unknown_labels="drop")


# --- the label set's id order: one rule (data.label_order) for `peftkit run` and `peftkit init` ---------------


def test_label_order_rule():
    assert data.label_order([10, 2, 1]) == [1, 2, 10]
    assert data.label_order(["10", "2", "1", "-3"]) == ["-3", "1", "2", "10"]  # numbers, though written as text
    assert data.label_order([2.5, 1.0, 10.0]) == [1.0, 2.5, 10.0]
    assert data.label_order(["pos", "neg", "neutral"]) == ["neg", "neutral", "pos"]
    assert data.label_order(["I-PER", "B-PER", "O", "B-LOC"]) == ["O", "B-LOC", "B-PER", "I-PER"]  # "O" is id 0
    assert data.label_order(["10", "2", "other"]) == ["10", "2", "other"]  # not all numbers: as strings
    assert data.label_order([True, False]) == [False, True]  # booleans are not numbers here


@pytest.mark.parametrize("written", ["int", "str"])
def test_numeric_labels_get_numeric_ids_in_run_and_init_alike(tmp_path, written):
    """1, 2, 10 as ints (a csv) or as strings (json): ids 0, 1, 2 in that order, not the strings' "1", "10", "2",
    and `peftkit init`'s label list (init/profile.py label_set, written into the recipe) is the order data.load
    gives."""
    from peftkit.init import profile

    rows = [{"review": f"review number {i}", "sentiment": (1, 2, 10)[i % 3]} for i in range(90)]
    if written == "int":
        path = write_csv(tmp_path / "stars.csv", rows)
    else:
        path = tmp_path / "stars.jsonl"
        path.write_text("".join(json.dumps(dict(r, sentiment=str(r["sentiment"]))) + "\n" for r in rows))
    splits, labels = load(source=str(path))
    assert labels == ["1", "2", "10"]
    for split in splits.values():
        for text, label in zip(split["text"], split["label"]):
            assert labels[label] == str((1, 2, 10)[int(text.split()[-1]) % 3])

    profiled, _ = profile.read_data(str(path), None)
    names, counts, missing = profile.label_set(profiled, "sentiment", per_token=False)
    assert [str(n) for n in names] == labels and missing == 0 and sum(counts.values()) == 90


def test_a_trained_runs_order_is_kept(tmp_path):
    """`peftkit eval` passes the run's stored labels: data read with another order is encoded with the run's ids."""
    rows = [{"review": f"review number {i}", "sentiment": (1, 2, 10)[i % 3]} for i in range(90)]
    path = write_csv(tmp_path / "stars.csv", rows)
    splits, labels = data.load(
        DataSection(source=str(path), columns={"text": "review", "label": "sentiment"}), TASK, order=["1", "10", "2"]
    )
    assert labels == ["1", "10", "2"]
    for split in splits.values():
        for text, label in zip(split["text"], split["label"]):
            assert labels[label] == str((1, 2, 10)[int(text.split()[-1]) % 3])
