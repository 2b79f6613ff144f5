"""train.report_to: MLflow (a file store in the run folder) and W&B (an offline run) through accelerate's trackers,
beside TensorBoard. What a run logged is read back with each tool's own reader; a missing package stops the run
before it starts; train.tensorboard and train.report_to never contradict each other silently."""

import importlib.util
import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest
import yaml

from peftkit.errors import UserError
from peftkit.recipe import validate

from .conftest import peftkit, peftkit_here, small_recipe
from .test_recipe import BASE

INSTALLED = [name for name in ("mlflow", "wandb") if importlib.util.find_spec(name) is not None]
FOLDERS = {"mlflow": "mlruns", "wandb": "wandb"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_bert, sentiment_csv):
    """One run of 4 steps, its loss logged at each and an evaluation every 2, reporting to every installed tracker
    and not to TensorBoard; in a process of its own (W&B starts its service there)."""
    if not INSTALLED:
        pytest.skip("neither mlflow nor wandb is installed")
    folder = tmp_path_factory.mktemp("tracked")
    recipe = small_recipe(tiny_bert, sentiment_csv, folder / "runs")
    recipe["train"].update(max_steps=4, log_every=1, report_to=INSTALLED)
    recipe["eval"] = {"every_steps": 2}
    path = folder / "tracked.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = peftkit("run", path, env={**os.environ, **wandb_dirs(folder)})
    assert result.returncode == 0, result.stderr
    run_dir = folder / "runs" / "tracked"
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def wandb_dirs(folder: Path) -> dict[str, str]:
    """W&B's own folders (its service's logs, settings, staging), kept out of the home directory."""
    return {f"WANDB_{kind}_DIR": str(folder / f"wandb-{kind.lower()}") for kind in ("CACHE", "CONFIG", "DATA")}


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) as train.log has them (4 decimals)."""
    found = re.findall(r" step (\d+)\s+loss ([0-9.]+)", (run_dir / "train.log").read_text())
    return [(int(step), float(loss)) for step, loss in found]


def test_the_run_folder_holds_each_trackers_store_and_no_tensorboard(tracked_run):
    run_dir, _ = tracked_run
    expected = {"adapter", "memory.json", "memory.png", "metrics.json", "recipe.yaml", "train.log"}
    expected |= {FOLDERS[name] for name in INSTALLED}
    assert {p.name for p in run_dir.iterdir()} == expected  # report_to without tensorboard: no tensorboard/
    assert "tensorboard: false" in (run_dir / "recipe.yaml").read_text()  # the resolved recipe says it too


# --- MLflow -----------------------------------------------------------------------------------------------------


def mlflow_client(store: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.13 opens a file store only when told
    return MlflowClient(tracking_uri=store.absolute().as_uri())


def only_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_mlflow_holds_the_recipe_as_params_and_every_logged_metric(tracked_run, monkeypatch):
    pytest.importorskip("mlflow")
    run_dir, metrics = tracked_run
    client = mlflow_client(run_dir / "mlruns", monkeypatch)
    run = only_run(client, "tracked")  # the experiment is the recipe's name, so is the run
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"

    params = run.data.params  # the resolved recipe, flat
    assert params["train.lr"] == "0.005" and params["method.r"] == "4" and params["train.max_steps"] == "4"
    assert params["data.columns.text"] == "review" and json.loads(params["train.report_to"]) == INSTALLED
    assert params["train.warmup_ratio"] == "0.06"  # defaults too

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    losses = history("train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert losses == [(step, pytest.approx(loss, abs=1e-4)) for step, loss in logged_losses(run_dir)]
    for key in ("train/lr", "train/samples_per_s", "train/tokens_per_s"):
        assert [step for step, _ in history(key)] == [1, 2, 3, 4], key
    evaluations = metrics["train"]["history"]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert history("validation/accuracy") == [(e["step"], e["validation"]["accuracy"]) for e in evaluations]
    assert history("validation/macro_f1") == [(e["step"], e["validation"]["macro_f1"]) for e in evaluations]
    for split in ("validation", "test"):  # the kept adapter's, at the last step
        assert history(f"final/{split}/accuracy") == [(4, metrics[split]["accuracy"])]
    assert "mlflow ui --backend-store-uri" in (run_dir / "train.log").read_text()


def test_the_mlflow_store_is_plain_text(tracked_run):
    pytest.importorskip("mlflow")
    run_dir, _ = tracked_run
    files = [p for p in (run_dir / "mlruns").rglob("*") if p.is_file()]
    assert any(p.name == "meta.yaml" for p in files)
    for file in files:  # YAML and one-line-per-value text: nothing to unpickle
        file.read_text(encoding="utf-8")


# --- W&B --------------------------------------------------------------------------------------------------------


def wandb_records(path: Path) -> dict[str, list]:
    """The records of a W&B run file (run-ID.wandb) by kind: history, config, run, exit, ... W&B writes them as
    protobuf messages framed like LevelDB's log: 32 KiB blocks of chunks, each with a 7-byte header (checksum,
    length, type: 1 whole, 2 first, 3 middle, 4 last), after the file's own 7-byte header (':W&B', magic, version)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, chunks, pos = {}, b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            name = record.WhichOneof("record_type")
            records.setdefault(name, []).append(getattr(record, name))
            chunks = b""
    return records


def wandb_history(records: dict[str, list]) -> list[dict]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in row.item}
        for row in records.get("history", [])
    ]


