"""Load a recipe's data into train / validation / test splits with the task's column roles and a label set.

    source file or Hub dataset -> rename columns to task roles -> check text -> encode labels -> split -> cap

Every problem a user can fix (missing file or column, labels outside the set, empty text, nothing left) is a
UserError naming the rows and the recipe key that fixes it.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import assets
from peftkit.errors import UserError, did_you_mean

if TYPE_CHECKING:  # annotations only: recipe.py imports the task registry, whose tasks import this module
    from datasets import Dataset, DatasetDict
    from fsspec.core import OpenFile

    from peftkit.sections import DataSection
    from peftkit.tasks.common import LabelKind, Task

log = logging.getLogger("peftkit")

_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".conll": "conll",
    ".iob": "conll",
    ".bio": "conll",
}
_SPLIT_ALIASES = {"valid": "validation", "dev": "validation", "val": "validation"}
ROW = "source_row"  # 1-based row of the source split (a csv's data rows after its header; a conll's sentences)


def load(
    cfg: DataSection, task: Task, order: list[str] | None = None, kind: LabelKind = "class"
) -> tuple[DatasetDict, list[str] | None]:
    """(DatasetDict with train/validation/test, label names or None). `order`: a trained run's labels (its
    peftkit.json), so its data is encoded with the ids the run was trained with, whatever order this version
    would give a label set read from the data. `kind`: what one row's label is (the task's `label_kind` of the
    recipe's task section): a class id; a set of classes, encoded as a 0/1 float per label; a number (regression,
    whose "label set" is the one output, named after the label column)."""
    splits = read_source(cfg)
    splits = _select_columns(splits, cfg, task.COLUMNS)
    per_token = task.LABELS_PER_TOKEN
    # remember each row's place in the source, so errors can name it after filtering and splitting
    splits = splits.__class__({k: v.add_column(ROW, list(range(1, len(v) + 1))) for k, v in splits.items()})
    labels = None
    if task.LABEL_ROLE and kind == "number":
        splits = _encode_numbers(splits, cfg, task.LABEL_ROLE)
        labels = [cfg.columns.get(task.LABEL_ROLE, task.LABEL_ROLE)]
    elif task.LABEL_ROLE:
        splits, labels = _encode_labels(splits, cfg, task.LABEL_ROLE, per_token, order, many=kind == "classes")
    splits = _check_text(splits, cfg.empty_texts, task.TEXT_ROLES)
    for name, split in splits.items():
        if len(split) == 0:
            raise UserError(
                f"data: no rows of the source's {name} split are left after leaving out the rows logged "
                "above (empty texts, unknown labels); check data.columns and data.labels"
            )
    # stratified by class when each row has one; label sets and numbers are split at random (seeded by data.seed)
    stratify = task.LABEL_ROLE if kind == "class" and not per_token else None
    splits = _make_splits(splits, cfg, stratify=stratify, group=task.SPLIT_BY)
    if cfg.max_samples:
        splits = splits.__class__({k: v.select(range(min(cfg.max_samples, len(v)))) for k, v in splits.items()})
    for name, split in splits.items():
        if len(split) == 0:
            raise UserError(f"data: the {name} split is empty; give it a larger share in data.splits or add data")
    log.info("data: %s", ", ".join(f"{k} {len(v):,}" for k, v in splits.items()))
    return splits, labels


def read_source(cfg: DataSection) -> DatasetDict:
    from datasets import DatasetDict, load_dataset

    path = assets.resolve_file(cfg.source) if cfg.format != "hub" else None
    packaged = assets.packaged_dataset(cfg.source) if path is None and cfg.format == "auto" and not cfg.subset else None
    if packaged:  # the Hub dataset's own files, from an installed package: the same splits, offline
        return DatasetDict(
            {
                split: read_source(cfg.model_copy(update={"source": str(file)}))["train"]
                for split, file in packaged.items()
            }
        )
    if path is None:
        try:
            loaded = load_dataset(cfg.source, cfg.subset)
        except Exception as err:  # the Hub client raises many types; all mean "could not get it"
            raise assets.hub_error("data.source", cfg.source, err) from None
        return DatasetDict({_SPLIT_ALIASES.get(k, k): v for k, v in loaded.items()})
    fmt = cfg.format if cfg.format != "auto" else format_of(path)
    if fmt != "parquet":
        _check_encoding(path, fmt, cfg.encoding)
    if fmt == "conll":
        return DatasetDict({"train": _read_conll(path, cfg)})
    if fmt == "squad" or (fmt == "json" and cfg.format == "auto" and path.suffix == ".json"):
        squad = _read_squad(path, required=fmt == "squad")
        if squad is not None:
            return DatasetDict({"train": squad})
    builder, options = {
        "csv": ("csv", {}),
        "tsv": ("csv", {"sep": "\t"}),
        "json": ("json", {}),
        "parquet": ("parquet", {}),
    }[fmt]
    if builder == "csv":
        options["encoding"] = cfg.encoding
    try:
        return load_dataset(builder, data_files={"train": str(path)}, **options)
    except Exception as err:
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        if _is_blank(path, header=builder == "csv"):
            raise UserError(f"data.source: {path} holds no data rows") from None
        raise UserError(f"data.source: could not read {path} as {fmt}: {cause}") from None


def open_binary(path: Path) -> OpenFile | None:
    """The file's bytes, decompressed; None for a compression fsspec cannot read (datasets still may)."""
    import fsspec
    from fsspec.utils import infer_compression

    compression = infer_compression(str(path))
    if compression is None and path.suffix in _COMPRESSION:
        return None
    return fsspec.open(str(path), "rb", compression=compression)


