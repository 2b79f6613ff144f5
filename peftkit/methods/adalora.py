"""AdaLoRA (Zhang et al. 2023), through peft.

    ΔW = P Λ Q      an SVD-shaped update whose singular values Λ are pruned during training

Every layer starts at rank init_r; after a warm-up (tinit steps) the least important singular values are
pruned, every delta_t steps, until the total budget reaches target_r per layer, tfinal steps before the end.
Rank goes where it helps most. The training loop calls `after_optimizer_step` for the pruning. Λ starts at zero,
so the adapted model equals the base at init; ΔW folds into W on merge.
"""

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from peftkit.methods.base import Context, peft_targets, peft_wrap
from peftkit.sections import Section

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

FORMAT = "peft"  # peft's format: plain `PeftModel.from_pretrained` loads it
MERGEABLE = True
# The saved adapter is cut to the final rank pattern; an earlier epoch's weights predate the pruning and would
# not be what is saved, so the run keeps the last epoch's adapter instead of the best one.
RESTORE_BEST_EPOCH = False


class Config(Section):
    name: Literal["adalora"]
    init_r: int = Field(12, gt=0, description="Rank every layer starts with.")
    target_r: int = Field(8, gt=0, description="Average rank per layer left after pruning.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: ΔW is multiplied by alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the update's input.")
    tinit: float = Field(0.1, ge=0, lt=1, description="Share of the steps before pruning starts.")
    tfinal: float = Field(0.2, ge=0, lt=1, description="Share of the steps at the end with the final ranks fixed.")
    delta_t: int = Field(10, gt=0, description="Prune every this many steps.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the loss keeping P and Q orthogonal.")
    target_modules: list[str] | None = Field(
        None, description="Layers to adapt. Omitted: peft's list for the architecture (attention projections)."
    )

    @model_validator(mode="after")
    def _budget(self) -> "Config":
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.tinit + self.tfinal >= 1:
            raise ValueError("tinit + tfinal must leave steps for pruning (their sum must be below 1)")
        return self


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PeftModel":
    from peft import AdaLoraConfig

    modules = peft_targets(
        model, config.target_modules, "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING", context
    )
    total = max(context.total_steps, 3)
    peft_config = AdaLoraConfig(
        init_r=config.init_r,
        target_r=config.target_r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        tinit=int(config.tinit * total),
        tfinal=int(config.tfinal * total),
        deltaT=config.delta_t,
        orth_reg_weight=config.orth_reg_weight,
        total_step=total,
        target_modules=modules,
        modules_to_save=context.head_modules,
    )
    return peft_wrap(model, peft_config, context)


def after_optimizer_step(model: "PeftModel", step: int) -> None:
    """Prune singular values by importance (peft needs the gradients: call before zero_grad)."""
    model.base_model.update_and_allocate(step)


# peft's rank allocator keeps running importance scores (smoothed sensitivity and uncertainty per parameter) outside
# the optimizer, and the rank pattern chosen so far in the adapter's config: a checkpoint holds both, so a resumed
# run prunes exactly as an uninterrupted one would.
SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def training_state(model: "PeftModel") -> dict:
    allocator = model.base_model.rankallocator
    config = model.peft_config[model.base_model.trainable_adapter_name]
    return {**{name: dict(getattr(allocator, name)) for name in SCORES}, "rank_pattern": config.rank_pattern}


def load_training_state(model: "PeftModel", state: dict) -> None:
    allocator = model.base_model.rankallocator
    device = next(p.device for p in model.parameters() if p.requires_grad)
    for name in SCORES:
        setattr(allocator, name, {key: tensor.to(device) for key, tensor in state[name].items()})
    model.peft_config[model.base_model.trainable_adapter_name].rank_pattern = state["rank_pattern"]
