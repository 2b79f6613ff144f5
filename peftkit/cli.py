"""The `peftkit` command. Heavy libraries (torch, transformers, peft) are imported inside the commands that
need them, so `peftkit --help`, `validate` and `schema` start fast."""

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.models import OptionInfo

from peftkit import launch
from peftkit.errors import UserError, is_out_of_memory

if TYPE_CHECKING:
    from rich.progress import Progress

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


def _replace(what: str) -> OptionInfo:
    """The --overwrite option (alias --force) of a command that refuses to replace an existing `what`."""
    return typer.Option("--overwrite", "--force", help=f"Replace an existing {what}.")


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    overrides: Overrides = None,
    overwrite: Annotated[bool, _replace("run folder of the same name")] = False,
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
    _quiet_libraries()
    from peftkit.run import run as run_recipe

    report = run_recipe(parsed, overwrite=overwrite, resume=resume)
    if report is None:  # another process than the main one of a distributed run: the main one reports
        return
    _metrics_table(report.metrics, parsed.eval.splits)
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
    _quiet_libraries()
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


@app.command("eval")
def evaluate(
    run_dir: RunDir,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    hub_dir: HubDir = None,
) -> None:
    """Evaluate a finished run's adapter on one split of its recipe's data."""
    _quiet_libraries()
    from peftkit.evaluation import evaluate_run
    from peftkit.sharing.hub import resolve_run

    _metrics_table(evaluate_run(resolve_run(run_dir, hub_dir), [split]), [split])


@app.command()
def predict(
    run_dir: RunDir,
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts (questions, for question answering).")] = None,
    file: Annotated[Optional[Path], typer.Option(help="A file with one text per line.")] = None,
    context: Annotated[
        Optional[str], typer.Option(help="Question answering: the passage to answer from (text, or a file).")
    ] = None,
    hub_dir: HubDir = None,
    adapter: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Another finished run of the same base model, quantization and task: "
            "its adapter goes onto the same loaded base, one column group per run "
            "(repeat)."
        ),
    ] = None,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option(min=1, help="Causal LM: tokens to generate (default: the run's task.max_new_tokens)."),
    ] = None,
    temperature: Annotated[
        Optional[float],
        typer.Option(help="Causal LM: sample at this temperature, above 0 (default: greedy)."),
    ] = None,
    top_p: Annotated[
        Optional[float], typer.Option(help="Causal LM: sample from this nucleus probability mass, in (0, 1].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Causal LM, sampling: the seed (the same seed, the same answers).")] = 0,
) -> None:
    """Run a finished run's adapter on texts given inline or in a file; with --adapter, several runs' adapters on
    one base, switched without reloading it."""
    items = list(texts or [])
    if file:
        if not file.is_file():
            raise UserError(f"--file {file}: no such file")
        items += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise UserError("nothing to predict: give texts as arguments or --file FILE")
    _quiet_libraries()
    from peftkit import multi_adapter
    from peftkit.loading import load_trained
    from peftkit.sharing.hub import resolve_run

    if adapter:
        loaded = multi_adapter.load([run_dir, *adapter], hub_dir)
        recipe = loaded.recipe
    else:
        recipe, task, tokenizer, model, _ = load_trained(resolve_run(run_dir, hub_dir))
    options = {}
    if context is not None:
        if recipe.task.type != "question_answering":
            raise UserError(f"--context is for question answering; this run's task is {recipe.task.type}")
        options["context"] = Path(context).read_text(encoding="utf-8") if _is_file(context) else context
    sampling = {"temperature": temperature, "top_p": top_p}
    if max_new_tokens is not None or any(v is not None for v in sampling.values()):
        if recipe.task.type != "causal_lm":
            raise UserError(
                f"--max-new-tokens, --temperature and --top-p are for generation (causal_lm); this run's task is "
                f"{recipe.task.type}"
            )
        from peftkit.sections import GenerateSection

        chosen = {k: v for k, v in sampling.items() if v is not None}
        if not all(v > 0 for v in chosen.values()) or chosen.get("top_p", 1) > 1:
            raise UserError("--temperature must be above 0, and --top-p in (0, 1]")
        options["options"] = GenerateSection(
            max_new_tokens=max_new_tokens or recipe.task.max_new_tokens, do_sample=bool(chosen), seed=seed, **chosen
        )
    if adapter:
        rows = multi_adapter.predict(loaded, items, **options)
    else:
        rows = task.predict(model, tokenizer, items, recipe.task, **options)
    table = Table(*rows[0])
    for row in rows:
        table.add_row(*map(_cell, row.values()))
    console.print(table)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a passage too long to be a file name
        return False


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):  # multi-label probabilities: "sports 0.912, politics 0.103"
        return ", ".join(f"{k} {v:.3f}" for k, v in value.items())
    if isinstance(value, list):  # entities: "Empire State Building (facility); ..."
        return "; ".join(f"{e['text']} ({e['type']})" if isinstance(e, dict) else str(e) for e in value) or "-"
    return str(value)


