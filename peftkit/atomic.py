"""Outputs that appear complete or not at all: everything is written into `<target>.partial` and renamed to
`<target>` in one step at the end, so a folder without the suffix was always finished."""

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from peftkit.errors import UserError


@contextlib.contextmanager
def building(target: Path, overwrite: bool, keep_failed: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield the folder to write into. On success it becomes `target` (replacing an old one if `overwrite`);
    on failure it is deleted, or kept under its .partial name (for inspection, or to `resume` into) when
    `keep_failed`."""
    target = Path(target)
    partial = partial_of(target)
    check(target, overwrite, keep_failed, resume)
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=resume)
    try:
        yield partial
    except BaseException:
        if not keep_failed:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing_file(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield the path to write one file into (`<target>.partial`, in the same folder, so the rename is atomic).
    On success it becomes `target` (replacing an old one if `overwrite`); on failure it is deleted."""
    target = Path(target)
    partial = partial_of(target)
    check_file(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)  # left by a killed earlier attempt: a file is cheap to write again
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)


def check_file(target: Path, overwrite: bool) -> None:
    """Refuse, with the fix, to replace an existing output file without being told to."""
    if Path(target).exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite (or --force) to replace it, or choose another name")


def partial_of(target: Path) -> Path:
    return Path(target).with_name(Path(target).name + ".partial")


def check(target: Path, overwrite: bool, keep_failed: bool = False, resume: bool = False) -> None:
    """Refuse, with the fix, to replace a finished folder or an unfinished one without being told to."""
    target, partial = Path(target), partial_of(target)
    if target.exists() and not overwrite:
        raise UserError(
            f"{target} already exists; pass --overwrite (or --force) to replace it, or choose another output folder"
        )
    if partial.exists() and not resume and not overwrite:
        fix = "--resume to continue it from its last checkpoint, or --overwrite to start over"
        raise UserError(
            f"{partial} holds an unfinished earlier run or export; pass "
            + (fix if keep_failed else "--overwrite to start over")
        )


def write_text(path: Path, text: str) -> None:
    """Write a file through a temporary name, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
