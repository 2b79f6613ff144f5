"""What every method shares: the context it is applied in, and the two adapter formats.

- peft's format (adapter_config.json + adapter_model.safetensors) for every method peft can express, so plain
  `PeftModel.from_pretrained(base, adapter_dir)` loads it.
- peftkit's own format for the methods peft lacks or breaks (prefix tuning, bottleneck adapters):
      peftkit_adapter.safetensors   every trainable tensor (method + task head), by its name in the model
      peftkit_adapter.json          {"method": name, "config": the method's recipe section}
  Loading = apply the method to a fresh base with that config, then copy the tensors in (names must match).
- Full fine-tuning saves the whole model with `save_pretrained`.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

OWN_WEIGHTS = "peftkit_adapter.safetensors"
OWN_CONFIG = "peftkit_adapter.json"


@dataclass
class Context:
    """What a method needs to know about the run besides its own options."""

    head_modules: list[str] = field(default_factory=list)  # trained in full next to the method (task head)
    peft_task_type: str | None = None  # SEQ_CLS, CAUSAL_LM, ...: decides which PeftModel subclass wraps
    total_steps: int = 1000  # optimizer steps of the run (AdaLoRA schedules its rank budget over them)
    model_path: str | None = None  # resolved local path or Hub id of the base (prompt tuning's text init)


def quantized_bits(model) -> int | None:
    """8 or 4 when the base was loaded through bitsandbytes (the recipe's quantization section), else None."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if config is None:
        return None
    return 8 if getattr(config, "load_in_8bit", False) else 4 if getattr(config, "load_in_4bit", False) else None


def refuse_quantized(method: str, model, bits: tuple[int, ...], why: str) -> None:
    """A clear error for a method that cannot work on a base quantised to one of `bits`."""
    found = quantized_bits(model)
    if found in bits:
        from peftkit.errors import UserError

        raise UserError(f"{method} cannot train on a {found}-bit base: {why}")


def pad_left_if_last_token_pooled(model, context: Context) -> None:
    """A decoder classifier (head `score`) reads the last non-pad token, which it finds in input_ids; methods
    that feed inputs_embeds (prompt tuning, p-tuning) hide them, so it reads the last position instead: pad on
    the left so that the last position is a real token. The run applies it to the tokenizer (run.py)."""
    if context.peft_task_type == "SEQ_CLS" and "score" in context.head_modules:
        model.peftkit_padding_side = "left"


def refuse_per_token_tasks(method: str, context: Context) -> None:
    """peft's prompt methods prepend virtual tokens but leave per-token labels and outputs unshifted: token
    classification then fails on mismatched lengths, and QA's answer positions are off by the prompt length."""
    if context.peft_task_type in ("TOKEN_CLS", "QUESTION_ANS"):
        from peftkit.errors import UserError

        raise UserError(
            f"method {method} adds virtual tokens in front of the input, which peft does not remove from "
            "per-token outputs, so it cannot tag tokens or point at answer spans; use prefix_tuning (it adds "
            "keys and values, not tokens), lora, or another method"
        )


def format_of(model) -> str:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return "peft"
    return "full" if getattr(model, "peftkit_full", False) else "peftkit"


def save(model, out: Path, method_config, base_model_name: str) -> str:
    """Write the trained part of `model` into `out` in its method's format; returns the format's name."""
    Path(out).mkdir(parents=True, exist_ok=True)
    fmt = format_of(model)
    if fmt == "peft":
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_model_name  # as the user named it (a Hub id travels)
        if hasattr(model, "peftkit_initial_lora"):  # PiSSA / OLoRA: moved W0, so convert (methods/lora.py)
            from peftkit.methods.lora import save_for_original_base

            save_for_original_base(model, out)
        else:
            # save_embedding_layers=False: the default "auto" looks the base up on the Hub to see if its
            # vocabulary changed; peftkit never resizes the vocabulary.
            model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    elif fmt == "full":
        model.save_pretrained(out, safe_serialization=True)
    else:
        save_own(model, out, method_config.name, method_config)
    return fmt


def load(base_model, adapter_dir: Path, context: Context):
    """`base_model` with the adapter in `adapter_dir` applied, whichever format it was saved in."""
    import torch
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(base_model, adapter_dir)
    if (adapter_dir / OWN_CONFIG).is_file():
        return load_own(base_model, adapter_dir, context)
    return type(base_model).from_pretrained(adapter_dir, dtype=torch.float32)  # full fine-tuning: a whole model


def load_weights(model, adapter_dir: Path) -> None:
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


# --- peft -----------------------------------------------------------------------------------------------------


def peft_wrap(model, peft_config, context: Context):
    from peft import get_peft_model

    peft_config.task_type = context.peft_task_type
    return get_peft_model(model, peft_config)


def peft_targets(model, requested, mapping_name: str, context: Context) -> list[str]:
    """Requested target modules checked against the model, or peft's per-architecture default list."""
    from peft.utils import constants

    from peftkit.methods import targets

    return targets.resolve(model, requested, getattr(constants, mapping_name), context.head_modules)


# --- peftkit's own format -------------------------------------------------------------------------------------


def train_only(model, is_method_param, context: Context) -> None:
    """Freeze the base; train the method's parameters and the task head."""
    for name, param in model.named_parameters():
        head = any(name == h or name.startswith(h + ".") for h in context.head_modules)
        param.requires_grad_(head or is_method_param(name))


def trainable_in_fp32(model) -> None:
    """Every trainable parameter in fp32, whatever the base is held in: peft makes its adapters fp32 on a half-
    precision base, but a task head copied from the base (modules_to_save) keeps the base's dtype, and AdamW's
    updates (lr x ~1e-3 of a weight) vanish in bf16's 8-bit mantissa."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def trainable_tensors(model) -> dict:
    """A copy of every trainable tensor, on the CPU, by its name in the model: what peftkit-format adapters,
    checkpoints and the kept best epoch hold."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict, source) -> None:
    """Put `tensors` (from trainable_tensors) back into `model`; the names must be exactly its trainable ones."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(tensors, strict=False)


def save_own(model, out: Path, method_name: str, config) -> None:
    from safetensors.torch import save_file

    save_file(trainable_tensors(model), Path(out) / OWN_WEIGHTS, metadata={"format": "pt", "method": method_name})
    info = {"method": method_name, "config": config.model_dump(mode="json")}
    (Path(out) / OWN_CONFIG).write_text(json.dumps(info, indent=2), encoding="utf-8")


def load_own(base, adapter_dir: Path, context: Context):
    """A base with a peftkit-format adapter applied and its trained tensors loaded."""
    from safetensors.torch import load_file

    from peftkit.methods import METHODS

    info = json.loads((Path(adapter_dir) / OWN_CONFIG).read_text())
    method = METHODS[info["method"]]
    model = method.apply(base, method.Config.model_validate(info["config"]), context)
    load_trainable(model, load_file(Path(adapter_dir) / OWN_WEIGHTS), adapter_dir)
    return model

