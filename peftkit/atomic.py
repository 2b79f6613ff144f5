"""Outputs that appear complete or not at all: everything is written into `<target>.partial` and renamed to
`<target>` in one step at the end, so a folder without the suffix was always finished."""

import contextlib
import shutil
from pathlib import Path

from peftkit.errors import UserError


@contextlib.contextmanager
def building(target: Path, overwrite: bool, keep_failed: bool = False, resume: bool = False):
    """Yield the folder to write into. On success it becomes `target` (replacing an old one if `overwrite`);
    on failure it is deleted, or kept under its .partial name (for inspection, or to `resume` into) when
    `keep_failed`."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite (or --force) to replace it, or choose another output folder")
    if partial.exists() and not resume:
        if not overwrite:
            fix = "--resume to continue it from its last checkpoint, or --overwrite to start over"
            raise UserError(f"{partial} holds an unfinished earlier run or export; pass "
                            + (fix if keep_failed else "--overwrite to start over"))  # fmt: skip
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


def write_text(path: Path, text: str) -> None:
    """Write a file through a temporary name, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
