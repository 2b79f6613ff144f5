"""The recipe `peftkit init` designs (init/designer.py) as a record of decisions, and its YAML text: every key
with the comment that says why, checked with load_recipe before it is written atomically."""

import os
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import UserError
from peftkit.recipe import load_recipe


@dataclass
class Design:
    """Every decision, with the facts behind it; `spec` is the recipe as a mapping, `notes` the comments."""

    spec: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # (section, key[, "before"]) -> comment; (section,) -> lines atop
    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def set(self, section: str, key: str, value: Any, why: str | None = None, before: tuple[str, ...] = ()) -> None:
        """`why`: the comment on the key's line (or above it, when long); `before`: comment lines above it."""
        self.spec.setdefault(section, {})[key] = value
        if why:
            self.notes[(section, key)] = why
        if before:
            self.notes[(section, key, "before")] = list(before)

    def explain(self, section: str, *lines: str) -> None:
        self.notes.setdefault((section,), []).extend(lines)


# --- the YAML text -------------------------------------------------------------------------------------------------


def _flow(value: object) -> str:
    """One YAML value on one line, quoted where YAML would misread it ('no', '1.0', 'null')."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _comment_lines(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 116 - len(indent), break_on_hyphens=False)]


def render(d: Design, out: Path) -> str:
    lines = [
        f"# peftkit run {out}",
        "#",
        *_comment_lines(
            "Written by `peftkit init` from the data and the model below. Each setting's comment "
            "says what in the data, the model or this machine it comes from; every key not set "
            "here takes its schema default (`peftkit schema` lists them all).",
            "",
        ),
    ]
    for section in ("model", "data", "task", "method", "quantization", "train", "eval"):
        if section not in d.spec:
            continue
        lines += ["", f"{section}:"]
        lines += _comment_lines_all(d.notes.get((section,), []))
        for key, value in d.spec[section].items():
            entry = f"  {key}: {_flow(value)}"
            if len(entry) > 118 and isinstance(value, list):  # a flow list may continue on indented lines
                entry = "\n".join(
                    textwrap.wrap(entry, 118, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
                )
            lines += _comment_lines_all(d.notes.get((section, key, "before"), []))
            note = d.notes.get((section, key))
            if note and len(entry) < 34 and len(note) < 84:
                entry = f"{entry:<34} # {note}"
            elif note:
                lines += _comment_lines(note, "  ")
            lines.append(entry)
    return "\n".join(lines) + "\n"


def _comment_lines_all(notes: list[str]) -> list[str]:
    return [line for note in notes for line in _comment_lines(note, "  ")]


def write(d: Design, out: Path, force: bool) -> Path:
    """Write the recipe atomically, after checking that it validates and reads back as designed (a failure
    there is a bug in the designer, not the user's)."""
    import yaml

    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it, or choose another file with --out")
    text = render(d, out)
    if yaml.safe_load(text) != d.spec:
        raise RuntimeError(f"peftkit init wrote a recipe that does not read back as designed:\n{text}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".peftkit-init-") as tmp:
        draft = Path(tmp) / out.name  # same name, so the recipe's default name (the file's stem) is the same
        draft.write_text(text, encoding="utf-8")
        try:
            load_recipe(draft)
        except UserError as err:
            raise RuntimeError(f"peftkit init designed a recipe that does not validate ({err}):\n{text}") from None
        os.replace(draft, out)
    return out
