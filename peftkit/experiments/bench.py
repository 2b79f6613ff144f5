"""`peftkit bench`: run recipes (or a recipe x method x quantisation matrix) for a fixed number of steps and write
a report — JSON, a Markdown table and PNG plots — with the machine it ran on.

    variants -> one `peftkit run` each, in its own process (its memory peaks are its own)
             -> the numbers each run wrote in metrics.json (measured in peftkit/measure.py, the one place)
             -> + model FLOPs utilisation against this machine's measured matmul peak -> report/

A variant that cannot run (e.g. a method refused on a 4-bit base) is reported with its error; the others go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peftkit import cpu_kind, measure
from peftkit.errors import UserError
from peftkit.recipe import load_recipe
from peftkit.run_folder import METRICS, RECIPE

PACKAGES = ("peftkit", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")
# What a run measures: every row of the report has these keys, null where a failed variant measured nothing
MEASURED = (
    "precision",
    "steps",
    "samples_per_s",
    "tokens_per_s",
    "step_s",
    "peak_memory_mib",
    "memory",
    "trainable_params",
    "trainable_share",
    "adapter_bytes",
    "metric",
    "model_tflops",
    "mfu",
)


@dataclass
class Variant:
    recipe: Path
    method: str | None = None  # None: the recipe's own method section
    bits: int | None = None  # None: the recipe's own quantisation; 0: full precision
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        parts = [self.recipe.stem]
        if self.method:
            parts.append(self.method)
        if self.bits is not None:
            parts.append(f"{self.bits}bit" if self.bits else "fp")
        return "-".join(parts)

    def recipe_overrides(self) -> list[str]:
        extra = []
        if self.method:
            extra.append(f"method={{name: {self.method}}}")  # the method's own defaults, the recipe's targets aside
        if self.bits == 0:
            extra.append("quantization=null")
        elif self.bits:
            extra.append(f"quantization.bits={self.bits}")
        return [*extra, *self.overrides]

    def capped(self, steps: int) -> list[str]:
        return [*self.recipe_overrides(), f"train.max_steps={steps}", "eval.before_training=false"]


def matrix(recipes: list[Path], methods: list[str], bits: list[int], overrides: list[str]) -> list[Variant]:
    """Every recipe x method x bits, each checked against the recipe schema before anything runs."""
    variants = [Variant(r, m, b, overrides) for r in recipes for m in (methods or [None]) for b in (bits or [None])]
    for variant in variants:
        load_recipe(variant.recipe, variant.recipe_overrides())
    return variants


def run_apart(
    recipe: Path, overrides: list[str], out: Path, env: dict[str, str] | None = None
) -> tuple[dict, dict] | str:
    """`peftkit run` in its own process (with `env`, else this one's environment), so that its memory peak is
    its own: (metrics.json, the resolved recipe), or the error it printed."""
    command = [
        sys.executable,
        "-m",
        "peftkit",
        "run",
        str(recipe),
        *overrides,
        f"export.output_dir={out}",
        "--overwrite",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return lines[-1].removeprefix("error: ") if lines else f"exit code {result.returncode}"
    return json.loads((out / METRICS).read_text()), _yaml(out / RECIPE)


def run_variant(variant: Variant, steps: int, report: Path) -> dict:
    row = {
        "variant": variant.name,
        "recipe": str(variant.recipe),
        "method": variant.method,
        "bits": variant.bits,
        **dict.fromkeys(MEASURED),
        "error": None,
    }
    outcome = run_apart(variant.recipe, variant.capped(steps), report / "runs" / variant.name)
    if isinstance(outcome, str):
        return {**row, "error": outcome}
    metrics, recipe = outcome
    train, memory = metrics["train"], metrics["memory"]
    split = recipe["eval"]["splits"][0]
    metric_name = recipe["eval"]["metric_for_best"]
    return {
        **row,
        "method": recipe["method"]["name"],
        "bits": (recipe.get("quantization") or {}).get("bits", 0),
        "precision": metrics["precision"],
        "steps": train["steps"],
        "samples_per_s": train["samples_per_s"],
        "tokens_per_s": train["tokens_per_s"],
        "step_s": train["seconds"] / max(train["steps"], 1),
        "peak_memory_mib": peak_mib(memory["train_peak"]),
        "memory": memory,
        "trainable_params": metrics["trainable_params"],
        "trainable_share": metrics["trainable_share"],
        "adapter_bytes": metrics["adapter_bytes"],
        "metric": {"name": f"{split} {metric_name}", "value": metrics[split][metric_name]},
        "model_tflops": metrics["flops_per_token"] * train["tokens_per_s"] / 1e12,
    }


def add_mfu(rows: list[dict], peak_tflops: dict) -> None:
    """Model FLOPs utilisation: achieved model FLOP/s over the measured matmul peak of the run's precision."""
    for row in rows:
        if row["error"] is None:
            peak = peak_tflops.get(row["precision"])
            row["mfu"] = row["model_tflops"] / peak if peak else None


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def peak_mib(memory: dict) -> float:
    """The training peak in MiB: reserved on CUDA (what the process holds), resident set size on CPU."""
    return memory.get("peak_reserved_mib", memory.get("peak_rss_mib", 0.0))


def machine() -> dict:
    """What the numbers were measured on: versions, CPU, GPU, commit."""
    from importlib import metadata

    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # no /proc/cpuinfo, or no model name in it: the above
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    try:  # the commit of a source checkout; none for an installed package, or without git
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "versions": versions,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_kind": cpu_kind.describe(),  # bf16-native or not: which paths `auto` took (cpu_kind.py)
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": commit or None,
    }