def _check_encoding(path: Path, fmt: str, encoding: str) -> None:
    """Name the first line that is not valid text. Written here because the readers do not: pyarrow's json
    reader keeps undecodable bytes and fails much later on first access, and its csv error names no line."""
    import codecs

    if fmt in ("json", "squad"):  # pyarrow reads JSON as UTF-8 only (as the JSON standard says)
        encoding, fix = "utf-8", "JSON must be UTF-8: convert the file (e.g. iconv -f latin1 -t utf-8)"
    else:
        fix = "set data.encoding to the file's encoding (e.g. latin-1, cp1252), or convert the file"
    opened = open_binary(path)
    if opened is None:
        return
    decoder = codecs.getincrementaldecoder(encoding)()
    with opened as f:
        for number, line in enumerate(f, 1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as err:
                raise UserError(
                    f"data.source: line {number} of {path.name} is not valid {encoding} "
                    f"(byte {err.object[err.start]:#04x} at position {err.start + 1}); {fix}"
                ) from None


def _is_blank(path: Path, header: bool) -> bool:
    """True when the file has no data rows (nothing, or a csv header only)."""
    opened = open_binary(path)
    if opened is None:
        return False
    with opened as f:
        lines = [line for _, line in zip(range(3), (line for line in f if line.strip()))]
    return len(lines) <= int(header)


def _read_conll(path: Path, cfg: DataSection) -> Dataset:
    """CoNLL-style text: `token ... tag` per line (tab or spaces), a blank line between sentences."""
    import fsspec
    from datasets import Dataset

    sentences, tokens, tags = [], [], []
    # decodable: _check_encoding read it first
    with fsspec.open(str(path), "rt", compression="infer", encoding=cfg.encoding) as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":  # blank (or whitespace-only) line: sentence ends
                if tokens:
                    sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            try:
                tag = fields[cfg.conll_tag_column]
            except IndexError:
                raise UserError(
                    f"data.source: line {number} of {path.name} has {len(fields)} column(s), so "
                    f"data.conll_tag_column {cfg.conll_tag_column} does not exist: {line.strip()!r}"
                ) from None
            if len(fields) < 2:
                raise UserError(f"data.source: line {number} of {path.name} has a token but no tag: {line.strip()!r}")
            tokens.append(fields[0])
            tags.append(tag)
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise UserError(f"data.source: {path} holds no sentences (expected `token<TAB>tag` lines)")
    return Dataset.from_list(sentences)


def _read_squad(path: Path, required: bool) -> Dataset | None:
    """SQuAD's nested JSON (data -> paragraphs -> qas) as flat rows: id, question, context, answers{text,
    answer_start}, the layout of the Hub's `squad` dataset. None when the file is other JSON and not `required`."""
    import json

    from datasets import Dataset

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        articles = document["data"]
        paragraphs = [p for article in articles for p in article["paragraphs"]]
    except (ValueError, KeyError, TypeError) as err:
        if not required:
            return None
        raise UserError(f"data.source: {path} is not SQuAD-format JSON (data -> paragraphs -> qas): {err}") from None
    rows = []
    for paragraph in paragraphs:
        for qa in paragraph["qas"]:
            answers = [] if qa.get("is_impossible") else qa.get("answers", [])
            rows.append(
                {
                    "id": str(qa["id"]),
                    "question": qa["question"],
                    "context": paragraph["context"],
                    "answers": {
                        "text": [a["text"] for a in answers],
                        "answer_start": [a["answer_start"] for a in answers],
                    },
                }
            )
    return Dataset.from_list(rows)


def format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise UserError(
        f"data.source: cannot tell the format of {path.name}; set data.format to csv, tsv, json, parquet or conll"
    )


def _select_columns(splits: DatasetDict, cfg: DataSection, roles: dict[str, bool]) -> DatasetDict:
    unknown = [role for role in cfg.columns if role not in roles]
    if unknown:
        raise UserError(
            f"data.columns: unknown role(s) {', '.join(unknown)}{did_you_mean(unknown[0], roles)}; "
            f"this task reads: {', '.join(roles)}"
        )
    available = splits[next(iter(splits))].column_names
    mapping = {}
    for role, required in roles.items():
        column = cfg.columns.get(role, role)
        if column in available:
            mapping[column] = role
        elif required or role in cfg.columns:
            raise UserError(
                f"data: column '{column}' (role '{role}') not found{did_you_mean(column, available)}; the source has "
                f"columns: {', '.join(available)}. Set data.columns.{role} to the right one."
            )
    splits = splits.select_columns(list(mapping))
    return splits.rename_columns({c: r for c, r in mapping.items() if c != r})


def blank(value: object) -> bool:
    """An empty or missing text (None, or only whitespace)."""
    return value is None or not str(value).strip()


def _check_text(splits: DatasetDict, empty_texts: str, roles: Iterable[str]) -> DatasetDict:
    """Empty or missing texts in the task's text `roles` (its TEXT_ROLES) fail with their row numbers, or are
    dropped and counted (data.empty_texts)."""
    columns = [c for c in roles if c in splits["train"].column_names]

    for name, split in splits.items():
        if "tokens" in split.column_names:
            _check_tokens(split)
        for column in columns:
            bad = [row for row, t in zip(split[ROW], split[column]) if blank(t)]
            if bad and empty_texts == "error":
                raise UserError(
                    f"data: {len(bad)} row(s) have an empty '{column}' (source rows {_rows(bad)}, counted from 1 after "
                    f"any header); remove or fill them, or set data.empty_texts: drop to leave them out"
                )
            if bad:
                log.info(
                    "data: dropped %d row(s) of %s with an empty '%s' (source rows %s)",
                    len(bad),
                    name,
                    column,
                    _rows(bad),
                )
    if empty_texts == "drop":
        splits = splits.filter(
            lambda b: [not any(blank(b[c][i]) for c in columns) for i in range(len(b[ROW]))], batched=True
        )
    return splits


def _check_tokens(split: Dataset) -> None:
    """Token-labelled data: every sentence has tokens, and as many tags as tokens."""
    empty = [row for row, tokens in zip(split[ROW], split["tokens"]) if not tokens]
    if empty:
        raise UserError(f"data: {len(empty)} sentence(s) have no tokens (source sentences {_rows(empty)}); remove them")
    if "tags" in split.column_names:
        bad = [
            (row, len(tok), len(tag))
            for row, tok, tag in zip(split[ROW], split["tokens"], split["tags"])
            if len(tok) != len(tag)
        ]
        if bad:
            row, n_tokens, n_tags = bad[0]
            raise UserError(
                f"data: {len(bad)} sentence(s) have a different number of tokens and tags (first: source sentence "
                f"{row}, {n_tokens} tokens, {n_tags} tags); every token needs exactly one tag"
            )


def _rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:5])) + (" ..." if len(rows) > 5 else "")


