"""Commands that use a finished run: eval, predict, merge, export, combine."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from peftkit.cli.app import HubDir, RunDir, app, console, overwrite_option, quiet_libraries
from peftkit.cli.tables import cell, metrics_table
from peftkit.errors import UserError

AsJson = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts) instead of a table.")
]


@app.command("eval")
def evaluate(
    run_dir: RunDir,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    hub_dir: HubDir = None,
    as_json: AsJson = False,
) -> None:
    """Evaluate a finished run's adapter on one split of its recipe's data."""
    quiet_libraries()
    from peftkit.evaluation import evaluate_run
    from peftkit.sharing.hub import resolve_run

    scores = evaluate_run(resolve_run(run_dir, hub_dir), [split])
    if as_json:  # {split: metrics}, as metrics.json holds them
        print(json.dumps(scores, indent=2))
    else:
        metrics_table(scores, [split])


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
    as_json: AsJson = False,
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
    quiet_libraries()
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
        options["context"] = Path(context).read_text(encoding="utf-8") if is_file(context) else context
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
    if as_json:  # one object per text, the table's columns as keys
        print(json.dumps(rows, indent=2))
        return
    table = Table(*rows[0])
    for row in rows:
        table.add_row(*map(cell, row.values()))
    console.print(table)


def is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a passage too long to be a file name
        return False


@app.command()
def merge(
    run_dir: RunDir,
    out: Annotated[Path, typer.Argument(help="Folder for the merged standalone model.")],
    overwrite: Annotated[bool, overwrite_option("output folder")] = False,
    tolerance: Annotated[Optional[float], typer.Option(help="Max abs logit difference accepted.")] = None,
    requantize: Annotated[
        bool, typer.Option(help="Runs on an 8/4-bit base: store the merged model quantised again (lossy; reported).")
    ] = False,
    hub_dir: HubDir = None,
) -> None:
    """Merge the adapter into the base weights and verify merged vs unmerged logits. An 8/4-bit base is
    dequantised and the merged model saved in full precision."""
    quiet_libraries()
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
    overwrite: Annotated[bool, overwrite_option("output")] = False,
    verify: Annotated[
        bool, typer.Option(help="Load the export back (transformers' GGUF loader / onnxruntime) and compare logits.")
    ] = True,
    hub_dir: HubDir = None,
) -> None:
    """Merge the adapter into its base (verified as `peftkit merge` does) and export the merged model for serving:
    GGUF for a Llama-architecture or GPT-2 decoder, an ONNX folder (model.onnx, config, tokenizer) for an encoder
    classifier, tagger or QA model. The export is then loaded back and its logits compared."""
    quiet_libraries()
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
    overwrite: Annotated[bool, overwrite_option("output folder")] = False,
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
    quiet_libraries()
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
