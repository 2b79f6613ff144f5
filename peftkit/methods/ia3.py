"""IA3 (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than in-context
learning"), through peft.

Learned vectors rescale keys, values and the feed-forward activations:  h = l ⊙ (W x). The vectors start at one,
so the adapted model equals the base at init; they fold into W on merge. The smallest method here: one number
per channel of each adapted layer.
"""

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from peftkit.methods.base import Context, peft_targets, peft_wrap
from peftkit.methods.targets import uses_conv1d
from peftkit.sections import Section

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

FORMAT = "peft"  # peft's format: plain `PeftModel.from_pretrained` loads it
MERGEABLE = True


class Config(Section):
    name: Literal["ia3"]
    target_modules: list[str] | None = Field(
        None,
        description="Layers whose output is rescaled. Omitted: peft's list for the architecture (keys, "
        "values and the feed-forward output layer).",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Which of target_modules are feed-forward layers (their *input* is rescaled). "
        "Omitted: peft's list for the architecture.",
    )


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PeftModel":
    from peft import IA3Config

    modules = peft_targets(model, config.target_modules, "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING", context)
    if config.feedforward_modules is None and config.target_modules is not None:
        feedforward = []  # the user chose the targets: only what they name as feed-forward is treated as such
    else:
        feedforward = peft_targets(
            model, config.feedforward_modules, "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING", context
        )
    peft_config = IA3Config(
        target_modules=modules,
        feedforward_modules=[m for m in feedforward if m in modules],
        fan_in_fan_out=uses_conv1d(model, modules),
        modules_to_save=context.head_modules,
    )
    return peft_wrap(model, peft_config, context)
