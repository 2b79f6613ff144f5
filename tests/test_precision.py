"""Runs under bf16 mixed precision (on this CPU bf16 is emulated, so only the tiny model): the frozen base is held
in bf16 (model.dtype auto), the trained parameters and the saved adapter stay fp32, and the run folder serves
predict like any other; model.dtype fp32 and methods that train or rewrite base weights (full fine-tuning, LoRA
training biases) keep an fp32 base."""

import json

import pytest
from safetensors.torch import load_file

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
    assert peftkit_here("run", path, "train.max_steps=3").returncode == 0
    return weights_mib(runs / "r")


def test_bf16_run_holds_the_base_in_bf16_and_trains_in_fp32(recipe_file, fp32_mib, tmp_path):
    result = peftkit("run", recipe_file(), *BF16)  # a process of its own: accelerate's precision is set once per process
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "recipe"
    assert json.loads((run_dir / "metrics.json").read_text())["precision"] == "bf16"
    assert weights_mib(run_dir) < 0.6 * fp32_mib  # the base's weights halved; the adapter and head are fp32
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {str(t.dtype) for t in saved.values()} == {"torch.float32"}
    predicted = peftkit_here("predict", run_dir, "a truly great film")
    assert predicted.returncode == 0, predicted.stderr


@pytest.mark.parametrize("setting", [["model.dtype=fp32"], ["method={name: full}"], ["method.bias=all"]])
def test_an_fp32_base_when_asked_or_when_the_method_trains_it(recipe_file, fp32_mib, tmp_path, setting):
    result = peftkit("run", recipe_file(), *BF16, *setting)
    assert result.returncode == 0, result.stderr
    assert weights_mib(tmp_path / "runs" / "recipe") > 0.9 * fp32_mib  # (full fine-tuning adds no LoRA weights)
