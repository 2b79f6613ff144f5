"""`peftkit estimate`: counts on the meta device equal the real model's, the parts move as they should with the
recipe, the command prints its table and JSON, and no weight is ever read."""

import json
import shutil

import pytest
import yaml

from peftkit import estimate, loading, measure, train
from peftkit.recipe import load_recipe
from peftkit.tasks import TASKS
from tests.conftest import peftkit_here


def _estimate(path, *overrides):
    return estimate.estimate(load_recipe(path, list(overrides)), device="cpu")


@pytest.mark.parametrize(
    "method, quantization",
    [({"name": "lora", "r": 4, "alpha": 8}, None), ({"name": "full"}, None), ({"name": "lora", "r": 4}, {"bits": 4})],
    ids=["lora", "full", "lora-4bit"],
)
def test_counts_on_the_meta_device_equal_the_real_models(recipe_file, method, quantization):
    sections = {"method": method, **({"quantization": quantization} if quantization else {})}
    recipe = load_recipe(recipe_file(**sections), ["train.precision=fp32"])
    task = TASKS[recipe.task.type]
    import torch

    _, real = loading.adapted_model(recipe, task, ["neg", "pos"], torch.device("cpu"), "fp32", 10)
    predicted = estimate.estimate(recipe, device="cpu").facts
    counts = measure.parameter_counts(real)
    assert predicted["trainable_params"] == counts["trainable_params"]
    assert predicted["total_params"] == counts["total_params"]


def test_a_4bit_base_weighs_about_an_eighth_of_its_linear_layers(recipe_file):
    fp32 = _estimate(recipe_file(), "train.precision=fp32")
    four = _estimate(recipe_file(quantization={"bits": 4}), "train.precision=fp32")
    assert four.parts["base weights"] < fp32.parts["base weights"]
    assert four.facts["bits"] == 4


def test_parts_scale_with_the_recipe(recipe_file):
    path = recipe_file()
    base = _estimate(path, "train.precision=fp32", "train.batch_size=32", "eval.batch_size=8")
    double = _estimate(path, "train.precision=fp32", "train.batch_size=64", "eval.batch_size=8")
    ratio = double.parts["activations"] / base.parts["activations"]
    assert 1.6 < ratio < 2.4, ratio
    bf16 = _estimate(path, "train.precision=bf16", "train.batch_size=32", "eval.batch_size=8")
    assert bf16.facts["base_dtype"] == "bfloat16"
    assert 0.45 < bf16.parts["base weights"] / base.parts["base weights"] < 0.6
    checkpointed = _estimate(path, "train.precision=fp32", "train.batch_size=64", "train.gradient_checkpointing=true")
    assert checkpointed.parts["activations"] < double.parts["activations"]
    # optimizer states: two fp32 per trainable parameter; gradients one
    assert base.parts["optimizer"] == pytest.approx(2 * base.parts["gradients"])
    assert base.parts["gradients"] * 2**20 == pytest.approx(4 * base.facts["trainable_params"])


def test_processes_add_ddp_buckets_and_count_every_process_on_a_cpu(recipe_file):
    one = estimate.estimate(load_recipe(recipe_file()), processes=1, device="cpu")
    two = estimate.estimate(load_recipe(recipe_file()), processes=2, device="cpu")
    assert two.parts["gradients"] == pytest.approx(2 * one.parts["gradients"])
    assert two.needed_mib == pytest.approx(2 * two.total_mib)


def test_fsdp_divides_weights_and_states_and_adds_what_it_gathers(recipe_file):
    ddp = estimate.estimate(load_recipe(recipe_file()), processes=2, device="cpu")
    fsdp = estimate.estimate(load_recipe(recipe_file(), ["train.distributed.strategy=fsdp"]), processes=2, device="cpu")
    for part in ("trainable", "optimizer"):
        assert fsdp.parts[part] == pytest.approx(ddp.parts[part] / 2)
    assert fsdp.parts["gradients"] == pytest.approx(ddp.parts["gradients"] / 4)  # halved, and no DDP buckets
    # a shard of the weights plus the whole units it gathers at once: more than half, less than all
    assert ddp.parts["base weights"] / 2 < fsdp.parts["base weights"] < ddp.parts["base weights"]
    assert fsdp.facts["shard"] == 2 and any("FSDP" in note for note in fsdp.notes)
    alone = estimate.estimate(load_recipe(recipe_file(), ["train.distributed.strategy=fsdp"]), device="cpu")
    assert alone.facts["shard"] == 1  # one process shards nothing (as `peftkit run` ignores the setting)


def test_a_cpu_counts_the_heap_kept_after_frees(recipe_file):
    cpu = estimate.estimate(load_recipe(recipe_file(), ["train.precision=fp32"]), device="cpu")
    assert cpu.parts["allocator"] == pytest.approx(estimate.CPU_ALLOCATOR_SHARE * cpu.parts["activations"])


def test_the_length_comes_from_the_data(recipe_file):
    result = _estimate(recipe_file())
    assert result.facts["length"] < 32  # the generated reviews are a few words; max_length is 32
    assert "tokenized" in result.facts["length_source"]


def test_no_weights_are_read(tmp_path, tiny_bert, sentiment_csv, recipe_file, monkeypatch):
    """The model folder without its weights file: estimate needs only the config and the tokenizer."""
    bare = tmp_path / "bare-bert"
    shutil.copytree(tiny_bert, bare)
    (bare / "model.safetensors").unlink()
    path = recipe_file(model={"name": str(bare)})
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("estimate read weights")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    result = _estimate(path)
    assert result.total_mib > 0 and result.verdict in ("fits", "tight", "does not fit", "unknown")


def test_the_command_prints_the_table_and_json(recipe_file):
    path = recipe_file()
    shown = peftkit_here("estimate", path, "train.batch_size=8")
    assert shown.returncode == 0, shown.stderr
    for part in ("base weights", "activations", "optimizer", "total per process"):
        assert part in shown.stdout
    assert any(v in shown.stdout for v in ("fits", "tight", "does not fit"))
    as_json = peftkit_here("estimate", path, "--json", "--processes", "2")
    assert as_json.returncode == 0, as_json.stderr
    parsed = json.loads(as_json.stdout)
    assert parsed["processes"] == 2 and parsed["total_mib"] == pytest.approx(sum(parsed["parts_mib"].values()), 0.01)


def test_a_bad_recipe_exits_2(tmp_path, recipe_file):
    bad = peftkit_here("estimate", recipe_file(), "train.batch_size=zero")
    assert bad.returncode == 2 and "batch_size" in bad.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"model": {"name": str(tmp_path / "nowhere")}}))
    assert peftkit_here("estimate", broken).returncode == 2


def test_the_run_warning_fires_only_beyond_free_memory(recipe_file, monkeypatch):
    recipe = load_recipe(recipe_file())
    monkeypatch.setattr(estimate, "available_mib", lambda device: 1.0)
    line = estimate.warning(recipe, 1, device="cpu")
    assert line is not None and "MiB" in line
    monkeypatch.setattr(estimate, "available_mib", lambda device: 1e9)
    assert estimate.warning(recipe, 1, device="cpu") is None
    assert train  # the loop's own optimizer is what the estimate steps (train._optimizer)
