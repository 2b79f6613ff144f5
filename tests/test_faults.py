"""Faults during a run: a diverging loss, running out of memory, data too small for a batch. Each ends in a
message naming the problem and the fix (or a documented, logged handling), and nothing that looks finished."""

import json

import pytest

from peftkit.errors import UserError
from peftkit.recipe import load_recipe
from peftkit.run import run


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(recipe_file, tmp_path):
    from safetensors.torch import load_file

    # lr 1e30 without clipping: step 1 leaves huge but finite weights, step 2 overflows them
    path = recipe_file(
        train={
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e30,
            "max_grad_norm": None,
            "warmup_ratio": 0,
            "checkpoint_every": 1,
            "log_every": 100,
        }
    )
    with pytest.raises(UserError) as err:
        run(load_recipe(path))
    message = str(err.value)
    assert "became nan" in message and "at step 2" in message
    assert "train.lr 1e+30" in message and "train.max_grad_norm" in message and "fp16" not in message
    partial = tmp_path / "runs" / "recipe.partial"
    kept = sorted((partial / "checkpoints").glob("step-*"))
    assert [k.name for k in kept] == ["step-000001"] and str(kept[0]) in message
    assert all(t.isfinite().all() for t in load_file(kept[0] / "trainable.safetensors").values())
    assert {p.suffix for p in kept[0].iterdir()} == {".safetensors", ".json"}  # no pickle
    assert not (tmp_path / "runs" / "recipe").exists()
    # a checkpoint of a 2-process run cannot be resumed in 1 process: its batch positions and schedule differ
    progress = json.loads((kept[0] / "progress.json").read_text())
    assert progress["processes"] == 1
    (kept[0] / "progress.json").write_text(json.dumps({**progress, "processes": 2}))
    (kept[0] / "manifest.json").unlink()  # the edit no longer matches it: as a checkpoint from before manifests
    with pytest.raises(UserError, match=r"2 process\(es\), this one has 1; resume with --processes 2"):
        run(load_recipe(path), resume=True)


def test_out_of_memory_names_the_knobs_with_the_recipe_values(recipe_file, tmp_path, monkeypatch):
    import torch

    from peftkit import batches

    def hungry(batch):
        return {"x": torch.empty(1 << 50, dtype=torch.uint8)}  # 1 PiB: the CPU allocator's real refusal

    monkeypatch.setattr(batches, "model_inputs", hungry)
    with pytest.raises(UserError) as err:
        run(load_recipe(recipe_file()))
    message = str(err.value)
    assert message.startswith("out of memory on cpu")
    for knob in (
        "train.batch_size (16",
        "train.grad_accum",
        "task.max_length (32)",
        "gradient_checkpointing: true",
        "quantization.bits",
        "eval.batch_size",
    ):
        assert knob in message
    assert (tmp_path / "runs" / "recipe.partial").is_dir() and not (tmp_path / "runs" / "recipe").exists()


def test_train_split_smaller_than_a_batch_trains_on_all_of_it(recipe_file, tmp_path, caplog):
    from .conftest import sentiment_rows, write_csv

    small = write_csv(tmp_path / "small.csv", sentiment_rows(20))
    path = recipe_file(
        data={"source": str(small), "columns": {"text": "review", "label": "sentiment"}},
        train={"epochs": 2, "batch_size": 32, "lr": 5e-3},
    )
    with caplog.at_level("WARNING", logger="peftkit"):
        report = run(load_recipe(path))
    assert "fewer than train.batch_size 32" in caplog.text
    assert report.metrics == json.loads((report.output / "metrics.json").read_text())  # what was written
    assert report.metrics["train"]["steps"] == 2  # one (partial) batch per epoch
