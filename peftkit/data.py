"""Load a recipe's data into train / validation / test splits with the task's column roles and a label set.

    source file or Hub dataset -> rename columns to task roles -> check text -> encode labels -> split -> cap

Every problem a user can fix (missing file or column, labels outside the set, empty text, nothing left) is a
UserError naming the rows and the recipe key that fixes it.
"""

import logging
from collections import Counter

from peftkit import assets
from peftkit.errors import UserError, did_you_mean
from peftkit.recipe import DataSection

log = logging.getLogger("peftkit")

_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SPLIT_ALIASES = {"valid": "validation", "dev": "validation", "val": "validation"}
ROW = "source_row"  # 1-based row of the source split (a csv's data rows, after its header)


def load(cfg: DataSection, task):
    """(DatasetDict with train/validation/test, label names or None)."""
    splits = _read(cfg)
    splits = _select_columns(splits, cfg, task.COLUMNS)
    # remember each row's place in the source, so errors can name it after filtering and splitting
    splits = splits.__class__({k: v.add_column(ROW, list(range(1, len(v) + 1))) for k, v in splits.items()})
    labels = None
    if task.LABEL_ROLE:
        splits, labels = _encode_labels(splits, cfg, task.LABEL_ROLE)
    _check_text(splits)
    splits = _make_splits(splits, cfg, stratify=task.LABEL_ROLE)
    if cfg.max_samples:
        splits = splits.__class__({k: v.select(range(min(cfg.max_samples, len(v)))) for k, v in splits.items()})
    for name, split in splits.items():
        if len(split) == 0:
            raise UserError(f"data: the {name} split is empty; give it a larger share in data.splits or add data")
    log.info("data: %s", ", ".join(f"{k} {len(v):,}" for k, v in splits.items()))
    return splits, labels


def _read(cfg: DataSection):
    from datasets import DatasetDict, load_dataset

    path = assets.resolve_file(cfg.source) if cfg.format != "hub" else None
    if path is None:
        try:
            loaded = load_dataset(cfg.source, cfg.subset)
        except Exception as err:  # the Hub client raises many types; all mean "could not get it"
            raise assets.hub_error("data.source", cfg.source, err) from None
        return DatasetDict({_SPLIT_ALIASES.get(k, k): v for k, v in loaded.items()})
    fmt = cfg.format if cfg.format != "auto" else _format_of(path)
    builder, options = {"csv": ("csv", {}), "tsv": ("csv", {"sep": "\t"}), "json": ("json", {}),
                        "parquet": ("parquet", {})}[fmt]  # fmt: skip
    if builder == "csv":
        options["encoding"] = cfg.encoding
    try:
        return load_dataset(builder, data_files={"train": str(path)}, **options)
    except Exception as err:
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        hint = " Set data.encoding (e.g. latin-1)." if isinstance(cause, UnicodeDecodeError) else ""
        raise UserError(f"data.source: could not read {path} as {fmt}: {cause}.{hint}") from None


def _format_of(path) -> str:
    name = path.name.lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise UserError(f"data.source: cannot tell the format of {path.name}; set data.format to csv, tsv, json or parquet")


def _select_columns(splits, cfg: DataSection, roles: dict[str, bool]):
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


def _check_text(splits):
    for name, split in splits.items():
        for column in ("text", "text_pair"):
            if column not in split.column_names:
                continue
            bad = [row for row, t in zip(split[ROW], split[column]) if t is None or not str(t).strip()]
            if bad:
                rows = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
                raise UserError(
                    f"data: {len(bad)} row(s) have an empty '{column}' (source rows {rows}, counted from 1 after "
                    f"any header); remove or fill them"
                )


def _encode_labels(splits, cfg: DataSection, role: str):
    from datasets import ClassLabel

    # A Hub dataset's ClassLabel column: work with its names, like any text label.
    feature = splits[next(iter(splits))].features[role]
    if isinstance(feature, ClassLabel):
        splits = splits.map(lambda b: {role: [feature.int2str(v) for v in b[role]]}, batched=True)

    if isinstance(cfg.labels, dict):
        to_name = {str(raw): name for raw, name in cfg.labels.items()}
        names = list(dict.fromkeys(cfg.labels.values()))
    elif cfg.labels is not None:
        names = [str(v) for v in cfg.labels]
        to_name = {n: n for n in names}
    else:
        names = sorted({str(v) for split in splits.values() for v in split[role] if v is not None})
        to_name = {n: n for n in names}
        log.info("labels read from the data: %s", ", ".join(names))

    unknown = Counter(str(v) for split in splits.values() for v in split[role] if str(v) not in to_name)
    if unknown:
        listed = ", ".join(f"'{v}' ({n:,})" for v, n in unknown.most_common(8))
        if cfg.unknown_labels == "error":
            raise UserError(
                f"data: {sum(unknown.values()):,} row(s) have labels not in data.labels: {listed}. Add them to "
                "data.labels, or set data.unknown_labels: drop to leave those rows out"
            )
        log.info("data: dropped %s row(s) whose label is not in data.labels: %s", f"{sum(unknown.values()):,}", listed)
        splits = splits.filter(lambda b: [str(v) in to_name for v in b[role]], batched=True)

    label_id = {name: i for i, name in enumerate(names)}
    splits = splits.map(lambda b: {role: [label_id[to_name[str(v)]] for v in b[role]]}, batched=True)
    return splits.cast_column(role, ClassLabel(names=names)), names


def _make_splits(splits, cfg: DataSection, stratify: str | None):
    """Keep train/validation/test the source has; cut the missing ones from train with data.splits' shares."""
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
        try:
            cut = train.train_test_split(test_size=fraction, seed=cfg.seed, stratify_by_column=stratify)
        except ValueError:  # a class too small to stratify: fall back to a plain random split
            log.warning("data: a label is too rare to stratify the %s split; splitting at random", name)
            cut = train.train_test_split(test_size=fraction, seed=cfg.seed)
        result["train"], result[name] = cut["train"], cut["test"]
    return DatasetDict({k: result[k] for k in ("train", "validation", "test") if k in result})
