"""Runs under bf16 mixed precision (on this CPU bf16 is emulated, so only the tiny model): the frozen base is held
in bf16 (model.dtype auto), the trained parameters and the saved adapter stay fp32, and the run folder serves
predict like any other; model.dtype fp32, fp16 runs, quantised bases and methods that train or rewrite base weights
keep an fp32 base."""

import json

import pytest
from safetensors.torch import load_file

from peftkit import devices

from .conftest import peftkit, peftkit_here

BF16 = ["train.precision=bf16", "train.max_steps=3", "eval.before_training=true"]


def weights_mib(run_dir) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["memory"]["model_mib"]


@pytest.fixture(scope="module")
def fp32_mib(tmp_path_factory, tiny_bert, sentiment_csv):
    import yaml

    from .conftest import small_recipe

    runs = tmp_path_factory.mktemp("fp32")
    path = runs / "r.yaml"
    path.write_text(yaml.safe_dump(small_recipe(tiny_bert, sentiment_csv, runs)))
    # precision set, not auto: auto is bf16 on a bf16-native CPU (cpu_kind.py), which would compare bf16 with bf16;
    # and a process of its own, as accelerate's precision is set once per process
    result = peftkit("run", path, "train.max_steps=3", "train.precision=fp32")
    assert result.returncode == 0, result.stderr
    return weights_mib(runs / "r")


def test_bf16_run_holds_the_base_in_bf16_and_trains_in_fp32(recipe_file, fp32_mib, tmp_path):
    result = peftkit(
        "run", recipe_file(), *BF16
    )  # a process of its own: accelerate's precision is set once per process
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "recipe"
    assert json.loads((run_dir / "metrics.json").read_text())["precision"] == "bf16"
    assert weights_mib(run_dir) < 0.6 * fp32_mib  # the base's weights halved; the adapter and head are fp32
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {str(t.dtype) for t in saved.values()} == {"torch.float32"}
    predicted = peftkit_here("predict", run_dir, "a truly great film")
    assert predicted.returncode == 0, predicted.stderr


@pytest.mark.parametrize(
    "overrides,dtype",
    [
        ([], "bfloat16"),
        (["model.dtype=fp32"], "float32"),
        (["train.precision=fp16"], "float32"),  # fp16's range is too small for a base's residual stream
        (["train.precision=fp32"], "float32"),
        (["method={name: full}"], "float32"),  # the base trains
        (["method.init=pissa"], "float32"),  # the base is rewritten
        (["method.bias=lora_only"], "float32"),  # the base's biases train
        (["quantization.bits=4"], "float32"),  # its layers that are not quantised stay fp32
    ],
)
def test_which_bases_are_held_in_bf16(recipe_file, overrides, dtype):
    from peftkit.loading import base_dtype
    from peftkit.recipe import load_recipe

    recipe = load_recipe(recipe_file(), ["train.precision=bf16", *overrides])
    assert str(base_dtype(recipe, recipe.train.precision)) == f"torch.{dtype}"


def test_lora_training_biases_runs_on_an_fp32_base(recipe_file, fp32_mib, tmp_path):
    """The case that crashed before it kept an fp32 base: fp32 biases next to bf16 layer norms under CPU autocast."""
    result = peftkit("run", recipe_file(), *BF16, "method.bias=all")
    assert result.returncode == 0, result.stderr
    assert weights_mib(tmp_path / "runs" / "recipe") > 0.9 * fp32_mib


@pytest.mark.parametrize("kind, precision", [("native", "bf16"), ("emulated", "fp32")])
def test_the_cpu_kind_switch_decides_what_auto_takes(monkeypatch, kind, precision):
    """PEFTKIT_CPU_BF16 (cpu_kind.py): any machine takes the other kind's paths, the test suite's second pass."""
    import torch

    from peftkit import cpu_kind

    monkeypatch.setenv(cpu_kind.ENV, kind)
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu) == precision
    assert devices.resolve_precision("fp32", cpu) == "fp32" and devices.resolve_precision("bf16", cpu) == "bf16"
    assert cpu_kind.describe() == f"bf16-{kind} CPU (PEFTKIT_CPU_BF16={kind})"


def test_a_wrong_cpu_kind_switch_names_the_choices(monkeypatch):
    from peftkit import cpu_kind
    from peftkit.errors import UserError

    monkeypatch.setenv(cpu_kind.ENV, "amx")
    with pytest.raises(UserError, match="PEFTKIT_CPU_BF16='amx': expected one of native, emulated"):
        cpu_kind.cpu_bf16_native()
