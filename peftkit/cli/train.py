"""Commands that design, check and train a recipe: init, validate, schema, estimate, run. Heavy libraries are
imported inside them, so `peftkit --help`, `validate` and `schema` start fast."""

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from peftkit import launch
from peftkit.cli.app import Overrides, app, console, errors, overwrite_option, quiet_libraries
from peftkit.cli.tables import metrics_table
from peftkit.errors import UserError


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    overrides: Overrides = None,
    overwrite: Annotated[bool, overwrite_option("run folder of the same name")] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run (its .partial folder) from its newest checkpoint.")
    ] = False,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Data parallelism: train in N processes (N GPUs, or N CPU processes), "
            "started with torchrun. train.batch_size is per process.",
        ),
    ] = 1,
) -> None:
    """Train the recipe's method on its task and data, evaluate, and export the adapter."""
    from peftkit.recipe import load_recipe

    parsed = load_recipe(recipe, overrides or [])
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # not yet inside a launched process
        from peftkit import atomic, tracking

        atomic.check(parsed.output_dir, overwrite, keep_failed=True, resume=resume)  # before N processes start
        tracking.check_installed(parsed.train.report_to)

        flags = ["--overwrite"] * overwrite + ["--resume"] * resume
        try:
            launch.launch(processes, ["run", str(recipe), *(overrides or []), *flags])
        except launch.ProcessFailed as failed:  # said first; then its traceback, and what became of the others
            errors.print(f"error: {failed}", markup=False, style="red")
            errors.print(failed.details, markup=False, highlight=False)
            raise typer.Exit(failed.code) from None
        return
    if "WORLD_SIZE" in os.environ:
        launch.die_with_launcher()
    quiet_libraries()
    from peftkit.run import run as run_recipe

    report = run_recipe(parsed, overwrite=overwrite, resume=resume)
    if report is None:  # another process than the main one of a distributed run: the main one reports
        return
    metrics_table(report.metrics, parsed.eval.splits)
    console.print(f"run folder: [bold]{report.output}[/]  (adapter in {report.output / 'adapter'})")


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="Recipe files to check.")]) -> None:
    """Check recipes against the schema; every problem in a file is reported at once."""
    from peftkit.recipe import load_recipe

    failed = 0
    for file in files:
        try:
            load_recipe(file)
            console.print(f"[green]ok[/] {file}")
        except UserError as err:
            failed += 1
            errors.print(f"error: {err}", markup=False, style="red")
    if failed:
        raise typer.Exit(2)


