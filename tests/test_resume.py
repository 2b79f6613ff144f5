"""Kill-safe checkpoints: a run SIGKILLed at a random step and resumed with --resume ends with the very adapter
an uninterrupted run gives (same seed, CPU), tensor for tensor."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import checkpoint

from .conftest import peftkit

STEPS = 30  # 160 training rows / batch 16 = 10 steps per epoch, 3 epochs


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_bert, sentiment_csv):
    import yaml

    folder = tmp_path_factory.mktemp("resume")
    path = folder / "ck.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_bert)},
                "data": {"source": str(sentiment_csv), "columns": {"text": "review", "label": "sentiment"}},
                "task": {"type": "classification", "max_length": 32},
                "method": {
                    "name": "lora",
                    "r": 4,
                    "alpha": 8,
                    "dropout": 0.1,
                },  # dropout: the RNG state must resume too
                "train": {"epochs": 3, "batch_size": 16, "lr": 5e-3, "checkpoint_every": 3, "keep_checkpoints": 2},
            }
        )
    )
    return path


def start(recipe: Path, out: Path, *extra) -> subprocess.Popen:
    command = [sys.executable, "-m", "peftkit", "run", str(recipe), f"export.output_dir={out}", *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after_checkpoint(recipe: Path, out: Path, step: int) -> int:
    """Start a run and SIGKILL it as soon as a checkpoint at or after `step` exists; returns that step."""
    process = start(recipe, out)
    checkpoints = out.with_name(out.name + ".partial") / "checkpoints"
    while process.poll() is None:
        done = [int(d.name.removeprefix("step-")) for d in checkpoints.glob("step-*")]
        if done and max(done) >= step:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return max(done)
        time.sleep(0.02)
    pytest.fail(f"the run ended before step {step}: {process.stderr.read()[-2000:]}")


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    result = peftkit("run", recipe, f"export.output_dir={out}")
    assert result.returncode == 0, result.stderr
    assert not (out / "checkpoints").exists()  # a finished run keeps its adapter, not its checkpoints
    return adapter(out)


@pytest.mark.parametrize("trial", range(3))
def test_killed_and_resumed_run_gives_the_identical_adapter(recipe, uninterrupted, tmp_path, trial):
    step = random.Random(trial).choice([3, 10, 12, 21, 24])  # 10: at an epoch end; the others mid-epoch
    out = tmp_path / "run"
    kill_after_checkpoint(recipe, out, step)
    partial = out.with_name("run.partial")
    assert not out.exists() and partial.exists()

    if trial == 0:  # what a checkpoint holds, and the messages around an unfinished run
        newest = sorted((partial / "checkpoints").glob("step-*"))[-1]
        tensors = load_file(newest / "trainable.safetensors")
        assert tensors and all("lora_" in n or "modules_to_save" in n for n in tensors)  # never the frozen base
        assert {p.suffix for p in newest.iterdir()} == {".json", ".safetensors"}
        state = checkpoint._from_json(
            json.loads((newest / "state.json").read_text()), load_file(newest / "state.safetensors")
        )  # no pickle anywhere
        assert {"optimizer", "scheduler", "torch_rng", "data_generator"} <= set(state)
        assert isinstance(state["python_rng"], tuple) and all(isinstance(k, int) for k in state["optimizer"]["state"])
        assert len(list((partial / "checkpoints").glob("step-*"))) <= 2  # keep_checkpoints
        again = peftkit("run", recipe, f"export.output_dir={out}")
        assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
        changed = peftkit("run", recipe, f"export.output_dir={out}", "train.lr=0.001", "--resume")
        assert changed.returncode == 2 and "recipe differs" in changed.stderr
        assert "train.lr: 0.005 -> 0.001" in changed.stderr  # the difference, named

    resumed = peftkit("run", recipe, f"export.output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-" in (out / "train.log").read_text()
    final = adapter(out)
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[name], uninterrupted[name]) for name in final)


def test_adalora_resumes_its_pruning_exactly(recipe, tmp_path):
    """AdaLoRA's running importance scores and rank pattern live outside the optimizer; the checkpoint holds them,
    so a run killed mid-pruning prunes on as the uninterrupted one does."""
    import yaml

    spec = yaml.safe_load(recipe.read_text())
    spec["method"] = {"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 0.1, "tfinal": 0.2, "delta_t": 1}
    path = tmp_path / "adalora.yaml"
    path.write_text(yaml.safe_dump(spec))
    whole = tmp_path / "whole"
    assert peftkit("run", path, f"export.output_dir={whole}").returncode == 0
    out = tmp_path / "run"
    kill_after_checkpoint(path, out, 12)  # pruning runs from step 3 to step 24 of 30
    resumed = peftkit("run", path, f"export.output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final, expected = adapter(out), adapter(whole)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in final)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == json.loads((whole / "adapter" / "adapter_config.json").read_text())["rank_pattern"]


def test_a_damaged_checkpoint_is_skipped_and_the_run_resumes_from_the_newest_intact_one(
    recipe, uninterrupted, tmp_path
):
    out = tmp_path / "run"
    kill_after_checkpoint(recipe, out, 6)  # keep_checkpoints 2: the newest two, 3 steps apart
    partial = out.with_name("run.partial")
    older, newest = sorted((partial / "checkpoints").glob("step-*"))[-2:]
    shutil.copytree(partial, tmp_path / "lost.partial")
    # what a full disk or a bad copy leaves: the file cut short
    with open(newest / "state.safetensors", "r+b") as f:
        f.truncate(1000)
    resumed = peftkit("run", recipe, f"export.output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    said = "".join(resumed.stderr.split())  # the log wraps lines, paths included
    assert f"checkpoint{newest}isdamaged(state.safetensorshas1,000bytes" in said
    assert f"resumed from {older.name}" in (out / "train.log").read_text()
    final = adapter(out)
    assert max((final[k] - uninterrupted[k]).abs().max().item() for k in final) == 0.0

    # every checkpoint damaged: said, exit 2, nothing started over silently
    lost = tmp_path / "lost.partial" / "checkpoints"
    for folder in lost.glob("step-*"):
        (folder / "trainable.safetensors").write_bytes(b"\0" * 10)
    again = peftkit("run", recipe, f"export.output_dir={tmp_path / 'lost'}", "--resume")
    assert again.returncode == 2
    message = "".join(again.stderr.split())
    assert "nointactcheckpoint" in message and "trainable.safetensorshas10bytes" in message
    assert "--overwrite" in message and (tmp_path / "lost.partial").exists()


def test_lr_auto_resumes_with_the_rate_its_search_chose(recipe, tmp_path):
    """A resumed run does not search again (its shuffles and random states would move): it reads the rate the
    interrupted run chose back from the run folder, and ends with the uninterrupted run's adapter."""
    import yaml

    spec = yaml.safe_load(recipe.read_text())
    spec["train"].update(lr="auto", lr_search={"steps": 20})
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(spec))
    whole = tmp_path / "whole"
    assert peftkit("run", path, f"export.output_dir={whole}").returncode == 0
    out = tmp_path / "run"
    kill_after_checkpoint(path, out, 12)
    resumed = peftkit("run", path, f"export.output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "as the interrupted run's search chose it" in (out / "train.log").read_text()
    final, expected = adapter(out), adapter(whole)
    assert all(torch.equal(final[name], expected[name]) for name in final)
    assert (
        json.loads((out / "metrics.json").read_text())["train"]["lr"]
        == json.loads((whole / "metrics.json").read_text())["train"]["lr"]
    )