def label_names(splits: DatasetDict, role: str, per_token: bool = False) -> DatasetDict:
    """A Hub dataset's ClassLabel column (or a list of them) as its names, so it is handled like any text label."""
    from datasets import ClassLabel

    feature = splits[next(iter(splits))].features[role]
    inner = getattr(feature, "feature", None) if per_token else feature
    if not isinstance(inner, ClassLabel):
        return splits
    to_str = (lambda v: [inner.int2str(x) for x in v]) if per_token else inner.int2str
    return splits.map(lambda b: {role: [to_str(v) for v in b[role]]}, batched=True)


_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _number(name: object) -> int | float | None:
    """The label's value when it is a number (int, float, or a string spelling one, such as "10" or "-0.5")."""
    if isinstance(name, bool):
        return None
    if isinstance(name, (int, float)):
        return name if math.isfinite(name) else None
    if isinstance(name, str) and _NUMBER.fullmatch(name):
        return float(name) if "." in name else int(name)
    return None


def label_order(names: Collection[object]) -> list:
    """The id order of a label set read from the data (data.labels not given), for `peftkit run` (data.load) and
    `peftkit init` (init/profile.py label_set, which writes it into the recipe as data.labels) alike:

    - every name a number (ints or floats, or strings spelling them: "-1", "2", "10", "0.5"): by value, 1, 2, 10.
      Numeric strings sort as numbers because data.load sees every label as a string: a csv column of ints and a
      json column of the same numbers written as strings must get the same ids;
    - otherwise as strings, with the tagging outside tag "O" first (id 0): "O", "B-LOC", "B-PER", "I-LOC", ...
      A set mixing numbers and words ("1", "10", "2", "other") sorts as strings.

    Ties ("1" and "01") keep string order. The names come back as given (ints stay ints). Each trained adapter
    stores its own label list (peftkit.json "labels"), so a change to this order only affects new runs."""
    values = [_number(name) for name in names]
    if values and all(v is not None for v in values):
        return sorted(names, key=lambda name: (_number(name), str(name)))
    return sorted(names, key=lambda name: (str(name) != "O", str(name)))


