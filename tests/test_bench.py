"""`peftkit bench` end to end on the tiny model: a recipe x method x bits matrix, one refused variant reported
without stopping the others, and the report's JSON, Markdown and plots."""

import json

from .conftest import peftkit


def test_bench_matrix_writes_the_report(recipe_file, tmp_path):
    recipe = recipe_file()
    out = tmp_path / "report"
    result = peftkit("bench", recipe, "--method", "lora", "--method", "full", "--bits", "0", "--bits", "4",
                     "--steps", "2", "--out", out, "--set", "train.batch_size=8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == {"recipe-lora-fp", "recipe-lora-4bit", "recipe-full-fp", "recipe-full-4bit"}
    assert rows["recipe-full-4bit"]["error"].startswith("method full cannot train on a 4-bit base")  # the rest ran
    for name in ("recipe-lora-fp", "recipe-lora-4bit", "recipe-full-fp"):
        row = rows[name]
        assert row["steps"] == 2 and row["samples_per_s"] > 0 and row["tokens_per_s"] > 0
        assert row["peak_memory_mib"] > 0 and row["adapter_bytes"] > 0 and 0 < row["mfu"] < 1
        assert row["metric"]["name"] == "validation accuracy" and 0 <= row["metric"]["value"] <= 1
    assert rows["recipe-lora-4bit"]["bits"] == 4 and rows["recipe-lora-fp"]["bits"] == 0
    assert rows["recipe-full-fp"]["trainable_share"] == 1.0 > rows["recipe-lora-fp"]["trainable_share"]
    machine = report["machine"]
    assert machine["versions"]["torch"] and machine["cpu_cores"] >= 1 and report["matmul_peak_tflops"]["fp32"] > 0
    assert "| recipe-lora-fp | lora |" in (out / "report.md").read_text()
    for plot in ("memory.png", "throughput.png", "metric_vs_trainable.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_bench_checks_every_variant_before_running(recipe_file, tmp_path):
    result = peftkit("bench", recipe_file(), "--method", "loar", "--out", tmp_path / "r")
    assert result.returncode == 2 and "method" in result.stderr and not (tmp_path / "r").exists()