def measure_peaks() -> dict:
    """Matmul TFLOP/s of this machine's accelerator (else CPU) in fp32 and bf16: MFU's denominators. The bench
    measures before and after its runs and keeps the higher: one reading right after start-up came out 40% low."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {p: measure.matmul_peak_tflops(p, device) for p in ("fp32", "bf16")}


def write_report(report: Path, rows: list[dict], about: dict, peaks: dict, steps: int) -> None:
    (report / "report.json").write_text(
        json.dumps({"machine": about, "matmul_peak_tflops": peaks, "steps": steps, "variants": rows}, indent=2)
    )
    (report / "report.md").write_text(markdown(rows, about, peaks, steps))
    plot(report, [r for r in rows if r["error"] is None])


def markdown(rows: list[dict], about: dict, peaks: dict, steps: int) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in about["versions"].items() if v)
    lines = [
        f"# peftkit bench ({steps} steps per variant)",
        "",
        f"Machine: {about['cpu']}, {about['cpu_cores']} cores, {about['cpu_kind']}"
        + (f", GPU {about['gpu']}" if about["gpu"] else "")
        + f"; Python {about['python']}; {versions}; commit {about['commit']}.",
        f"Measured matmul peak: fp32 {peaks['fp32']:.3g} TFLOP/s, bf16 {peaks['bf16']:.3g} TFLOP/s.",
        "",
        "| variant | method | bits | precision | samples/s | tokens/s | step (s) | peak memory (MiB) "
        "| trainable (share) | adapter | metric | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"] is not None:
            lines.append(f"| {r['variant']} | failed: {r['error']} |" + " |" * 10)
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['bits'] or '-'} | {r['precision']} | {r['samples_per_s']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_memory_mib']:,.0f} "
            f"| {r['trainable_params']:,} ({100 * r['trainable_share']:.2f}%) | {r['adapter_bytes'] / 2**20:.2f} MiB "
            f"| {r['metric']['name']} {r['metric']['value']:.4f} | {mfu} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: Path, rows: list[dict]) -> None:
    """memory.png, throughput.png, metric_vs_trainable.png."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the bench plots need matplotlib: pip install 'peftkit[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    for file, key, label in (
        ("memory.png", "peak_memory_mib", "peak memory while training (MiB)"),
        ("throughput.png", "samples_per_s", "training samples/s"),
    ):
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
        ax.bar(names, [r[key] for r in rows])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(report / file, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        ax.scatter(100 * r["trainable_share"], r["metric"]["value"])
        ax.annotate(r["variant"], (100 * r["trainable_share"], r["metric"]["value"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model)")
    ax.set_ylabel(rows[0]["metric"]["name"] if rows else "metric")
    fig.tight_layout()
    fig.savefig(report / "metric_vs_trainable.png", dpi=120)
    plt.close(fig)