def _encode_labels(
    splits: DatasetDict,
    cfg: DataSection,
    role: str,
    per_token: bool = False,
    order: list[str] | None = None,
    many: bool = False,
) -> tuple[DatasetDict, list[str]]:
    """Map labels (one per row, or one per token when `per_token`) to ids in the label set's order (`order`, a
    trained run's, when given; labels outside it are unknown labels). `many`: each row holds a set of labels (a
    list, or text split at data.label_separator; none is a row without labels), encoded as one 0/1 float per label
    in id order, the targets of a sigmoid per label."""
    from datasets import ClassLabel, List, Value

    def items(value: Any) -> list:  # the labels one row carries
        if per_token:
            return value
        if many:
            return label_set(value, cfg.label_separator)
        return [value]

    splits = label_names(splits, role, per_token or many)
    if many and cfg.label_separator is None:
        _check_label_lists(splits, role)

    if isinstance(cfg.labels, dict):
        to_name = {str(raw): name for raw, name in cfg.labels.items()}
        names = list(dict.fromkeys(cfg.labels.values()))
    elif cfg.labels is not None:
        names = [str(v) for v in cfg.labels]
        to_name = {n: n for n in names}
    else:
        found = {str(x) for split in splits.values() for v in split[role] if v is not None for x in items(v)}
        names = label_order(found)
        to_name = {n: n for n in names}
        if order is None:
            log.info("labels read from the data: %s", ", ".join(names))
    if order is not None:
        names = list(order)
        to_name = {raw: name for raw, name in to_name.items() if name in names}

    unknown, bad_rows = Counter(), []
    for split in splits.values():
        for row, value in zip(split[ROW], split[role]):
            missing = ["(none)" if x is None else str(x) for x in items(value) if str(x) not in to_name]
            if missing:
                unknown.update(missing)
                bad_rows.append(row)
    if unknown:
        listed = ", ".join(f"'{v}' ({n:,})" for v, n in unknown.most_common(8))
        what = "sentence(s) have tags" if per_token else "row(s) have labels"
        if cfg.unknown_labels == "error":
            raise UserError(
                f"data: {len(bad_rows):,} {what} not in data.labels: {listed} (source rows {_rows(bad_rows)}). "
                "Add them to data.labels, or set data.unknown_labels: drop to leave those rows out"
            )
        dropped = "sentence(s) with tags" if per_token else "row(s) whose label is"
        log.info("data: dropped %s %s not in data.labels: %s", f"{len(bad_rows):,}", dropped, listed)
        splits = splits.filter(lambda b: [all(str(x) in to_name for x in items(v)) for v in b[role]], batched=True)

    label_id = {name: i for i, name in enumerate(names)}
    if many:

        def encode(value: Any) -> list[float]:
            ids = {label_id[to_name[str(x)]] for x in items(value)}
            return [float(i in ids) for i in range(len(names))]

        splits = splits.map(lambda b: {role: [encode(v) for v in b[role]]}, batched=True)
        return splits.cast_column(role, List(Value("float32"), length=len(names))), names
    encode = (lambda v: [label_id[to_name[str(x)]] for x in v]) if per_token else (lambda v: label_id[to_name[str(v)]])
    splits = splits.map(lambda b: {role: [encode(v) for v in b[role]]}, batched=True)
    label_feature = List(ClassLabel(names=names)) if per_token else ClassLabel(names=names)
    return splits.cast_column(role, label_feature), names


def label_set(value: Any, separator: str | None) -> list:
    """The labels of one multi-label row: a list as it is; text split at `separator` (spaces around each label
    dropped); nothing (None, an empty text or list) is a row with no label."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = value.split(separator) if separator is not None else [value]
        return [part.strip() for part in parts if part.strip()]
    return list(value)


def _check_label_lists(splits: DatasetDict, role: str) -> None:
    """Multi-label without data.label_separator: each row's labels must come as a list, not as text."""
    for split in splits.values():
        for row, value in zip(split[ROW], split[role]):
            if isinstance(value, str):
                raise UserError(
                    f"data: multi-label rows hold a list of labels, but source row {row} holds the text {value!r} "
                    f"in the label column; set data.label_separator to the text between its labels (e.g. '|' or "
                    "','), or give the labels as lists (JSON arrays)"
                )


