"""What a data file holds, for `peftkit init` (designer.py): each column's kind, which column plays which role,
the task that fits, and the label set with its counts. The file is read through data.py's readers, so init sees it
exactly as `peftkit run` will.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import assets, data
from peftkit.errors import UserError, did_you_mean
from peftkit.sections import DataSection
from peftkit.tasks import TASKS
from peftkit.tasks.causal_lm import CHAT_ROLES

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

LABEL_NAMES = ("label", "labels", "category", "class", "sentiment", "target", "intent", "topic", "emotion", "stance")
SCORE_NAMES = (*LABEL_NAMES, "score", "rating", "confidence")  # a column of fractional numbers so named: regression
MAX_CLASSES = 100  # a column with more distinct values is not taken for a label


@dataclass
class Column:
    """What a data column holds, from a sample of its rows."""

    name: str
    kind: str  # text, number, list, chat (lists of {role, content} or {from, value} objects), dict, empty
    distinct: int  # distinct values; of a list column, distinct elements
    mean_chars: float = 0.0  # of a text column, its values; of a list column, its text elements
    whole: bool = True  # a number column: every value a whole number (a class id, not a score)

    def describe(self) -> str:
        if self.kind == "text":
            return f"{self.name} (text, {self.distinct:,} distinct, mean {self.mean_chars:.0f} characters)"
        if self.kind == "chat":
            return f"{self.name} (conversations: lists of messages)"
        return f"{self.name} ({self.kind}, {self.distinct:,} distinct)"


def read_data(source: str, encoding: str | None) -> tuple[DatasetDict, str | None]:
    """(the source's splits, data.format to write or None): through data.py's readers, so init reads a file
    exactly as `peftkit run` will. A text file of `token tag` lines with an extension data.py does not know
    (e.g. WNUT's ner.txt) is recognised as CoNLL."""
    path = assets.resolve_file(source)
    fmt = None
    if path is not None:
        if path.is_dir():
            raise UserError(f"{source} is a folder; give a data file (csv, tsv, json, jsonl, parquet, conll)")
        try:
            data.format_of(path)
        except UserError:
            if not _looks_like_conll(path):
                raise
            fmt = "conll"
    try:
        given = {"encoding": encoding} if encoding else {}  # else the schema's default
        splits = data.read_source(DataSection(source=source, format=fmt or "auto", **given))
    except UserError as err:
        if "data.encoding" in str(err):  # the recipe key; on this command line it is an option
            raise UserError(f"{err} (here: peftkit init --encoding ENCODING)") from None
        raise
    if all(len(split) == 0 for split in splits.values()):
        raise UserError(f"{source} holds no data rows")
    return splits, fmt


def _looks_like_conll(path: Path) -> bool:
    """Most non-blank lines of the first few hundred have 2+ whitespace-separated fields, and blank lines
    separate sentences."""
    opened = data.open_binary(path)
    if opened is None:
        return False
    lines = []
    with opened as f:
        for _, raw in zip(range(400), f):
            lines.append(raw.decode("utf-8", errors="replace").split())
    filled = [fields for fields in lines if fields]
    return bool(filled) and len(filled) < len(lines) and sum(len(f) >= 2 for f in filled) >= 0.95 * len(filled)


def profile(split: Dataset) -> dict[str, Column]:
    """Each column's kind and number of distinct values, from the rows given (init passes a sample
    of up to 5,000)."""
    columns = {}
    for name in split.column_names:
        values = [v for v in split[name] if v is not None]
        if not values:
            columns[name] = Column(name, "empty", 0)
        elif all(isinstance(v, str) for v in values):
            columns[name] = Column(name, "text", len(set(values)), sum(map(len, values)) / len(values))
        elif all(isinstance(v, (bool, int, float)) for v in values):
            whole = all(isinstance(v, (bool, int)) or float(v).is_integer() for v in values)
            columns[name] = Column(name, "number", len(set(values)), whole=whole)
        elif all(isinstance(v, list) for v in values):
            items = [x for v in values for x in v]
            if items and all(isinstance(x, dict) and ("role" in x or "from" in x) for x in items):
                columns[name] = Column(name, "chat", len(values))  # OpenAI-style or ShareGPT messages
                continue
            texts = [x for x in items if isinstance(x, str)]
            mean = sum(map(len, texts)) / len(texts) if texts else 0.0
            columns[name] = Column(name, "list", len({x for x in items if isinstance(x, (str, int))}), mean)
        else:
            columns[name] = Column(name, "dict", 0)
    return columns


def _label_like(column: Column, rows: int) -> bool:
    """Could be a class label: few distinct values, each short, and not fractional numbers; or a list column of
    few distinct short strings (a label set per row: multi-label); or fractional numbers under a label's or a
    score's name (a regression target)."""
    few = 2 <= column.distinct <= min(MAX_CLASSES, max(2, rows // 10))
    if column.kind in ("text", "list"):
        return few and column.mean_chars <= 40
    if column.kind == "number":
        return few if column.whole else column.name.lower() in SCORE_NAMES
    return False


def problem_type(column: Column) -> str:
    """classification's task.problem_type for a label column: a list of labels per row is multi_label, a
    fractional number regression, anything else single_label."""
    if column.kind == "list":
        return "multi_label"
    return "regression" if column.kind == "number" and not column.whole else "single_label"


def _label_candidates(
    columns: dict[str, Column], values: Callable[[str], Sequence[Any]], given: dict[str, str]
) -> list[Column]:
    rows = len(values(next(iter(columns))))
    return [c for c in columns.values() if c.name not in given.values() and _label_like(c, rows)]


def _check_columns(given: dict[str, str], available: list[str]) -> None:
    for role, name in given.items():
        if name not in available:
            raise UserError(
                f"column '{name}' (for {role}) is not in the data{did_you_mean(name, available)}; the "
                f"data has columns: {', '.join(available)}"
            )


def assign_roles(
    columns: dict[str, Column], values: Callable[[str], Sequence[Any]], task: str | None, given: dict[str, str]
) -> tuple[str, dict[str, str], dict[str, str]]:
    """(task, role -> column, why) from the columns' names and contents; `given` (the column options) wins.
    `values(name)` returns a column's sampled values."""
    _check_columns(given, list(columns))
    if task is not None and task not in TASKS:
        raise UserError(f"--task {task}: unknown task{did_you_mean(task, TASKS)}; choose one of: {', '.join(TASKS)}")
    all_roles = {role for t in TASKS.values() for role in t.COLUMNS}
    unknown = [role for role in given if role not in all_roles]
    if unknown:
        raise UserError(
            f"--column {unknown[0]}=...: no task reads a role '{unknown[0]}'"
            f"{did_you_mean(unknown[0], all_roles)}; roles: {', '.join(sorted(all_roles))}"
        )
    named = {role: given.get(role, role) for role in all_roles if given.get(role, role) in columns}
    why = {role: "given" for role in given}
    if task is None:
        task = _infer_task(columns, values, named, given)
    if task == "token_classification":
        roles = _list_roles(columns, named, given)
    elif task == "question_answering":
        roles = {r: named[r] for r in ("question", "context", "answers", "id") if r in named}
        missing = [r for r in ("question", "context", "answers") if r not in roles]
        if missing:
            raise UserError(
                f"question answering needs question, context and answers columns; {', '.join(missing)} "
                f"not found. Map them with --column ROLE=COLUMN; the data has columns: "
                f"{', '.join(columns)}"
            )
    elif task == "causal_lm" and (chat := _chat_column(columns, named)):
        roles = dict([chat])
    elif task == "causal_lm" and "prompt" in named and "response" in named:
        roles = {"prompt": named["prompt"], "response": named["response"]}
    else:
        roles = {}
        if task == "classification":
            roles["label"], why["label"] = _label_column(columns, values, given)
            if "text_pair" in named:
                roles["text_pair"] = named["text_pair"]
        text, why["text"] = _text_column(columns, values, given, set(roles.values()))
        roles = {"text": text, **roles}
    bad = [r for r in given if r not in TASKS[task].COLUMNS]
    if bad:
        raise UserError(
            f"a column was given for the role '{bad[0]}', which task {task} does not read; it reads: "
            f"{', '.join(TASKS[task].COLUMNS)}"
        )
    return task, roles, why


def _infer_task(
    columns: dict[str, Column],
    values: Callable[[str], Sequence[Any]],
    named: dict[str, str],
    given: dict[str, str],
) -> str:
    lists = [c for c in columns.values() if c.kind == "list"]
    if "tokens" in named and "tags" in named or len(lists) == 2 and not given:
        return "token_classification"
    if all(r in named for r in ("question", "context", "answers")):
        return "question_answering"
    if _chat_column(columns, named):
        return "causal_lm"  # conversations: chat tuning
    if "prompt" in named and "response" in named:
        return "causal_lm"
    if "label" in given:
        return "classification"
    candidates = _label_candidates(columns, values, given)
    if not candidates:
        return "causal_lm"  # text and nothing to classify it by: learn to continue the text
    if len(candidates) > 1 and not any(c.name.lower() in LABEL_NAMES for c in candidates):
        listed = ", ".join(c.describe() for c in candidates)
        raise UserError(
            f"cannot tell the task from the data: several columns could be a class label ({listed}). "
            "Pass --label-column COLUMN for classification, or --task causal_lm to train a language "
            f"model on the text; the data has columns: {', '.join(columns)}"
        )
    return "classification"


def _chat_column(columns: dict[str, Column], named: dict[str, str]) -> tuple[str, str] | None:
    """(causal_lm's role, the column) for conversations: a column mapped to `messages` or `conversations`, else
    the one column holding lists of message objects (any name; mapped to `messages`, which reads both styles)."""
    for role in CHAT_ROLES:
        if role in named and columns[named[role]].kind == "chat":
            return role, named[role]
    chats = [c.name for c in columns.values() if c.kind == "chat"]
    return ("messages", chats[0]) if len(chats) == 1 else None


def _list_roles(columns: dict[str, Column], named: dict[str, str], given: dict[str, str]) -> dict[str, str]:
    if "tokens" in named and "tags" in named:
        return {"tokens": named["tokens"], "tags": named["tags"]}
    lists = sorted((c for c in columns.values() if c.kind == "list"), key=lambda c: c.distinct)
    if len(lists) != 2:
        raise UserError(
            "token classification needs a column of tokens and one of tags (lists, one tag per token; "
            "or a CoNLL file); map them with --column tokens=COLUMN --column tags=COLUMN. The data has "
            f"columns: {', '.join(c.describe() for c in columns.values())}"
        )
    return {"tokens": lists[1].name, "tags": lists[0].name}  # the tag set is the smaller vocabulary


def _label_column(
    columns: dict[str, Column], values: Callable[[str], Sequence[Any]], given: dict[str, str]
) -> tuple[str, str]:
    if "label" in given:
        return given["label"], "given"
    candidates = _label_candidates(columns, values, given)
    if not candidates:
        raise UserError(
            "classification needs a label column (few distinct values), and none was found: "
            f"{', '.join(c.describe() for c in columns.values())}. Pass --label-column COLUMN"
        )
    by_name = [c for c in candidates if c.name.lower() in LABEL_NAMES]
    if len(candidates) > 1 and not by_name:
        raise UserError(
            f"several columns could be the label: {', '.join(c.describe() for c in candidates)}; "
            "pass --label-column COLUMN"
        )
    chosen = (by_name or candidates)[0]
    others = [c.name for c in candidates if c is not chosen]
    found = {"multi_label": f"lists of {chosen.distinct} distinct labels", "regression": "fractional numbers"}
    reason = found.get(problem_type(chosen), f"{chosen.distinct} distinct values")
    reason += " and a label's name" if by_name else ""
    if others:
        reason += f"; {', '.join(others)} could be one too (--label-column)"
    return chosen.name, reason


def _text_column(
    columns: dict[str, Column], values: Callable[[str], Sequence[Any]], given: dict[str, str], taken: set[str]
) -> tuple[str, str]:
    if "text" in given:
        return given["text"], "given"
    rows = len(values(next(iter(columns))))
    texts = [c for c in columns.values() if c.kind == "text" and c.name not in taken and not _label_like(c, rows)]
    if not texts:
        raise UserError(
            "no usable text column (strings with many distinct values) in the data: "
            f"{', '.join(c.describe() for c in columns.values())}. Pass --text-column COLUMN"
        )
    longest = max(texts, key=lambda c: c.mean_chars)
    return longest.name, f"the longest text column, mean {longest.mean_chars:.0f} characters"


def label_set(splits: DatasetDict, role: str, per_token: bool) -> tuple[list, Counter, int]:
    """(labels in id order, count of each, rows without a label), over every row of every split."""
    splits = data.label_names(splits, role, per_token)  # what `peftkit run` will see: names, not ClassLabel ids
    counts, missing = Counter(), 0
    for split in splits.values():
        for value in split[role]:
            if value is None:
                missing += 1
                continue
            counts.update(value if per_token else [value])
    return data.label_order(counts), counts, missing  # the order `peftkit run` gives the same set
