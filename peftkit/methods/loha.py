"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS), through peft.

    ΔW = (B1 A1) ⊙ (B2 A2)      (Hadamard product of two rank-r products)

The Hadamard product reaches rank r² with the parameters of two rank-r factorisations. One factor starts at
zero, so the adapted model equals the base at init; ΔW folds into W on merge.
"""

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from peftkit.methods.base import Context, peft_targets, peft_wrap, refuse_quantized
from peftkit.methods.targets import refuse_conv1d
from peftkit.sections import Section

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

FORMAT = "peft"  # peft's format: plain `PeftModel.from_pretrained` loads it
MERGEABLE = True


class Config(Section):
    name: Literal["loha"]
    r: int = Field(8, gt=0, description="Rank of each of the two factors.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: ΔW is multiplied by alpha / r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout over the rank dimension while training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping a layer's ΔW in a step.")
    target_modules: list[str] | None = Field(
        None, description="Layers to adapt. Omitted: peft's list for the architecture (attention projections)."
    )


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PeftModel":
    from peft import LoHaConfig

    modules = peft_targets(model, config.target_modules, "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING", context)
    refuse_conv1d(model, modules, "loha")
    # peft builds ΔW in the shape of the base weight, which a 4-bit layer stores packed: the forward pass fails.
    refuse_quantized(
        "method loha",
        model,
        (4,),
        "peft sizes its update from the base weight, which 4-bit "
        "layers store packed; use quantization.bits: 8, or lora",
    )
    peft_config = LoHaConfig(
        r=config.r,
        alpha=config.alpha,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        target_modules=modules,
        modules_to_save=context.head_modules,
    )
    return peft_wrap(model, peft_config, context)