def _target(value: object) -> float | None:
    """A regression target's value: a finite number, or text spelling one ("0.5", "1e-3"); else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _encode_numbers(splits: DatasetDict, cfg: DataSection, role: str) -> DatasetDict:
    """Regression: every row's label a number (float32); rows whose label is not one fail, naming them, or are
    dropped (data.unknown_labels)."""
    from datasets import Value

    column = cfg.columns.get(role, role)
    bad, values = [], Counter()
    for split in splits.values():
        for row, value in zip(split[ROW], split[role]):
            if _target(value) is None:
                bad.append(row)
                values["(empty)" if value is None else str(value)] += 1
    if bad:
        listed = ", ".join(f"{v!r} ({n:,})" for v, n in values.most_common(5))
        if cfg.unknown_labels == "error":
            raise UserError(
                f"data: {len(bad):,} row(s) have a '{column}' that is not a number, which a regression target must "
                f"be: {listed} (source rows {_rows(bad)}). Fix those rows, point data.columns.label at the numeric "
                "column, or set data.unknown_labels: drop to leave them out"
            )
        log.info("data: dropped %s row(s) whose '%s' is not a number: %s", f"{len(bad):,}", column, listed)
        splits = splits.filter(lambda b: [_target(v) is not None for v in b[role]], batched=True)
    splits = splits.map(lambda b: {role: [_target(v) for v in b[role]]}, batched=True)
    return splits.cast_column(role, Value("float32"))


def _make_splits(splits: DatasetDict, cfg: DataSection, stratify: str | None, group: str | None = None) -> DatasetDict:
    """Keep train/validation/test the source has; cut the missing ones from train with data.splits' shares.
    `group`: rows sharing this column's value stay in one split (QA: questions on one context)."""
    from datasets import DatasetDict

    if "train" not in splits:
        if len(splits) != 1:
            raise UserError(f"data: the source has splits {', '.join(splits)} but no 'train'")
        splits = DatasetDict({"train": next(iter(splits.values()))})
    result = {k: v for k, v in splits.items() if k in ("train", "validation", "test")}
    shares = cfg.splits
    to_cut = [n for n in ("test", "validation") if n not in result and getattr(shares, n) > 0]
    for i, name in enumerate(to_cut):
        train = result["train"]
        # train now holds its own share plus those of the splits still to cut: take this one's part of that
        fraction = getattr(shares, name) / (shares.train + sum(getattr(shares, n) for n in to_cut[i:]))
        if len(train) * fraction < 1:
            raise UserError(f"data: too few rows ({len(train)}) to cut a {name} split; add data or set data.splits")
        if group:
            result["train"], result[name] = _group_split(train, group, fraction, cfg.seed)
            continue
        try:
            cut = train.train_test_split(test_size=fraction, seed=cfg.seed, stratify_by_column=stratify)
        except ValueError:  # a class too small to stratify: fall back to a plain random split
            log.warning("data: a label is too rare to stratify the %s split; splitting at random", name)
            cut = train.train_test_split(test_size=fraction, seed=cfg.seed)
        result["train"], result[name] = cut["train"], cut["test"]
    # a split the source gave as it is keeps the source's order (SQuAD's: article by article): put it in a seeded
    # random order, as the cut splits are, so that data.max_samples keeps a sample of all of it
    for name in set(result) - set(to_cut) - ({"train"} if to_cut else set()):
        result[name] = result[name].shuffle(seed=cfg.seed)
    return DatasetDict({k: result[k] for k in ("train", "validation", "test") if k in result})


def _group_split(split: Dataset, column: str, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, cut): about `fraction` of the distinct values of `column`, with all their rows, go to cut."""
    import random

    values = split[column]
    groups = sorted(set(values))
    random.Random(seed).shuffle(groups)
    chosen = set(groups[: max(1, round(len(groups) * fraction))])
    if len(chosen) == len(groups):
        raise UserError(f"data: too few distinct '{column}' values ({len(groups)}) to cut a split from; add data")
    order = list(range(len(values)))
    random.Random(seed).shuffle(order)  # both sides in a random order, as train_test_split leaves its splits
    cut = [i for i in order if values[i] in chosen]
    rest = [i for i in order if values[i] not in chosen]
    return split.select(rest), split.select(cut)