def test_wandb_keeps_an_offline_run_with_the_config_and_history(tracked_run):
    pytest.importorskip("wandb")
    run_dir, metrics = tracked_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # what `wandb sync` uploads
    records = wandb_records(next(offline.glob("run-*.wandb")))
    (run,) = records["run"]
    assert run.project == "tracked" and run.display_name == "tracked" and offline.name.endswith(run.run_id)
    config = {item.key: json.loads(item.value_json) for update in records["config"] for item in update.update}
    assert config["train.lr"] == 0.005 and config["method.r"] == 4

    rows = wandb_history(records)
    losses = [(row["_step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert losses == [(step, pytest.approx(loss, abs=1e-4)) for step, loss in logged_losses(run_dir)]
    evaluations = [(row["_step"], row["validation/accuracy"]) for row in rows if "validation/accuracy" in row]
    assert evaluations == [(e["step"], e["validation"]["accuracy"]) for e in metrics["train"]["history"]]
    assert [row["final/test/accuracy"] for row in rows if "final/test/accuracy" in row] == [metrics["test"]["accuracy"]]
    assert [record.exit_code for record in records["exit"]] == [0]
    assert f"wandb sync {offline}" in (run_dir / "train.log").read_text()


# --- a missing package, and an interrupted run -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_missing_tracker_package_stops_the_run_before_it_starts(recipe_file, tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import NAME` fails, as when it is not installed
    result = peftkit_here("run", recipe_file(), f"train.report_to=[tensorboard, {name}]")
    assert result.returncode == 2, result.stderr
    assert f"pip install 'peftkit[{name}]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # said before any loading: no run folder, not even a .partial one


def test_a_resumed_run_continues_its_mlflow_and_wandb_runs(recipe_file, tmp_path, monkeypatch):
    """Interrupted at its second evaluation (after the checkpoint of the first), then resumed: MLflow continues
    the interrupted run (marked FAILED meanwhile); W&B writes a second offline folder under the same run id."""
    pytest.importorskip("mlflow")
    from peftkit import evaluation
    from peftkit.recipe import load_recipe
    from peftkit.run import run

    for key, value in wandb_dirs(tmp_path).items():
        monkeypatch.setenv(key, value)
    report_to = INSTALLED  # mlflow, and wandb when it is installed
    path = recipe_file(
        train={"max_steps": 4, "batch_size": 16, "lr": 5e-3, "log_every": 1, "report_to": report_to},
        eval={"every_steps": 2},
    )
    evaluate, calls = evaluation.evaluate, []

    def crash_at_the_second(*args, **kwargs) -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", crash_at_the_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(load_recipe(path))
    partial = tmp_path / "runs" / "recipe.partial"
    crashed = only_run(mlflow_client(partial / "mlruns", monkeypatch), "recipe")
    assert crashed.info.status == "FAILED"

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    out = run(load_recipe(path), resume=True).output
    client = mlflow_client(out / "mlruns", monkeypatch)
    resumed = only_run(client, "recipe")
    assert resumed.info.run_id == crashed.info.run_id and resumed.info.status == "FINISHED"
    steps = {
        key: sorted(m.step for m in client.get_metric_history(resumed.info.run_id, key)) for key in resumed.data.metrics
    }
    assert steps["validation/accuracy"] == [2, 4] and steps["final/test/accuracy"] == [4]
    assert steps["train/loss"] == [1, 2, 3, 3, 4, 4]  # steps 3 and 4, after the checkpoint, were trained twice

    if "wandb" in report_to:
        first, second = sorted((out / "wandb").glob("offline-run-*"))
        assert first.name.rpartition("-")[2] == second.name.rpartition("-")[2]  # one run id: `wandb sync` joins them
        exits = [wandb_records(next(folder.glob("run-*.wandb")))["exit"][0].exit_code for folder in (first, second)]
        assert exits == [1, 0]


# --- train.report_to and train.tensorboard -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "report_to", "tensorboard"),
    [
        ({}, ["tensorboard"], True),
        ({"tensorboard": False}, [], False),  # the older switch still turns TensorBoard off
        ({"tensorboard": "false", "report_to": []}, [], False),
        ({"report_to": ["mlflow"]}, ["mlflow"], False),
        ({"report_to": "wandb"}, ["wandb"], False),  # train.report_to=wandb on the command line
        (
            {"report_to": ["tensorboard", "mlflow", "wandb"], "tensorboard": True},
            ["tensorboard", "mlflow", "wandb"],
            True,
        ),
    ],
)
def test_report_to_and_tensorboard_agree_in_the_resolved_recipe(given, report_to, tensorboard):
    recipe = validate({**BASE, "train": given})
    assert recipe.train.report_to == report_to and recipe.train.tensorboard is tensorboard
    assert validate(yaml.safe_load(recipe.to_yaml())) == recipe  # both written out, and they agree


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"tensorboard": False, "report_to": ["tensorboard", "mlflow"]},
            "train.tensorboard is false but train.report_to lists tensorboard",
        ),
        ({"tensorboard": True, "report_to": ["mlflow"]}, "train.tensorboard is true but train.report_to does not list"),
        ({"report_to": ["mlflow", "mlflow"]}, "train.report_to lists mlflow more than once"),
        ({"report_to": ["comet"]}, "train.report_to"),
    ],
)
def test_contradictions_and_unknown_trackers_are_errors(given, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate({**BASE, "train": given})
