"""What the methods share: the context a method is applied in, and the helpers its `apply` uses (peft wrapping,
target modules, freezing, refusals), plus the trainable tensors by name that checkpoints and the peftkit format
hold. Saving and loading adapters is methods/storage.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from peftkit.errors import UserError
from peftkit.methods.targets import resolve

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel


@dataclass
class Context:
    """What a method needs to know about the run besides its own options."""

    head_modules: list[str] = field(default_factory=list)  # trained in full next to the method (task head)
    peft_task_type: str | None = None  # SEQ_CLS, CAUSAL_LM, ...: decides which PeftModel subclass wraps
    total_steps: int = 1000  # optimizer steps of the run (AdaLoRA schedules its rank budget over them)
    model_path: str | None = None  # resolved local path or Hub id of the base (prompt tuning's text init)


@runtime_checkable
class Method(Protocol):
    """What a method module defines (methods/__init__.py registers it; tests/test_contracts.py checks each one).
    Heavy imports stay inside its functions, so `peftkit validate` starts without torch."""

    Config: ClassVar[type]  # its recipe section (a Section), with `name: Literal[...]` and its own options
    FORMAT: ClassVar[Literal["peft", "peftkit", "full"]]  # how its adapter is saved (methods/storage.py)
    MERGEABLE: ClassVar[bool]  # whether the trained update folds into the base weights

    def apply(self, model: Any, config: Any, context: Context) -> Any:
        """Freeze the base and add the method; only the method's parameters and the task head train."""


# What a method may define besides, and what holds when it does not. Read through `optional`, never getattr.
OPTIONAL: dict[str, Any] = {
    # str: when not MERGEABLE, why, and what to do instead (`peftkit merge` shows it; required then)
    "NOT_MERGEABLE_BECAUSE": "",
    # (config) -> bool: the method trains or rewrites the base's weights, which are then held in fp32
    # (full fine-tuning; LoRA with PiSSA/OLoRA init or trained biases)
    "rewrites_base": lambda config: False,
    # (model, step): after each optimizer step, before gradients are cleared (AdaLoRA's rank allocation)
    "after_optimizer_step": None,
    # end on the best evaluation's trainable weights; False: on the last ones (AdaLoRA: its masks move)
    "RESTORE_BEST_EPOCH": True,
    # (model) -> dict and (model, dict): state outside the weights and the optimizer that a checkpoint must hold
    # for a resumed run to match an uninterrupted one (AdaLoRA's importance scores)
    "training_state": None,
    "load_training_state": None,
    # (context) -> "left" | None: the padding side the tokenizer must use with this method (prompt methods on
    # decoder classifiers)
    "padding_side": lambda context: None,
    # (model, out): write the adapter itself instead of the format's default (LoRA's PiSSA/OLoRA conversion)
    "save": None,
}


def optional(method: Method, hook: str) -> Any:
    """The method's `hook`, or the default that holds when it does not define it (OPTIONAL)."""
    return getattr(method, hook, OPTIONAL[hook])


def save_peft(model: PeftModel, out: Path, state_dict: dict | None = None) -> None:
    """peft's own save, weights in safetensors. `state_dict`: the model's, when its own would not do (a sharded
    model's, gathered whole); peft picks the adapter's tensors from it as from the model's."""
    # save_embedding_layers=False: the default "auto" looks the base up on the Hub to see if its vocabulary
    # changed; peftkit never resizes the vocabulary.
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)


def quantized_bits(model: torch.nn.Module) -> int | None:
    """8 or 4 when the base was loaded through bitsandbytes (the recipe's quantization section), else None."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if config is None:
        return None
    return 8 if getattr(config, "load_in_8bit", False) else 4 if getattr(config, "load_in_4bit", False) else None


def refuse_quantized(method: str, model: torch.nn.Module, bits: tuple[int, ...], why: str) -> None:
    """A clear error for a method that cannot work on a base quantised to one of `bits`."""
    found = quantized_bits(model)
    if found in bits:
        raise UserError(f"{method} cannot train on a {found}-bit base: {why}")


def left_if_last_token_pooled(context: Context) -> str | None:
    """The `padding_side` hook of methods that feed inputs_embeds (prompt tuning, p-tuning). A decoder classifier
    (head `score`) reads the last non-pad token, which it finds in input_ids; those methods hide them, so it
    reads the last position instead: pad on the left so that the last position is a real token."""
    return "left" if context.peft_task_type == "SEQ_CLS" and "score" in context.head_modules else None


def refuse_per_token_tasks(method: str, context: Context) -> None:
    """peft's prompt methods prepend virtual tokens but leave per-token labels and outputs unshifted: token
    classification then fails on mismatched lengths, and QA's answer positions are off by the prompt length."""
    if context.peft_task_type in ("TOKEN_CLS", "QUESTION_ANS"):
        raise UserError(
            f"method {method} adds virtual tokens in front of the input, which peft does not remove from "
            "per-token outputs, so it cannot tag tokens or point at answer spans; use prefix_tuning (it adds "
            "keys and values, not tokens), lora, or another method"
        )


# --- peft -----------------------------------------------------------------------------------------------------


def peft_wrap(model: PreTrainedModel, peft_config: PeftConfig, context: Context) -> PeftModel:
    from peft import get_peft_model

    peft_config.task_type = context.peft_task_type
    return get_peft_model(model, peft_config)


def peft_targets(model: PreTrainedModel, requested: list[str] | None, mapping_name: str, context: Context) -> list[str]:
    """Requested target modules checked against the model, or peft's per-architecture default list."""
    from peft.utils import constants

    return resolve(model, requested, getattr(constants, mapping_name), context.head_modules)


# --- peftkit's own format -------------------------------------------------------------------------------------


def train_only(model: torch.nn.Module, is_method_param: Callable[[str], bool], context: Context) -> None:
    """Freeze the base; train the method's parameters and the task head."""
    for name, param in model.named_parameters():
        head = any(name == h or name.startswith(h + ".") for h in context.head_modules)
        param.requires_grad_(head or is_method_param(name))


def trainable_in_fp32(model: torch.nn.Module) -> None:
    """Every trainable parameter in fp32, whatever the base is held in: peft makes its adapters fp32 on a half-
    precision base, but a task head copied from the base (modules_to_save) keeps the base's dtype, and AdamW's
    updates (lr x ~1e-3 of a weight) vanish in bf16's 8-bit mantissa."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def trainable_tensors(model: torch.nn.Module) -> dict:
    """A copy of every trainable tensor, on the CPU, by its name in the model: what peftkit-format adapters,
    checkpoints and the kept best epoch hold. A model sharded with FSDP (sharding.py) holds each as a DTensor:
    gathered whole here, on every process, so every process must call it."""
    return {
        n: _whole(p.detach()).to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered from every process (an all-gather); any other tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def load_trainable(model: torch.nn.Module, tensors: dict, source: Path) -> None:
    """Put `tensors` (from trainable_tensors) back into `model`; the names must be exactly its trainable ones. Into a
    sharded model each process copies in its own shard of each tensor."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if any(hasattr(params[n], "device_mesh") for n in tensors):
        from torch.distributed.tensor import distribute_tensor

        tensors = {
            n: distribute_tensor(
                t.to(params[n].device, params[n].dtype), params[n].device_mesh, params[n].placements, src_data_rank=None
            )
            if hasattr(params[n], "device_mesh")
            else t
            for n, t in tensors.items()
        }
    model.load_state_dict(tensors, strict=False)
