"""The command line end to end on a tiny model: run -> eval -> predict -> merge, and its error paths."""

import json

import pytest

from .conftest import peftkit, peftkit_here


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert, sentiment_csv):
    import yaml

    folder = tmp_path_factory.mktemp("cli")
    recipe = {
        "model": {"name": str(tiny_bert)},
        "data": {"source": str(sentiment_csv), "columns": {"text": "review", "label": "sentiment"}},
        "task": {"type": "classification", "max_length": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"batch_size": 8, "lr": 1e-2, "log_every": 1},
        "export": {"output_dir": str(folder / "runs" / "{name}")},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = peftkit("run", path, "train.max_steps=2", "eval.metric_for_best=macro_f1")
    assert result.returncode == 0, result.stderr
    return path, folder / "runs" / "tiny", result


def test_run_leaves_a_complete_run_folder(finished_run):
    _, run_dir, result = finished_run
    folder = sorted(p.name for p in run_dir.iterdir())
    assert folder == ["adapter", "memory.json", "memory.png", "metrics.json", "recipe.yaml", "tensorboard", "train.log"]
    assert not run_dir.with_name("tiny.partial").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "f1_per_class"}
    # LoRA r 4 on every linear layer of the 2-layer, 32-wide BERT (and its pooler) + the 2-label head: as test_lora
    assert metrics["train"]["steps"] == 2 and metrics["trainable_params"] == 3906
    resolved = (run_dir / "recipe.yaml").read_text()
    assert "max_steps: 2" in resolved and "metric_for_best: macro_f1" in resolved and "weight_decay" in resolved
    assert "step 2  loss" in (run_dir / "train.log").read_text()
    assert "test" in result.stdout and "accuracy" in result.stdout
    adapter = {p.name for p in (run_dir / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftkit.json"} <= adapter


def test_run_records_where_its_memory_went(finished_run):
    _, run_dir, _ = finished_run
    timeline = json.loads((run_dir / "memory.json").read_text())
    phases = [phase for _, phase in timeline["events"]]
    assert phases[:3] == ["data", "model", "training"] and phases[-2:] == ["final scores", "export"]
    assert "validation, step 2" in phases  # the loop's evaluations, marked as they begin
    times = [t for t, _ in timeline["samples"]]
    assert len(times) >= 2 and times == sorted(times) and all(mib > 100 for _, mib in timeline["samples"])
    assert timeline["memory"] == "resident set, MiB"  # CPU
    assert (run_dir / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_writes_tensorboard_scalars(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "validation/accuracy"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # log_every 1, 2 steps


def test_existing_run_folder_is_refused(finished_run):
    path, run_dir, _ = finished_run
    result = peftkit_here("run", path, "train.max_steps=1")
    assert result.returncode == 2 and "already exists; pass --overwrite" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_reproduces_the_run_metrics(finished_run):
    _, run_dir, _ = finished_run
    result = peftkit_here("eval", run_dir, "--split", "test")
    assert result.returncode == 0, result.stderr
    expected = json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"]
    assert f"{expected:.4f}" in result.stdout
    scripted = peftkit_here("eval", run_dir, "--split", "test", "--json")
    assert scripted.returncode == 0, scripted.stderr
    assert json.loads(scripted.stdout)["test"]["accuracy"] == expected  # stdout is the JSON alone


def test_predict_texts_and_file(finished_run, tmp_path):
    _, run_dir, _ = finished_run
    texts = tmp_path / "texts.txt"
    texts.write_text("a lovely film\n\nthe plot was dull\n")
    result = peftkit_here("predict", run_dir, "good movie", "--file", texts)
    assert result.returncode == 0, result.stderr
    for text in ("good movie", "a lovely film", "the plot was dull"):
        assert text in result.stdout
    assert result.stdout.count("pos") + result.stdout.count("neg") >= 3
    scripted = peftkit_here("predict", run_dir, "good movie", "--file", texts, "--json")
    assert scripted.returncode == 0, scripted.stderr
    rows = json.loads(scripted.stdout)
    assert [row["text"] for row in rows] == ["good movie", "a lovely film", "the plot was dull"]
    assert all(row["label"] in ("pos", "neg") for row in rows)


def test_merge_writes_a_verified_standalone_model(finished_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftkit.errors import UserError
    from peftkit.export import merge

    _, run_dir, _ = finished_run
    out = tmp_path / "merged"
    result = peftkit("merge", run_dir, out)
    assert result.returncode == 0, result.stderr
    assert "max abs logit difference" in result.stdout
    assert (out / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"} and not any("lora" in n for n, _ in model.named_parameters())
    again = peftkit_here("merge", run_dir, out)
    assert again.returncode == 2 and "already exists; pass --overwrite (or --force)" in again.stderr
    forced = peftkit_here("merge", run_dir, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # replaced whole: no .partial / .old left

    with pytest.raises(UserError, match="nothing to re-quantise"):  # --requantize on a full-precision run
        merge(run_dir, tmp_path / "requantized", requantize=True)
    assert not (tmp_path / "requantized").exists()
    strict = peftkit_here("merge", run_dir, tmp_path / "strict", "--tolerance", "1e-30")
    if strict.returncode != 0:  # bit-exact merges happen; a non-zero difference must be refused cleanly
        assert strict.returncode == 2 and "merge check failed" in strict.stderr
        assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.partial").exists()


def test_user_errors_exit_2_with_the_fix(recipe_file, tmp_path):
    missing_column = recipe_file(data={"source": str(tmp_path / "nope.csv")})
    result = peftkit("run", missing_column)
    assert result.returncode == 2 and "file not found" in result.stderr and "Traceback" not in result.stderr

    result = peftkit("run", recipe_file(), "train.epochs=three", "method.rr=2")
    assert result.returncode == 2 and "train.epochs" in result.stderr and "method.rr" in result.stderr

    result = peftkit("predict", tmp_path)
    assert result.returncode == 2 and "nothing to predict" in result.stderr
    result = peftkit("predict", tmp_path, "text")
    assert result.returncode == 2 and "not a finished peftkit run folder" in result.stderr


def test_failed_run_leaves_only_a_partial_folder(recipe_file, tmp_path, sentiment_csv):
    path = recipe_file(
        data={"source": str(sentiment_csv), "columns": {"text": "review", "label": "sentiment"}, "labels": ["neg"]}
    )
    result = peftkit_here("run", path)
    assert result.returncode == 2 and "labels not in data.labels" in result.stderr
    runs = tmp_path / "runs"
    assert [p.name for p in runs.iterdir()] == ["recipe.partial"]
    assert "labels not in data.labels" in (runs / "recipe.partial" / "train.log").read_text()
    again = peftkit_here("run", path)
    assert again.returncode == 2 and "unfinished earlier run" in again.stderr


def test_unreachable_hub_model_is_a_clear_error(recipe_file):
    import os
    import subprocess
    import sys

    path = recipe_file(model={"name": "someone/not-a-packaged-model"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network here either way; offline mode fails fast
    result = subprocess.run(
        [sys.executable, "-m", "peftkit", "run", str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert "could not load 'someone/not-a-packaged-model'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("method", [{"name": "bottleneck", "reduction_factor": 4}, {"name": "full"}])
def test_methods_without_a_peft_format_run_eval_predict_and_refuse_merge(method, recipe_file, tmp_path):
    """peftkit's own format (bottleneck) and full fine-tuning (a whole model) through the same commands."""
    path = recipe_file(method=method)
    result = peftkit_here("run", path, "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "recipe"
    adapter = {p.name for p in (run_dir / "adapter").iterdir()}
    assert (
        ("peftkit_adapter.safetensors" in adapter)
        if method["name"] == "bottleneck"
        else ("model.safetensors" in adapter)
    )
    result = peftkit_here("eval", run_dir, "--split", "test")
    assert result.returncode == 0, result.stderr
    expected = json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"]
    assert f"{expected:.4f}" in result.stdout  # the reloaded adapter reproduces the run's predictions
    assert peftkit_here("predict", run_dir, "a lovely film").returncode == 0
    result = peftkit_here("merge", run_dir, tmp_path / "merged")
    assert result.returncode == 2 and "cannot be merged" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "merged").exists()


def test_adalora_prunes_ranks_through_the_training_loop(recipe_file, tmp_path):
    """The loop calls AdaLoRA's after_optimizer_step: its final rank pattern is saved with the adapter."""
    path = recipe_file(method={"name": "adalora", "init_r": 4, "target_r": 2, "delta_t": 1, "tinit": 0.0})
    result = peftkit_here("run", path, "train.max_steps=8")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "runs" / "recipe" / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"], "AdaLoRA never allocated ranks: after_optimizer_step was not called"
    assert config["total_step"] == 8
    result = peftkit_here("merge", tmp_path / "runs" / "recipe", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
