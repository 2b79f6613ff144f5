"""`peftkit bench` end to end on the tiny model: a method x bits matrix with one refused variant reported
without stopping the others, and the report's JSON, Markdown and plots; the throughput meter's counting."""

import json
import os

from .conftest import peftkit


def test_bench_matrix_writes_the_report(recipe_file, tmp_path):
    out = tmp_path / "report"
    result = peftkit(
        "bench",
        recipe_file(),
        "--method",
        "lora",
        "--method",
        "full",
        "--bits",
        "4",
        "--steps",
        "2",
        "--out",
        out,
        "--set",
        "train.batch_size=8",
        env={**os.environ, "COLUMNS": "250"},  # rich's table width in a pipe: room for whole names and messages
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == {"recipe-lora-4bit", "recipe-full-4bit"}
    failed, row = rows["recipe-full-4bit"], rows["recipe-lora-4bit"]
    assert failed["error"].startswith("method full cannot train on a 4-bit base")  # the rest ran
    assert failed.keys() == row.keys() and failed["steps"] is None and failed["mfu"] is None and row["error"] is None
    assert row["steps"] == 2 and row["bits"] == 4 and row["samples_per_s"] > 0 and row["tokens_per_s"] > 0
    assert row["peak_memory_mib"] > 0 and row["adapter_bytes"] > 0 and 0 < row["mfu"] < 1
    assert 0 < row["trainable_share"] < 1 and row["metric"]["name"] == "validation accuracy"
    machine = report["machine"]
    assert machine["versions"]["torch"] and machine["cpu_cores"] >= 1 and report["matmul_peak_tflops"]["fp32"] > 0
    table = (out / "report.md").read_text()
    assert "| recipe-lora-4bit | lora | 4 |" in table and "| recipe-full-4bit | failed: method full" in table
    shown = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 2}
    assert "failed: method full" in shown["recipe-full-4bit"]  # the terminal's table: only the refused one failed
    assert "failed" not in shown["recipe-lora-4bit"] and f"{row['samples_per_s']:.1f}" in shown["recipe-lora-4bit"]
    from peftkit import cpu_kind

    assert machine["cpu_kind"] == cpu_kind.describe()  # the same environment as the bench's process
    for plot in ("memory.png", "throughput.png", "metric_vs_trainable.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_matrix_variants_and_their_checks(recipe_file, tmp_path):
    import pytest

    from peftkit.errors import UserError
    from peftkit.experiments import bench as benchmark
    from peftkit.recipe import load_recipe

    quantized = recipe_file(quantization={"bits": 8})
    variants = benchmark.matrix([quantized], ["lora", "ia3"], [0, 4], ["train.lr=1e-3"])
    assert [v.name for v in variants] == ["recipe-lora-fp", "recipe-lora-4bit", "recipe-ia3-fp", "recipe-ia3-4bit"]
    full_precision = load_recipe(quantized, variants[2].recipe_overrides())
    assert (
        full_precision.quantization is None and full_precision.method.name == "ia3" and full_precision.train.lr == 1e-3
    )
    assert load_recipe(quantized, variants[1].recipe_overrides()).quantization.bits == 4
    with pytest.raises(UserError, match="method"):  # every variant is checked before anything runs
        benchmark.matrix([quantized], ["loar"], [], [])


def test_throughput_counts_samples_and_non_padding_tokens():
    import torch

    from peftkit.measure import Throughput

    meter = Throughput()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    meter.update({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask})
    meter.update({"input_ids": torch.zeros(3, 2, dtype=torch.long)})  # no mask: every position counts
    rates = meter.rates()
    assert (meter.samples, rates["tokens"]) == (5, 5 + 6)
    assert rates["tokens_per_s"] == rates["tokens"] / rates["seconds"]
