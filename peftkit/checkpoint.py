"""Checkpoints that a killed run can resume from exactly: trainable weights, optimizer, scheduler, gradient
scaler, random states and the position in the data — never the frozen base.

    <run>.partial/checkpoints/step-000120/
        trainable.safetensors   every trainable tensor, by name
        best.safetensors        the best validation epoch's trainable tensors so far (when there is one)
        state.safetensors       the tensors of the optimizer, scheduler, scaler and RNG states ...
        state.json              ... and the rest of those states, with a reference to each tensor: no pickle
                                (the method's own training state too, where it has one: AdaLoRA's scores)
        progress.json           step, epoch, batches done in the epoch, history, best score, processes
        manifest.json           each file's size and SHA-256, written last: what resume checks first

All of it is one TrainingState (training_state.py) and the states of an Optimization: save() writes them, load()
reads them back.

A checkpoint is written under a temporary name and renamed when complete, so a folder named step-N was whole when
written; the last `train.keep_checkpoints` are kept. What happens to it afterwards (a full disk, a bad copy, a
file cut short) is found by its manifest: resume takes the newest checkpoint whose files still match (intact()).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import sharding
from peftkit.errors import UserError
from peftkit.methods.base import load_trainable
from peftkit.training_state import Optimization, TrainingState

if TYPE_CHECKING:
    import torch

log = logging.getLogger("peftkit")

DIR = "checkpoints"
MANIFEST = "manifest.json"
RNG = ("torch_rng", "cuda_rng", "python_rng")  # state.json's keys for TrainingState.rng


def save(
    run_dir: Path, keep: int, weights: dict, optimizer_state: dict, optimization: Optimization, state: TrainingState
) -> Path:
    """Write `state` whole (its `rng` taken by the caller: rng_now()) with the model's trainable tensors (`weights`:
    methods.base.trainable_tensors), the optimizer's state (sharding.optimizer_state: whole under FSDP too) and
    `optimization`'s other states, as <run_dir>/checkpoints/step-<state.step>. Taking `weights` and
    `optimizer_state` is a collective under FSDP, so every process takes them and the main process alone saves."""
    from safetensors.torch import save_file

    root = Path(run_dir) / DIR
    final = root / f"step-{state.step:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / "trainable.safetensors")
    if state.best_state is not None:  # already CPU copies (trainable_tensors)
        save_file(state.best_state, tmp / "best.safetensors")
    states = {
        "optimizer": optimizer_state,
        "scheduler": optimization.scheduler.state_dict(),
        "scaler": optimization.scaler.state_dict() if optimization.scaler is not None else None,
        **{key: state.rng[key] for key in RNG},
        "data_generator": state.data_generator,  # the shuffle generator at the start of state.epoch
        "method": state.method_state,
    }
    tensors: dict = {}
    (tmp / "state.json").write_text(json.dumps(_to_json(states, tensors)), encoding="utf-8")
    save_file(tensors, tmp / "state.safetensors")
    progress = {
        "step": state.step,
        "epoch": state.epoch,
        "batches": state.batches,
        "history": state.history,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "processes": state.processes,
        "best_step": state.best_step,
        "stale": state.stale,
        "first_loss": state.first_loss,
        "recoveries": state.recoveries,
        "logged_losses": state.logged_losses,
    }
    (tmp / "progress.json").write_text(json.dumps(progress, indent=2), encoding="utf-8")
    manifest = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = sorted((Path(run_dir) / DIR).glob("step-*"))
    return found[-1] if found else None


def intact(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run folder whose files match its manifest, each damaged one newer than it named
    in a warning; None when there is no checkpoint. Raises UserError when there are checkpoints but none intact."""
    found = sorted((Path(run_dir) / DIR).glob("step-*"), reverse=True)
    damaged = []
    for folder in found:
        problem = damage(folder)
        if problem is None:
            return folder
        log.warning("checkpoint %s is damaged (%s): skipped", folder, problem)
        damaged.append(f"{folder.name} ({problem})")
    if damaged:
        raise UserError(
            f"--resume: no intact checkpoint in {Path(run_dir) / DIR}: {'; '.join(damaged)}. The run cannot continue "
            "from them; pass --overwrite to start it over"
        )
    return None


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files against its manifest (missing, cut short, changed), or None."""
    manifest = folder / MANIFEST
    try:
        expected = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:  # written by a peftkit before manifests: whole when renamed, not checkable since
        log.info("checkpoint %s has no %s (an older peftkit's): its files are not verified", folder, MANIFEST)
        return None
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable: {err}"
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, {want['bytes']:,} when written"
        if _sha256(path) != want["sha256"]:
            return f"{name} changed since it was written (SHA-256 differs)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load(folder: Path, model: torch.nn.Module, optimization: Optimization) -> TrainingState:
    """Put the checkpoint's weights and optimizer/scheduler/scaler states in place (every process, each taking its
    shard of a sharded model's); returns the training state it
    holds, whose random states, data generator, best tensors and method state the loop restores itself."""
    from safetensors.torch import load_file

    load_trainable(model, load_file(folder / "trainable.safetensors"), folder)
    states = _from_json(json.loads((folder / "state.json").read_text()), load_file(folder / "state.safetensors"))
    sharding.load_optimizer_state(model, optimization.optimizer, states["optimizer"])
    optimization.scheduler.load_state_dict(states["scheduler"])
    if optimization.scaler is not None and states["scaler"] is not None:
        optimization.scaler.load_state_dict(states["scaler"])
    progress = json.loads((folder / "progress.json").read_text())
    best = folder / "best.safetensors"
    return TrainingState(
        step=progress["step"],
        epoch=progress["epoch"],
        batches=progress["batches"],
        history=progress["history"],
        best_score=progress["best_score"],
        best_epoch=progress["best_epoch"],
        best_state=load_file(best) if best.exists() else None,
        data_generator=states["data_generator"],
        rng={key: states[key] for key in RNG},
        method_state=states.get("method"),  # .get: checkpoints written before it was saved
        processes=progress.get("processes", 1),  # likewise
        best_step=progress.get("best_step"),  # likewise (epoch-end evaluations only then: best_epoch says it)
        stale=progress.get("stale", 0),
        first_loss=progress.get("first_loss"),  # likewise
        recoveries=progress.get("recoveries", []),  # likewise
        logged_losses=progress.get("logged_losses", []),  # likewise
    )


def _to_json(value: Any, tensors: dict) -> dict[str, Any]:
    """A state (nested dicts with int keys, lists, tuples, tensors, numbers) as JSON, its tensors moved to
    `tensors` by number. Written here because torch.save would pickle, and these states are not flat."""
    import torch

    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[_to_json(k, tensors), _to_json(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_to_json(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _from_json(value: dict[str, Any], tensors: dict) -> Any:
    ((kind, content),) = value.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {_from_json(k, tensors): _from_json(v, tensors) for k, v in content}
    if kind in ("list", "tuple"):
        items = [_from_json(v, tensors) for v in content]
        return tuple(items) if kind == "tuple" else items
    return content


def rng_now() -> dict:
    """This process's random states (torch's, every CUDA device's, Python's): TrainingState.rng."""
    import torch

    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }


def restore_rng(rng: dict) -> None:
    """Put back the random states rng_now() took."""
    import torch

    torch.set_rng_state(rng["torch_rng"])
    if rng["cuda_rng"]:
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    random.setstate(rng["python_rng"])


def remove(run_dir: Path) -> None:
    """Checkpoints are for resuming; a finished run keeps only its adapter."""
    shutil.rmtree(Path(run_dir) / DIR, ignore_errors=True)
