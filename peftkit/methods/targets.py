"""Which layers a method adapts: per-architecture defaults (peft's table) and a check that every requested
target matches something, so a typo fails loudly instead of training nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def adaptable_layers(model: torch.nn.Module, exclude: list[str]) -> list[str]:
    """Names of the Linear / GPT-2 Conv1D layers a method could adapt, minus the task head."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not any(_within(name, h) for h in exclude)
    ]


def all_linear(model: torch.nn.Module, head: list[str]) -> list[str]:
    """Every Linear / Conv1D layer of the model's body, as the last parts of their names (query, dense, ...): the
    task head and the output layer (a language model's lm_head) left out. A last part that a left-out layer
    shares (RoBERTa's classifier.dense) gives the body's layers by their full names instead."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    left_out = list(head) + [name for name, module in model.named_modules() if output is not None and module is output]
    body = adaptable_layers(model, left_out)
    others = set(adaptable_layers(model, [])) - set(body)
    chosen = set()
    for name in body:
        last = name.rsplit(".", 1)[-1]
        chosen.add(name if any(_matches(other, last) for other in others) else last)
    return sorted(chosen)


def resolve(
    model: PreTrainedModel, requested: list[str] | None, defaults: dict[str, list[str]], exclude: list[str]
) -> list[str]:
    """The requested targets after checking each one matches a layer, or the architecture's defaults."""
    layers = adaptable_layers(model, exclude)
    candidates = sorted({name.rsplit(".", 1)[-1] for name in layers})
    if requested is None:
        model_type = model.config.model_type
        if model_type not in defaults:
            raise UserError(
                f"no default target modules for model type '{model_type}'; set method.target_modules to some of: "
                + ", ".join(candidates)
            )
        return list(defaults[model_type])
    unmatched = [t for t in requested if not any(_matches(name, t) for name in layers)]
    if unmatched:
        hints = "".join(did_you_mean(t, candidates) for t in unmatched)
        raise UserError(
            f"method.target_modules: {', '.join(map(repr, unmatched))} match no layer of this model{hints}; "
            f"candidate layers: {', '.join(candidates)}"
        )
    return list(requested)


def uses_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    """GPT-2 stores its projections as Conv1D (weight transposed): LoRA must know (peft's fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(module, Conv1D) and any(_matches(name, t) for t in targets) for name, module in model.named_modules()
    )


def _within(name: str, excluded: str) -> bool:
    """The layer is the excluded module or inside it (RoBERTa's head `classifier` holds dense and out_proj)."""
    return _matches(name, excluded) or name.startswith(excluded + ".") or f".{excluded}." in name


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of target names: the full name, or its last dotted components.
    return name == target or name.endswith("." + target)


def refuse_conv1d(model: torch.nn.Module, targets: list[str], method: str) -> None:
    """peft's LyCORIS methods (LoHa, LoKr) adapt nn.Linear only, not GPT-2's transposed Conv1D layers."""
    if uses_conv1d(model, targets):
        raise UserError(
            f"method {method}: peft implements it for nn.Linear layers only, and this model's target layers "
            f"({', '.join(targets)}) are GPT-2-style Conv1D layers; use lora, ia3, vera or bottleneck on this model"
        )