@app.command()
def merge(
    run_dir: RunDir,
    out: Annotated[Path, typer.Argument(help="Folder for the merged standalone model.")],
    overwrite: Annotated[bool, _replace("output folder")] = False,
    tolerance: Annotated[Optional[float], typer.Option(help="Max abs logit difference accepted.")] = None,
    requantize: Annotated[
        bool, typer.Option(help="Runs on an 8/4-bit base: store the merged model quantised again (lossy; reported).")
    ] = False,
    hub_dir: HubDir = None,
) -> None:
    """Merge the adapter into the base weights and verify merged vs unmerged logits. An 8/4-bit base is
    dequantised and the merged model saved in full precision."""
    _quiet_libraries()
    from peftkit.export import merge as merge_run
    from peftkit.sharing.hub import resolve_run

    report = merge_run(
        resolve_run(run_dir, hub_dir), out, overwrite=overwrite, tolerance=tolerance, requantize=requantize
    )
    console.print(
        f"merged model: [bold]{report['output']}[/]  max abs logit difference {report['max_abs_diff']:.3g} "
        f"(tolerance {report['tolerance']:g})"
    )
    if "vs_quantized_base" in report:
        console.print(
            f"merged in full precision; max abs logit difference vs the quantised base + adapter (what was "
            f"trained): {report['vs_quantized_base']:.3g}, vs the original full-precision base + adapter: "
            f"{report['vs_full_precision_base']:.3g}"
        )
    if "requantized_vs_quantized_base" in report:
        console.print(
            f"re-quantised: max abs logit difference vs the quantised base + adapter "
            f"{report['requantized_vs_quantized_base']:.3g}"
        )
    elif "vs_quantized_base" in report:
        console.print("(saved unquantised; --requantize stores it in 8/4-bit again, at a reported loss)")


@app.command()
def export(
    run_dir: RunDir,
    fmt: Annotated[str, typer.Option("--format", help="gguf (decoders: llama.cpp, Ollama) or onnx (encoders).")],
    out: Annotated[
        Optional[Path],
        typer.Option(help="The .gguf file, or the ONNX folder. Default: <run name>-<dtype>.gguf / <run name>-onnx"),
    ] = None,
    dtype: Annotated[
        Optional[str], typer.Option(help="gguf: f32, f16 (default), bf16, q8_0. onnx: fp32 (the only one).")
    ] = None,
    overwrite: Annotated[bool, _replace("output")] = False,
    verify: Annotated[
        bool, typer.Option(help="Load the export back (transformers' GGUF loader / onnxruntime) and compare logits.")
    ] = True,
    hub_dir: HubDir = None,
) -> None:
    """Merge the adapter into its base (verified as `peftkit merge` does) and export the merged model for serving:
    GGUF for a Llama-architecture or GPT-2 decoder, an ONNX folder (model.onnx, config, tokenizer) for an encoder
    classifier, tagger or QA model. The export is then loaded back and its logits compared."""
    _quiet_libraries()
    from peftkit.sharing.hub import resolve_run

    run = resolve_run(run_dir, hub_dir)
    if fmt == "gguf":
        from peftkit.exports.gguf import export_gguf

        dtype = dtype or "f16"
        report = export_gguf(run, out or Path(f"{run.name}-{dtype}.gguf"), dtype, overwrite, verify)
    elif fmt == "onnx":
        from peftkit.exports.onnx import export_onnx

        report = export_onnx(run, out or Path(f"{run.name}-onnx"), dtype or "fp32", overwrite, verify)
    else:
        raise UserError(f"--format {fmt}: choose gguf or onnx")
    console.print(
        f"exported ({fmt}, {report['dtype']}): [bold]{report['output']}[/]  {report['bytes'] / 2**20:.1f} MiB; "
        f"merge check: max abs logit difference {report['merge_max_abs_diff']:.3g}"
    )
    if "max_abs_diff" not in report:
        console.print("not verified (--no-verify)")
    elif fmt == "gguf":
        console.print(
            f"loaded back with transformers: max abs logit difference {report['max_abs_diff']:.3g} "
            f"({report['relative_diff']:.2g} of the logits' range; bound {report['bound']}), "
            f"top-1 agreement {report['top1_agreement']:.3f}, tokenizer round trip ok"
        )
    else:
        console.print(
            f"onnxruntime vs torch: max abs logit difference {report['max_abs_diff']:.3g} "
            f"(tolerance {report['tolerance']:g})"
        )


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
    overwrite: Annotated[bool, _replace("report")] = False,
) -> None:
    """Measure recipes (x methods x 8/4-bit) for a fixed number of steps: throughput, memory, trainable share,
    adapter size, metric and model FLOPs utilisation, into report.json, report.md and PNG plots."""
    from peftkit import atomic
    from peftkit.experiments import bench

    variants = bench.matrix(recipes, method or [], bits or [], set_ or [])
    with atomic.building(out, overwrite) as report:
        with _runs_progress() as progress:
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
    overwrite: Annotated[bool, _replace("sweep folder")] = False,
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
        with _runs_progress() as progress:
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
    force: Annotated[bool, _replace("recipe file")] = False,
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
    _quiet_libraries()
    plan = designer.design(data, model, task, roles, encoding)
    written = recipe_text.write(plan, out, force)
    for line in plan.summary:
        console.print(f"  {line}", markup=False, highlight=False)
    for warning in plan.warnings:
        errors.print(f"warning: {warning}", markup=False, style="yellow")
    console.print(f"wrote [bold]{written}[/]; next: [bold]peftkit run {written}[/]")


