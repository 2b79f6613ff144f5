"""Checkpoints that a killed run can resume from exactly: trainable weights, optimizer, scheduler, gradient
scaler, random states and the position in the data — never the frozen base.

    <run>.partial/checkpoints/step-000120/
        trainable.safetensors   every trainable tensor, by name
        best.safetensors        the best validation epoch's trainable tensors so far (when there is one)
        state.pt                optimizer, scheduler, scaler and RNG states (tensors and plain values only:
                                read back with torch.load(weights_only=True), no pickled objects)
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
         best_state: dict | None) -> Path:  # fmt: skip
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
    }
    torch.save(state, tmp / "state.pt")
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
    the states the loop restores itself (RNG, data generator, best tensors)."""
    import torch
    from safetensors.torch import load_file

    from peftkit.methods.base import load_trainable

    load_trainable(model, load_file(folder / "trainable.safetensors"), folder)
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    progress = json.loads((folder / "progress.json").read_text())
    best = folder / "best.safetensors"
    progress["best_state"] = load_file(best) if best.exists() else None
    progress["rng"] = state
    return progress


def restore_rng(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def remove(run_dir: Path) -> None:
    """Checkpoints are for resuming; a finished run keeps only its adapter."""
    shutil.rmtree(Path(run_dir) / DIR, ignore_errors=True)
