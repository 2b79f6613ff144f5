"""LoRA (Hu et al. 2021) through peft.

    h = W0 x + (alpha / r) * B A x        W0: frozen (out, in)   A: (r, in), random   B: (out, r), zeros

B starts at zero, so the adapted model equals the base at init. Only A and B (and the task head) train; after
training B A folds into W0 (merge), so inference costs nothing extra.
"""

from typing import Literal

from pydantic import Field

from peftkit.config import Section

MERGEABLE = True


class Config(Section):
    name: Literal["lora"]
    r: int = Field(8, gt=0, description="Rank of the update B A.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: list[str] | None = Field(
        None, description="Layers to adapt (names or name suffixes). Omitted: the attention projections peft "
        "lists for the architecture (query/value for BERT, c_attn for GPT-2, q_proj/v_proj for Llama)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train too.")


def apply(model, config: Config, head_modules: list[str], peft_task_type: str):
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from peftkit.methods import targets

    modules = targets.resolve(model, config.target_modules, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, head_modules)
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=modules,
        bias=config.bias,
        fan_in_fan_out=targets.uses_conv1d(model, modules),
        modules_to_save=head_modules,
        task_type=peft_task_type,
    )
    return get_peft_model(model, peft_config)
