"""Commands that compare runs: bench (a recipe x method x bits matrix) and sweep (a grid of overrides); the
loops live in peftkit/experiments/, these parse and print."""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from peftkit.cli.app import app, console, overwrite_option
from peftkit.cli.tables import runs_progress
from peftkit.errors import UserError


@app.command()
def bench(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to measure.")],
    method: Annotated[
        Optional[list[str]], typer.Option(help="Run each recipe with this method instead of its own (repeat).")
    ] = None,
    bits: Annotated[
        Optional[list[int]], typer.Option(help="Base precision: 0 (full), 8 or 4 (repeat); default: the recipe's.")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per variant.")] = 20,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="A section.key=value override for every variant (repeat).")
    ] = None,
    overwrite: Annotated[bool, overwrite_option("report")] = False,
) -> None:
    """Measure recipes (x methods x 8/4-bit) for a fixed number of steps: throughput, memory, trainable share,
    adapter size, metric and model FLOPs utilisation, into report.json, report.md and PNG plots."""
    from peftkit import atomic
    from peftkit.experiments import bench

    variants = bench.matrix(recipes, method or [], bits or [], set_ or [])
    with atomic.building(out, overwrite) as report:
        with runs_progress() as progress:
            task = progress.add_task("measuring the matmul peak", total=len(variants))
            peaks, about = bench.measure_peaks(), bench.machine()
            rows = []
            for variant in variants:
                progress.update(task, description=variant.name)
                rows.append(bench.run_variant(variant, steps, report))
                progress.advance(task)
            progress.update(task, description="measuring the matmul peak again")
            again = bench.measure_peaks()
            peaks = {p: max(rate, again[p]) for p, rate in peaks.items()}
        bench.add_mfu(rows, peaks)
        bench.write_report(report, rows, about, peaks, steps)
    table = Table("variant", "samples/s", "tokens/s", "peak MiB", "trainable", "metric", "MFU")
    for r in rows:
        if r["error"] is not None:  # bench rows all have the key (null when the variant ran)
            table.add_row(r["variant"], f"failed: {r['error']}")
            continue
        table.add_row(
            r["variant"],
            f"{r['samples_per_s']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['peak_memory_mib']:,.0f}",
            f"{100 * r['trainable_share']:.2f}%",
            f"{r['metric']['value']:.4f}",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
        )
    console.print(table)
    console.print(
        f"report: [bold]{out}[/] (report.json, report.md, memory.png, throughput.png, "
        "metric_vs_trainable.png; each variant's run folder under runs/)"
    )


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="The recipe to vary.")],
    grid: Annotated[
        list[str], typer.Argument(help="key=value1,value2,... to vary, e.g. method.r=4,8 train.lr=1e-4,3e-4")
    ],
    out: Annotated[Optional[Path], typer.Option(help="Sweep folder (default: runs/sweep-RECIPE).")] = None,
    overwrite: Annotated[bool, overwrite_option("sweep folder")] = False,
    jobs: Annotated[
        int,
        typer.Option(
            min=1, help="Runs at a time. Small models share one GPU well; on a CPU each run gets cores/N threads."
        ),
    ] = 1,
) -> None:
    """Run every combination of the values given (full runs), then table metric, time, memory and trainable
    share, and write the best run's recipe (chosen on validation) as best.yaml. The results are rewritten after
    each run: a sweep stopped half-way keeps them in its .partial folder."""
    from peftkit import atomic
    from peftkit.experiments import sweep as sweeps

    values = sweeps.parse_grid(grid)
    runs = sweeps.combinations(recipe, values)
    varied = {k for k, v in values.items() if len(v) > 1} or set(values)  # what tells the rows apart
    out = out or Path("runs") / f"sweep-{recipe.stem}"
    with atomic.building(out, overwrite) as folder:
        with runs_progress() as progress:
            task = progress.add_task("sweep", total=len(runs))
            rows = sweeps.run_all(
                recipe,
                runs,
                folder,
                on_start=lambda name: progress.update(task, description=name, advance=0),
                on_done=lambda done: (
                    sweeps.write(folder, done, sweeps.best(done)),
                    progress.update(task, completed=len(done)),
                ),
                jobs=jobs,
            )
            progress.update(task, completed=len(runs))
        winner = sweeps.best(rows)
        sweeps.write(folder, rows, winner)
    table = Table("run", "validation", "test", "train s", "peak MiB", "trainable")
    for r in rows:
        if "error" in r:
            table.add_row(" ".join(r["overrides"]), f"failed: {r['error']}")
            continue
        name = " ".join(o for o in r["overrides"] if o.split("=")[0] in varied) + (" (best)" if r is winner else "")
        table.add_row(
            name,
            f"{r['selection']:.4f}",
            "-" if r["test"] is None else f"{r['test']:.4f}",
            f"{r['train_seconds']:.0f}",
            f"{r['peak_memory_mib']:,.0f}",
            f"{100 * r['trainable_share']:.2f}%",
        )
    console.print(table)
    for summary in sweeps.over_seeds(rows):
        console.print(
            f"over {summary['seeds']} seeds{': ' + ' '.join(summary['overrides']) if summary['overrides'] else ''}: "
            f"validation {summary['metric']} {sweeps.spread(summary.get('selection'))}, "
            f"test {sweeps.spread(summary.get('test'))}"
            + (f", [bold red]{summary['collapsed']} collapsed[/]" if summary["collapsed"] else ""),
            highlight=False,
        )
    if winner is None:
        raise UserError(f"sweep: every run failed (see {out / 'results.md'})")
    console.print(
        f"best on validation {winner['metric']}: {' '.join(winner['overrides'])}; its recipe: "
        f"[bold]{out / 'best.yaml'}[/] (results.json, results.md, runs/ beside it)"
    )
