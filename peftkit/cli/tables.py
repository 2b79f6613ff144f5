"""What the commands print: a run's scores with its warnings, prediction cells, one progress bar over many runs."""

from typing import TYPE_CHECKING

from rich.table import Table

from peftkit.cli.app import console, errors

if TYPE_CHECKING:
    from rich.progress import Progress


def metrics_table(metrics: dict, splits: list[str]) -> None:
    """The splits' scores as a table (every split's columns: a collapse adds some to one split only), then the
    run's warnings, in red: a run that learned nothing must not end looking like one that did."""
    names = list(dict.fromkeys(k for s in splits for k, v in metrics[s].items() if isinstance(v, float)))
    names = [k for k in names if k != "collapsed_share"]  # said in the warning
    table = Table("split", *names)
    for split in splits:
        values = metrics[split]
        table.add_row(split, *[f"{values[k]:.4f}" if isinstance(values.get(k), float) else "-" for k in names])
    console.print(table)
    from rich.markup import escape

    for warning in metrics.get("warnings", []):
        console.print(f"[bold red]WARNING[/] {escape(warning)}", highlight=False)


def cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):  # multi-label probabilities: "sports 0.912, politics 0.103"
        return ", ".join(f"{k} {v:.3f}" for k, v in value.items())
    if isinstance(value, list):  # entities: "Empire State Building (facility); ..."
        return "; ".join(f"{e['text']} ({e['type']})" if isinstance(e, dict) else str(e) for e in value) or "-"
    return str(value)


def runs_progress() -> "Progress":
    """bench and sweep: one bar over their runs, on stderr, with the run in progress named."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=errors)
