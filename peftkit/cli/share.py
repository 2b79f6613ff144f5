"""Sharing a finished run: push (to the Hugging Face Hub or a local directory hub)."""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from peftkit.cli.app import app, console, errors


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    repo: Annotated[str, typer.Option(help="Target repo, user/name (your user or organisation first).")],
    private: Annotated[
        bool, typer.Option(help="Create the Hub repo private (an existing repo keeps its visibility).")
    ] = False,
    revision: Annotated[
        Optional[str], typer.Option(help="Branch to push to (created if missing); default main.")
    ] = None,
    hub_dir: Annotated[
        Optional[Path],
        typer.Option(help="Push to this local directory hub (DIR/user/name/revision) instead of the Hub."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="List the files and sizes that would be uploaded, and where; upload nothing.")
    ] = False,
    message: Annotated[Optional[str], typer.Option(help="Commit message.")] = None,
) -> None:
    """Upload a run's adapter with a generated model card (metadata, recipe, results, training curve) to the Hugging
    Face Hub (token: HF_TOKEN or `hf auth login`) or to a local directory hub."""
    from peftkit.sharing import hub

    report = hub.push(
        run_dir, repo, private=private, revision=revision, hub_dir=hub_dir, dry_run=dry_run, message=message
    )
    for note in report["notes"]:
        errors.print(f"note: {note}", markup=False)
    table = Table("file", "bytes")
    for name, size in report["files"]:
        table.add_row(name, f"{size:,}")
    console.print(table)
    total = sum(size for _, size in report["files"])
    verb = "would upload" if dry_run else "pushed"
    console.print(f"{verb} {len(report['files'])} files ({total:,} bytes) to [bold]{report['destination']}[/]")
