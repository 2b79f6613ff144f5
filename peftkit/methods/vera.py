"""VeRA (Kopiczko et al. 2024), through peft.

    ΔW = Λb B Λd A      A, B: frozen random matrices shared by all layers   Λb, Λd: trained diagonal scalings

Only two vectors per layer train, so VeRA needs ~10x fewer parameters than LoRA at a similar quality; it uses a
much larger r because the random matrices cost nothing to train. Λb starts at zero, so the adapted model equals
the base at init; ΔW folds into W on merge. The shared random matrices are saved with the adapter.
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
    name: Literal["vera"]
    r: int = Field(256, gt=0, description="Rank of the shared random projections.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the VeRA branch's input.")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the Λd scaling vector.")
    seed: int = Field(0, description="Seed of the shared random projections.")
    target_modules: list[str] | None = Field(
        None, description="Layers to adapt. Omitted: peft's list for the architecture (attention projections)."
    )


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PeftModel":
    from peft import VeraConfig

    modules = peft_targets(model, config.target_modules, "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING", context)
    peft_config = VeraConfig(
        r=config.r,
        vera_dropout=config.dropout,
        d_initial=config.d_initial,
        projection_prng_key=config.seed,
        target_modules=modules,
        fan_in_fan_out=uses_conv1d(model, modules),
        modules_to_save=context.head_modules,
    )
    return peft_wrap(model, peft_config, context)
