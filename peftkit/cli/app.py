"""The `peftkit` command itself: the Typer app, its consoles and shared argument types, and `main`, which maps
errors to exit codes (2: a problem the user can fix)."""

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from typer.models import OptionInfo

from peftkit import launch
from peftkit.errors import UserError, is_out_of_memory

if TYPE_CHECKING:
    pass

app = typer.Typer(
    help="Parameter-efficient fine-tuning from a YAML recipe.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console(soft_wrap=True)  # long paths and messages stay whole (and greppable)
errors = Console(stderr=True, soft_wrap=True)

Overrides = Annotated[Optional[list[str]], typer.Argument(help="section.key=value overrides, e.g. train.epochs=1")]
RunDir = Annotated[
    Path,
    typer.Argument(
        help="A finished run folder (what `peftkit run` printed), or a pushed adapter: "
        "user/name[@revision] from --hub-dir or the Hugging Face Hub."
    ),
]
HubDir = Annotated[
    Optional[Path],
    typer.Option(
        help="Local directory hub to pull user/name from (default: $PEFTKIT_HUB_DIR), before the Hugging Face Hub."
    ),
]


def overwrite_option(what: str) -> OptionInfo:
    """The --overwrite option (alias --force) of a command that refuses to replace an existing `what`."""
    return typer.Option("--overwrite", "--force", help=f"Replace an existing {what}.")


def quiet_libraries() -> None:
    """peftkit reports what matters itself; the libraries' own progress bars and load reports are noise."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # the libraries warning each other of renames
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes' 8-bit matmul logs "inputs will be cast ... to float16" on every call, as a warning; and on CPUs
    # with AVX512-BF16 its import asks the `kernels` package for a Hub build of its 4-bit CPU kernel, and logs the
    # refusal when offline or unverified ("Failed to load CPU gemm_4bit_forward", "Skipping publisher trust check"):
    # it then runs its own built-in kernel, the one peftkit's 4-bit numbers were measured with
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """The `peftkit` entry point (`argv`: the arguments, for running it inside another program or a test)."""
    from rich.logging import RichHandler

    handler = RichHandler(console=errors, show_path=False, show_time=False, markup=False)
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("peftkit")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        app(args=argv, prog_name="peftkit")
    except Exception as err:
        if is_out_of_memory(err):
            err = UserError(
                f"out of memory ({err}). Lower eval.batch_size (eval, predict) or use a machine with "
                "more memory (merge holds the base in full precision)"
            )
        # in a process of `peftkit run --processes N`: kept for the launcher, which reports the job's failure
        if launch.record_failure(err):
            sys.exit(2 if isinstance(err, UserError) else 1)
        if not isinstance(err, UserError):
            raise
        errors.print(f"error: {err}", markup=False, style="red")
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print("interrupted: nothing was exported (an unfinished run keeps its .partial folder)")
        sys.exit(130)
    finally:
        logger.removeHandler(handler)