@app.command()
def schema(
    output: Annotated[Optional[Path], typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the recipe schema as JSON Schema (for editor completion and validation)."""
    from peftkit.recipe import json_schema

    text = json_schema()
    if output:
        output.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)


@app.command()
def estimate(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    overrides: Overrides = None,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="As `peftkit run --processes N`: each process holds the whole model, or its shard under "
            "train.distributed.strategy=fsdp.",
        ),
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
) -> None:
    """Will it fit? The peak memory per process of `peftkit run RECIPE`, predicted from the model's config on the
    meta device (no weights loaded, no training): weights, trainables, gradients, optimizer, activations, runtime."""
    from peftkit.recipe import load_recipe

    parsed = load_recipe(recipe, overrides or [])
    quiet_libraries()
    from peftkit import estimate as estimating

    result = estimating.estimate(parsed, processes)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    facts = result.facts
    table = Table("part", "MiB", "what")
    about = {
        "runtime": "torch, transformers, peft, data; measured in this process"
        if result.device == "cpu"
        else "CUDA context (typical)",
        "base weights": f"frozen: {facts['bits']}-bit linear layers, the rest {facts['base_dtype']}"
        if facts["bits"]
        else f"frozen, {facts['base_dtype']}",
        "trainable": f"{facts['trainable_params']:,} fp32 parameters (and the best evaluation's copy)",
        "gradients": "fp32" + (", and DDP's buckets" if processes > 1 and facts["shard"] == 1 else ""),
        "optimizer": "AdamW: two fp32 states per trainable parameter",
        "activations": f"peak of a {facts['peak_phase']}: batch {facts['batch_size']} (eval "
        f"{facts['eval_batch_size']}) x {facts['length']} tokens, {facts['precision']}, {facts['attention']}"
        + (", gradient checkpointing" if facts["gradient_checkpointing"] else ""),
        "allocator": "freed temporaries the C heap keeps resident (CPU)",
        "oneDNN": "bf16 matmul primitives kept for reuse, at most 128 (CPU)",
    }
    for part, mib in result.parts.items():
        table.add_row(part, f"{mib:,.0f}", about[part])
    table.add_row("[bold]total per process[/]", f"[bold]{result.total_mib:,.0f}[/]", "")
    console.print(table)
    console.print(f"tokens per row: {facts['length']}, {facts['length_source']}", highlight=False)
    for note in result.notes:
        console.print(note, highlight=False)
    where = "free on the GPU" if result.device == "cuda" else "available (MemAvailable)"
    available = "unknown" if result.available_mib is None else f"{result.available_mib:,.0f} MiB"
    needed = f"{result.needed_mib:,.0f} MiB" + (
        f" for {processes} processes" if result.needed_mib != result.total_mib else ""
    )
    colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}.get(result.verdict, "white")
    console.print(f"[bold {colour}]{result.verdict}[/]: needs {needed}; {available} {where}", highlight=False)


@app.command()
def init(
    data: Annotated[str, typer.Argument(help="A csv/tsv/json/jsonl/parquet/CoNLL file, or pkg://PACKAGE/PATH.")],
    model: Annotated[str, typer.Option(help="The model: a local folder, a Hub id, or pkg://PACKAGE/PATH.")],
    task: Annotated[
        Optional[str],
        typer.Option(
            help="classification, token_classification, question_answering or causal_lm; default: told from the data."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="The recipe file to write.")] = Path("recipe.yaml"),
    force: Annotated[bool, overwrite_option("recipe file")] = False,
    text_column: Annotated[Optional[str], typer.Option(help="The column holding the text.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="The column holding the label (or the tags).")] = None,
    column: Annotated[
        Optional[list[str]], typer.Option(help="ROLE=COLUMN for any other role, e.g. text_pair=hypothesis (repeat).")
    ] = None,
    encoding: Annotated[
        Optional[str], typer.Option(help="Text encoding of a csv/tsv file (e.g. latin-1); default: the schema's.")
    ] = None,
) -> None:
    """Design a commented recipe from a data file and a model: task, columns and labels from the data, max_length
    from its length distribution, target layers from the model, method and batch for its size and this machine."""
    from peftkit.init import designer, recipe_text
    from peftkit.tasks import TASKS

    roles = {}
    for item in column or []:
        role, sep, name = item.partition("=")
        if not sep or not role or not name:
            raise UserError(f"--column {item}: expected ROLE=COLUMN, e.g. --column text_pair=hypothesis")
        roles[role] = name
    if text_column:
        roles["text"] = text_column
    if label_column:  # the tags, for token classification
        roles[(TASKS[task].LABEL_ROLE if task in TASKS else None) or "label"] = label_column
    if out.exists() and not force:  # said before minutes of reading and tokenizing, and again when writing
        raise UserError(f"{out} already exists; pass --force to replace it, or choose another file with --out")
    quiet_libraries()
    plan = designer.design(data, model, task, roles, encoding)
    written = recipe_text.write(plan, out, force)
    for line in plan.summary:
        console.print(f"  {line}", markup=False, highlight=False)
    for warning in plan.warnings:
        errors.print(f"warning: {warning}", markup=False, style="yellow")
    console.print(f"wrote [bold]{written}[/]; next: [bold]peftkit run {written}[/]")
