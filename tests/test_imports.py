"""The commands that need no model start without the heavy libraries: `peftkit --help`, `validate` and `schema`
run in a process where torch, transformers, peft, accelerate, datasets and bitsandbytes cannot be imported. A
module-level import of one of them in cli.py, recipe.py or anything they import fails here."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")

# Prepended to the code run in the subprocess: any import of those packages (or of their submodules) fails.
BLOCK = f"""
import sys

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} must not be imported here")
        return None

sys.meta_path.insert(0, _Refuse())
"""


def without_heavy(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` (with `args` as sys.argv[1:]) in a fresh interpreter in the repository root, heavy imports refused."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_the_block_refuses_the_heavy_libraries():
    result = without_heavy("import torch")
    assert result.returncode != 0 and "torch must not be imported here" in result.stderr


def test_cli_and_recipe_import_without_the_heavy_libraries():
    code = f"import peftkit.cli, peftkit.recipe, sys; assert not set({HEAVY!r}) & set(sys.modules); print('ok')"
    result = without_heavy(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--help"], "Parameter-efficient fine-tuning"),
        (["validate", "recipes/sentiment-lora.yaml"], "ok"),
        (["schema"], '"properties"'),
    ],
)
def test_commands_that_need_no_model_start_without_the_heavy_libraries(args, expected):
    code = "import runpy, sys; sys.argv[0] = 'peftkit'; runpy.run_module('peftkit', run_name='__main__')"
    result = without_heavy(code, *args)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
