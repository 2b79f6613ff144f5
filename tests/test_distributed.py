"""Data parallelism: `peftkit run --processes 2` on CPU (torchrun's launcher, gloo), one tiny model."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import batches
from peftkit.recipe import TrainSection

from .conftest import NEGATIVE, POSITIVE, make_bert, make_llama, peftkit, peftkit_here, small_recipe, write_csv


def test_an_epoch_has_fewer_steps_per_process():
    cfg = TrainSection(epochs=2, batch_size=16, grad_accum=1)
    assert batches.total_steps(160, cfg) == 20
    assert batches.total_steps(160, cfg, processes=2) == 10
    assert batches.total_steps(161, cfg, processes=2) == 2 * math.ceil(161 / 32)
    assert batches.total_steps(160, TrainSection(max_steps=7), processes=4) == 7  # optimizer steps, as given


def test_two_processes_train_once_and_score_every_row_once(tmp_path, recipe_file):
    # 200 rows -> 160 / 20 / 20; eval batches of 3 do not divide 20 rows evenly over 2 processes
    recipe = recipe_file(eval={"batch_size": 3, "splits": ["validation", "test"]})
    result = peftkit("run", recipe, "--processes", "2", "train.epochs=2", "train.log_every=1")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "recipe"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["recipe"]  # no .partial left, written once
    assert result.stdout.count("run folder:") == 1  # reported by the main process only
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2
    assert metrics["train"]["steps"] == 2 * math.ceil(160 / (16 * 2))  # each step: 16 rows in each process
    for split in ("validation", "test"):
        assert metrics[split]["rows"] == 20  # gathered predictions: none duplicated, none dropped
    # the exported adapter, evaluated in one process, scores what the two processes reported
    alone = peftkit_here("eval", run_dir, "--split", "validation")
    assert alone.returncode == 0, alone.stderr
    accuracy = metrics["validation"]["accuracy"]
    assert f"{accuracy:.4f}" in alone.stdout
    assert (run_dir / "train.log").read_text().count("training: 2 epoch(s)") == 1


def test_a_user_error_in_the_processes_exits_2(tmp_path, recipe_file, sentiment_csv):
    # found by the processes once they read the data (the recipe itself is valid)
    data = {"source": str(sentiment_csv), "columns": {"text": "review", "label": "sentiment"}, "labels": ["neg", "meh"]}
    result = peftkit("run", recipe_file(data=data), "--processes", "2")
    assert result.returncode == 2, result.stderr
    assert "'pos'" in result.stderr and not (tmp_path / "runs" / "recipe").exists()
    assert result.stderr.count("'pos'") == 1  # said once, by the launcher, not by each process


def test_a_killed_process_is_named_first_in_plain_words(tmp_path, recipe_file):
    import psutil

    command = [sys.executable, "-m", "peftkit", "run", str(recipe_file()), "--processes", "2"]
    command += ["train.epochs=50", "train.checkpoint_every=2"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "runs" / "recipe.partial" / "checkpoints"
    while launcher.poll() is None and not list(checkpoints.glob("step-*")):  # training, both processes in step
        time.sleep(0.05)
    assert launcher.poll() is None, launcher.stderr.read()[-2000:]
    rank_1 = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(rank_1) == 1
    rank_1[0].kill()  # what the kernel's out-of-memory killer does: SIGKILL, no word from the process
    stderr = launcher.communicate(timeout=120)[1]
    assert launcher.returncode == 128 + signal.SIGKILL
    # the cause, in plain words, before any traceback or gloo's "Connection closed by peer" (none of them printed)
    before, said, after = stderr.partition("error: process 1 of 2 failed first: ended by SIGKILL\n")
    assert said and "Traceback" not in stderr and "Connection" not in before, stderr[-3000:]
    assert after.startswith("The other processes stopped after it (process 0:") and "out-of-memory killer" in after


def test_the_job_names_its_cause_not_the_processes_that_died_of_it(tmp_path):
    from peftkit import launch

    def record(rank, when, cause, message):
        failure = launch._Failure(rank, when, 1, launch.CAUSES.index(cause), message)
        (tmp_path / f"rank-{rank}.json").write_text(json.dumps(dataclasses.asdict(failure)))

    # process 1 killed; process 0's collective then fails, recorded a moment before the launcher noticed the kill
    record(0, 100.25, "collective", "DistBackendError: Connection closed by peer")
    failures = launch._failures(tmp_path, {0: (1, 100), 1: (-9, 100)})
    assert [(f.rank, f.message, f.code) for f in failures] == [
        (1, "ended by SIGKILL", 137),
        (0, "DistBackendError: Connection closed by peer", 1),
    ]
    # process 1's own error; the launcher then stopped process 0 (SIGTERM)
    (tmp_path / "rank-0.json").unlink()
    record(1, 100.5, "error", "ValueError: Unsupported device type 'meta'")
    failures = launch._failures(tmp_path, {0: (-15, 100), 1: (1, 101)})
    assert [f.rank for f in failures] == [1, 0] and failures[1].message == "ended by SIGTERM"
    with pytest.raises(launch.ProcessFailed, match="process 1 of 2 failed first: ValueError: Unsupported") as failed:
        launch._report(failures, 2)
    assert "process 0: ended by SIGTERM" in failed.value.details and failed.value.code == 1


# Sharded training: train.distributed.strategy fsdp (torch's FSDP2, peftkit/sharding.py) against DDP on the same data
# and effective batch (2 processes x 16 rows). fp32, no dropout anywhere: both strategies then compute the same sums
# (FSDP's reduce-scatter and DDP's all-reduce each add two processes' gradients), and a resumed run has no random
# state to differ in. Measured here: the adapters are bit-identical (max |difference| 0.0); asserted to TOLERANCE.
TOLERANCE = 1e-5  # max |difference| of the merged models' logits, FSDP against DDP


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory):
    """The tiny BERT without dropout."""
    folder = make_bert(tmp_path_factory.mktemp("models") / "still-bert")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def still_llama(tmp_path_factory):
    """A 2-layer Llama with tied input and output embeddings (as SmolLM2's), over the tiny BERT's vocabulary."""
    return make_llama(tmp_path_factory.mktemp("models") / "still-llama", tie=True)


def write_recipe(folder: Path, model: Path, data: Path, task: dict, **train) -> Path:
    import yaml

    recipe = small_recipe(model, data, folder / "runs")
    if task["type"] == "causal_lm":
        recipe["data"] = {"source": str(data), "columns": {"prompt": "instruction", "response": "answer"}}
    recipe["task"] = task
    recipe["method"] = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    recipe["train"] = {"batch_size": 16, "lr": 5e-3, "precision": "fp32", **train}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def bert_recipe(tmp_path_factory, still_bert, sentiment_csv):
    folder = tmp_path_factory.mktemp("fsdp-bert")
    task = {"type": "classification", "max_length": 32}
    return write_recipe(folder, still_bert, sentiment_csv, task, epochs=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def bert_runs(bert_recipe):
    """The same recipe trained with each strategy on 2 processes: {strategy: run folder}."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = bert_recipe.parent / strategy
        result = peftkit(
            "run", bert_recipe, "--processes", "2", f"train.distributed.strategy={strategy}", f"export.output_dir={out}"
        )
        assert result.returncode == 0, result.stderr
        runs[strategy] = out
    return runs


def merged_logits(auto_class: type, base: Path, adapter: Path, batch: dict) -> torch.Tensor:
    """The logits of `base` with the adapter loaded by plain peft, merged."""
    from peft import PeftModel

    model = auto_class.from_pretrained(base, **({"num_labels": 2} if "Sequence" in auto_class.__name__ else {}))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        return merged(**batch).logits


def test_fsdp_trains_what_ddp_trains_and_saves_it_in_peft_format(bert_runs, still_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit import export

    ddp, fsdp = bert_runs["ddp"], bert_runs["fsdp"]
    log = (fsdp / "train.log").read_text()
    assert (
        "fsdp: 3 block(s) (FSDPBertEmbeddings, FSDPBertLayer)" in log and "fsdp:" not in (ddp / "train.log").read_text()
    )
    # the same files, the same tensor names and shapes as a single-process run writes
    assert sorted(p.name for p in (fsdp / "adapter").iterdir()) == sorted(p.name for p in (ddp / "adapter").iterdir())
    ours, theirs = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (fsdp, ddp))
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
    batch = export.probe_batch(AutoTokenizer.from_pretrained(still_bert), length=12)
    a, b = (
        merged_logits(AutoModelForSequenceClassification, still_bert, run / "adapter", batch) for run in (fsdp, ddp)
    )
    assert (a - b).abs().max().item() <= TOLERANCE
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (fsdp, ddp)]
    for split in ("validation", "test"):
        assert metrics[0][split]["rows"] == 20  # every row scored once, as under DDP
        assert abs(metrics[0][split]["accuracy"] - metrics[1][split]["accuracy"]) < 1e-9
    assert [p["process"] for p in metrics[0]["memory"]["per_process"]] == [0, 1]  # each process's own peaks


