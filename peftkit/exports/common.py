"""What the export formats share: the run's merged model (through `peftkit merge`'s own code, verified as it
verifies), the check that the format's libraries are installed, and the texts the exports are verified on."""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peftkit.errors import UserError
from peftkit.export import merge

INSTALL = 'pip install "peftkit[export]"'

# verification prompts: ordinary text, so the comparison covers the logits a user would see (lossy dtypes are
# judged on these, not on random token ids)
PROMPTS = [
    "The movie was",
    "A quiet, moving film about a family that",
    "I would not recommend this to anyone, because the plot",
    "Question: what is the capital of France? Answer:",
]


def require(*modules: str) -> None:
    """A clear error naming the install command when a format's library is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"this export needs {', '.join(missing)}, which is not installed: {INSTALL}")


@contextlib.contextmanager
def merged_folder(run_dir: Path) -> Iterator[tuple[Path, dict]]:
    """(folder, merge report): the run's adapter merged into its base by `peftkit merge` (verified merged vs
    unmerged there) and saved as a standalone model in a temporary folder, deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="peftkit-export-") as work:
        folder = Path(work) / "merged"
        report = merge(run_dir, folder)
        yield folder, report
