"""The `peftkit` command: the app (app.py) and its commands, grouped as a user meets them: design and train a
recipe (train.py), use a finished run (use.py), compare runs (experiments.py), share one (share.py); what they
print, apart (tables.py). Commands parse, call and print; the work is in the modules they call."""

from peftkit.cli.app import app, main

# importing a module registers its commands, in the order `peftkit --help` lists them
# isort: off
from peftkit.cli import train  # noqa: E402, F401
from peftkit.cli import use  # noqa: E402, F401
from peftkit.cli import experiments  # noqa: E402, F401
from peftkit.cli import share  # noqa: E402, F401
# isort: on

__all__ = ["app", "main"]