def test_fsdp_killed_and_resumed_gives_the_uninterrupted_adapter(bert_recipe, bert_runs, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "peftkit", "run", str(bert_recipe), "--processes", "2"]
    command += ["train.distributed.strategy=fsdp", f"export.output_dir={out}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = out.with_name("run.partial") / "checkpoints"
    while process.poll() is None and not list(checkpoints.glob("step-*")):  # step 3 of 10: mid-epoch
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read()[-2000:]
    process.send_signal(signal.SIGKILL)  # the launcher; its processes die with it (launch.die_with_launcher)
    process.wait()
    newest = load_file(sorted(checkpoints.glob("step-*"))[-1] / "trainable.safetensors")
    assert newest and all("lora_" in n or "modules_to_save" in n for n in newest)  # whole tensors, trainable only
    assert newest["base_model.model.classifier.modules_to_save.default.weight"].shape == (2, 32)
    resumed = peftkit(
        "run",
        bert_recipe,
        "--processes",
        "2",
        "train.distributed.strategy=fsdp",
        f"export.output_dir={out}",
        "--resume",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-" in (out / "train.log").read_text()
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    whole = load_file(bert_runs["fsdp"] / "adapter" / "adapter_model.safetensors")
    assert final.keys() == whole.keys()
    assert max((final[k] - whole[k]).abs().max().item() for k in final) == 0.0  # measured: exact


def test_an_accelerate_fsdp_config_shards_a_causal_lm_as_ddp_trains_it(tmp_path, still_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import export

    data = tmp_path / "pairs.csv"
    rows = [{"instruction": f"was the movie {w}", "answer": "good" if w in POSITIVE else "bad"} for w in POSITIVE * 4]
    rows += [{"instruction": f"was it {w}", "answer": "bad"} for w in NEGATIVE * 4]
    write_csv(data, rows)
    recipe = write_recipe(
        tmp_path, still_llama, data, {"type": "causal_lm", "max_length": 16}, batch_size=8, max_steps=6
    )
    runs = {}
    for strategy, env in (("ddp", {}), ("fsdp", {"ACCELERATE_USE_FSDP": "true"})):  # accelerate launch's variable
        runs[strategy] = tmp_path / strategy
        result = peftkit(
            "run", recipe, "--processes", "2", f"export.output_dir={runs[strategy]}", env={**os.environ, **env}
        )
        assert result.returncode == 0, result.stderr
    assert "fsdp: 2 block(s) (FSDPLlamaDecoderLayer)" in (runs["fsdp"] / "train.log").read_text()
    assert "strategy: fsdp" in (runs["fsdp"] / "recipe.yaml").read_text()  # what ran, in the recipe it keeps
    batch = export.probe_batch(AutoTokenizer.from_pretrained(still_llama), length=12)
    a, b = (merged_logits(AutoModelForCausalLM, still_llama, runs[s] / "adapter", batch) for s in ("fsdp", "ddp"))
    assert (a - b).abs().max().item() <= TOLERANCE
    perplexity = [json.loads((runs[s] / "metrics.json").read_text())["test"]["perplexity"] for s in ("fsdp", "ddp")]
    assert abs(perplexity[0] - perplexity[1]) <= 1e-4 * perplexity[1]


def test_fsdp_refuses_a_quantised_base_saying_why(bert_recipe, tmp_path):
    result = peftkit(
        "run",
        bert_recipe,
        "--processes",
        "2",
        "train.distributed.strategy=fsdp",
        "quantization.bits=4",
        f"export.output_dir={tmp_path / 'q'}",
    )
    assert result.returncode == 2, result.stderr
    assert "cannot shard a 4-bit base" in result.stderr and "quant_state" in result.stderr


def test_a_sharded_runs_other_processes_read_no_weights(tmp_path, still_llama):
    """What every process but the main one loads under strategy fsdp: the model on the meta device, tied weights
    still one parameter; the FSDP tests above show the shards then arrive from the main process intact."""
    from peftkit import loading
    from peftkit.recipe import load_recipe
    from peftkit.tasks import TASKS

    path = write_recipe(tmp_path, still_llama, tmp_path / "unread.csv", {"type": "causal_lm", "max_length": 16})
    recipe = load_recipe(path)
    _, model = loading.adapted_model(recipe, TASKS["causal_lm"], None, torch.device("cpu"), "fp32", 10, True)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    inner = model.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_weightless_classifier_has_the_real_ones_parameters(bert_recipe):
    """The meta-device build (no weights read, nothing kernelized) of a classifier with its head and adapter: the
    same parameter names, shapes and trainable set as the main process's real one, which its shards must fill."""
    from peftkit import loading
    from peftkit.recipe import load_recipe
    from peftkit.tasks import TASKS

    recipe, task, cpu = load_recipe(bert_recipe), TASKS["classification"], torch.device("cpu")
    shapes = {}
    for weightless in (True, False):
        _, model = loading.adapted_model(recipe, task, ["neg", "pos"], cpu, "fp32", 10, weightless)
        shapes[weightless] = {n: (tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()}
        assert {p.device.type for p in model.parameters()} == {"meta" if weightless else "cpu"}
    assert shapes[True] == shapes[False]
