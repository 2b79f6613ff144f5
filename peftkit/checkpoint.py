"""Checkpoints that a killed run can resume from exactly: trainable weights, optimizer, scheduler, gradient
scaler, random states and the position in the data — never the frozen base.

    <run>.partial/checkpoints/step-000120/
        trainable.safetensors   every trainable tensor, by name
        best.safetensors        the best validation epoch's trainable tensors so far (when there is one)
        state.safetensors       the tensors of the optimizer, scheduler, scaler and RNG states ...
        state.json              ... and the rest of those states, with a reference to each tensor: no pickle
                                (the method's own training state too, where it has one: AdaLoRA's scores)
        progress.json           step, epoch, batches done in the epoch, history, best score

A checkpoint is written under a temporary name and renamed when complete, so a folder named step-N is whole;
the last `train.keep_checkpoints` are kept.
"""

import json
import random
import shutil
from pathlib import Path

DIR = "checkpoints"


def save(run_dir: Path, keep: int, model, optimizer, scheduler, scaler, generator_state, progress: dict,
         best_state: dict | None, method_state: dict | None = None) -> Path:  # fmt: skip
    import torch
    from safetensors.torch import save_file

    from peftkit.methods.base import trainable_tensors

    root = Path(run_dir) / DIR
    final = root / f"step-{progress['step']:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_tensors(model), tmp / "trainable.safetensors")
    if best_state is not None:  # already CPU copies (trainable_tensors)
        save_file(best_state, tmp / "best.safetensors")
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
        "data_generator": generator_state,  # the shuffle generator at the start of progress["epoch"]
        "method": method_state,
    }
    tensors: dict = {}
    (tmp / "state.json").write_text(json.dumps(_to_json(state, tensors)), encoding="utf-8")
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "progress.json").write_text(json.dumps(progress, indent=2), encoding="utf-8")
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


def load(folder: Path, model, optimizer, scheduler, scaler) -> dict:
    """Put the checkpoint's weights and optimizer/scheduler/scaler states in place; returns progress.json plus
    the states the loop restores itself (RNG, data generator, best tensors, the method's training state)."""
    from safetensors.torch import load_file

    from peftkit.methods.base import load_trainable

    load_trainable(model, load_file(folder / "trainable.safetensors"), folder)
    state = _from_json(json.loads((folder / "state.json").read_text()), load_file(folder / "state.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    progress = json.loads((folder / "progress.json").read_text())
    best = folder / "best.safetensors"
    progress["best_state"] = load_file(best) if best.exists() else None
    progress["rng"] = state
    progress["method_state"] = state.get("method")  # .get: checkpoints written before it was saved
    return progress


def _to_json(value, tensors: dict):
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


def _from_json(value, tensors: dict):
    (kind, content), = value.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {_from_json(k, tensors): _from_json(v, tensors) for k, v in content}
    if kind in ("list", "tuple"):
        items = [_from_json(v, tensors) for v in content]
        return tuple(items) if kind == "tuple" else items
    return content


def restore_rng(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])


def remove(run_dir: Path) -> None:
    """Checkpoints are for resuming; a finished run keeps only its adapter."""
    shutil.rmtree(Path(run_dir) / DIR, ignore_errors=True)