@app.command()
def combine(
    runs: Annotated[
        list[str], typer.Argument(help="Finished LoRA runs of the same base model, quantization, task and labels.")
    ],
    weights: Annotated[str, typer.Option(help="One weight per run, comma-separated, e.g. 0.7,0.3.")],
    how: Annotated[
        str,
        typer.Option(
            help="peft's combination: linear, cat, svd, ties, ties_svd, dare_linear, "
            "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, "
            "magnitude_prune_svd."
        ),
    ],
    density: Annotated[
        Optional[float],
        typer.Option(help="ties, dare_* and magnitude_prune*: fraction of each update kept, in (0, 1]."),
    ] = None,
    svd_rank: Annotated[
        Optional[int], typer.Option(help="*svd: rank of the result (default: the largest rank combined).")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="The new run folder (default: RUN_A+RUN_B-HOW next to RUN_A).")
    ] = None,
    overwrite: Annotated[bool, _replace("output folder")] = False,
    hub_dir: HubDir = None,
) -> None:
    """Combine LoRA adapters with peft's add_weighted_adapter into a new run folder that predict, eval and merge
    take like any other; task heads are averaged with the weights (README: Several adapters on one base)."""
    from peftkit import multi_adapter

    parsed = []
    for item in weights.split(","):
        try:
            parsed.append(float(item))
        except ValueError:
            raise UserError(f"--weights {weights}: '{item}' is not a number; give one per run, e.g. 0.7,0.3") from None
    multi_adapter.check_combination(how, parsed, len(runs), density, svd_rank)  # before any model is loaded
    _quiet_libraries()
    report = multi_adapter.combine(
        runs, parsed, how, out, density=density, svd_rank=svd_rank, overwrite=overwrite, hub_dir=hub_dir
    )
    columns = [(split, k) for split, m in report["metrics"].items() for k, v in m.items() if isinstance(v, float)]
    table = Table("run", "weight", *[f"{split} {k}" for split, k in columns])
    for source in report["sources"]:
        values = [source["metrics"].get(split, {}).get(k) for split, k in columns]
        table.add_row(
            Path(source["run"]).name, f"{source['weight']:g}", *["-" if v is None else f"{v:.4f}" for v in values]
        )
    table.add_row(
        f"[bold]{Path(report['output']).name}[/]",
        report["how"],
        *[f"{report['metrics'][split][k]:.4f}" for split, k in columns],
    )
    console.print(table)
    console.print(
        f"combined ({report['how']}, rank {report['rank']}; heads: {report['heads']}): "
        f"[bold]{report['output']}[/]  (scored on the recipe's eval splits: metrics.json)"
    )


def _runs_progress() -> "Progress":
    """bench and sweep: one bar over their runs, on stderr, with the run in progress named."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=errors)


def _metrics_table(metrics: dict, splits: list[str]) -> None:
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


def _quiet_libraries() -> None:
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
