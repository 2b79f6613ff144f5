"""Saving and loading what a method trained, in one of three formats (the method's FORMAT says which):

- "peft": peft's format (adapter_config.json + adapter_model.safetensors) for every method peft can express, so
  plain `PeftModel.from_pretrained(base, adapter_dir)` loads it.
- "peftkit": peftkit's own format for the methods peft lacks or breaks (prefix tuning, bottleneck adapters):
      peftkit_adapter.safetensors   every trainable tensor (method + task head), by its name in the model
      peftkit_adapter.json          {"method": name, "config": the method's recipe section}
  Loading = apply the method to a fresh base with that config, then copy the tensors in (names must match).
- "full": full fine-tuning saves the whole model with `save_pretrained`.

A method may write its adapter itself (its optional `save` hook: LoRA's PiSSA/OLoRA conversion).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.methods import METHODS
from peftkit.methods.base import Context, load_trainable, optional, save_peft, trainable_tensors

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel

OWN_WEIGHTS = "peftkit_adapter.safetensors"
OWN_CONFIG = "peftkit_adapter.json"


def save(
    model: torch.nn.Module, out: Path, method_config: Any, base_model_name: str, gathered: dict | None = None
) -> str:
    """Write the trained part of `model` into `out` in its method's format; returns the format's name.
    `gathered`: the trained tensors of a model sharded with FSDP (sharding.py), gathered whole, from which the
    files are written instead of the model's own shards; the method's `save` hook is then skipped (it converts
    PiSSA/OLoRA adapters, which FSDP refuses: sharding.refuse_unsupported)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    method = METHODS[method_config.name]
    if method.FORMAT == "peft":
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_model_name  # as the user named it (a Hub id travels)
    writes_itself = optional(method, "save")
    # a sharded model's state dict: the gathered tensors, and its buffers (never sharded; VeRA saves its own)
    state = None if gathered is None else {**dict(model.named_buffers()), **gathered}
    if writes_itself is not None and gathered is None:
        writes_itself(model, out)
    elif method.FORMAT == "peft":
        save_peft(model, out, state)
    elif method.FORMAT == "full":
        model.save_pretrained(out, safe_serialization=True, state_dict=state)
    else:
        save_own(model, out, method_config.name, method_config, gathered)
    return method.FORMAT


def load(base_model: PreTrainedModel, adapter_dir: Path, context: Context) -> PreTrainedModel | PeftModel:
    """`base_model` with the adapter in `adapter_dir` applied, whichever format it was saved in."""
    import torch
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(base_model, adapter_dir)
    if (adapter_dir / OWN_CONFIG).is_file():
        return load_own(base_model, adapter_dir, context)
    return type(base_model).from_pretrained(adapter_dir, dtype=torch.float32)  # full fine-tuning: a whole model


def load_weights(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Copy the trained tensors saved in `adapter_dir` into `model`, to which the same method with the same options
    was just applied (a run starting from a published adapter). Raises ValueError when they do not fit."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if (adapter_dir / "adapter_config.json").is_file():
        # peft saves names without the adapter name ("...lora_A.weight"); this puts them back under "default"
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        result = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir), device="cpu"))
        missing, unexpected = trainable & set(result.missing_keys), result.unexpected_keys
    elif (adapter_dir / OWN_CONFIG).is_file():
        return load_trainable(model, load_file(adapter_dir / OWN_WEIGHTS), adapter_dir)
    else:  # full fine-tuning: the whole model (tied weights are stored once, so only unexpected names count)
        tensors = {k: v for f in sorted(adapter_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
        result = model.load_state_dict(tensors, strict=False)
        missing, unexpected = set(), result.unexpected_keys
    if missing or unexpected:
        raise ValueError(f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def save_own(model: torch.nn.Module, out: Path, method_name: str, config: Any, gathered: dict | None = None) -> None:
    """`gathered`: the trained tensors, already taken (a sharded model's, gathered whole); None: taken here."""
    from safetensors.torch import save_file

    tensors = gathered if gathered is not None else trainable_tensors(model)
    save_file(tensors, Path(out) / OWN_WEIGHTS, metadata={"format": "pt", "method": method_name})
    info = {"method": method_name, "config": config.model_dump(mode="json")}
    (Path(out) / OWN_CONFIG).write_text(json.dumps(info, indent=2), encoding="utf-8")


def load_own(base: PreTrainedModel, adapter_dir: Path, context: Context) -> PreTrainedModel:
    """A base with a peftkit-format adapter applied and its trained tensors loaded."""
    from safetensors.torch import load_file

    info = json.loads((Path(adapter_dir) / OWN_CONFIG).read_text())
    method = METHODS[info["method"]]
    model = method.apply(base, method.Config.model_validate(info["config"]), context)
    load_trainable(model, load_file(Path(adapter_dir) / OWN_WEIGHTS), adapter_dir)
    return model
