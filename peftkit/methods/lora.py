"""LoRA (Hu et al. 2021) and its variants, through peft.

    h = W0 x + s * B A x        W0: frozen (out, in)   A: (r, in), random   B: (out, r), zeros   s = alpha / r

B starts at zero, so the adapted model equals the base at init. Variants, all peft options:
  rslora   s = alpha / sqrt(r) (Kalajdzievski 2023): the update's scale stops shrinking as r grows
  dora     W = m * (W0 + s B A) / ||W0 + s B A|| (Liu et al. 2024): magnitude and direction trained apart
  init     pissa: A, B from the top-r singular vectors of W0, W0 keeps the residual (Meng et al. 2024);
           olora: from a QR decomposition of W0 (Büyükakyüz 2024). Both move W0, so the saved adapter is
           converted into a plain LoRA of rank 2r that applies to the original, unmodified base (below).
After training B A folds into W0 (merge), so inference costs nothing extra.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from peftkit.errors import UserError
from peftkit.methods.base import Context, peft_targets, peft_wrap, refuse_quantized, save_peft
from peftkit.methods.targets import all_linear, uses_conv1d
from peftkit.sections import Section

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

LORA_DEFAULTS = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"  # peft's table (for explicit targets' check)
INITIAL = "_peftkit_initial_lora"  # the model attribute holding PiSSA / OLoRA's B0 A0 (_keep_initial_adapter)
FORMAT = "peft"  # peft's format: plain `PeftModel.from_pretrained` loads it
MERGEABLE = True


class Config(Section):
    name: Literal["lora"]
    r: int = Field(8, gt=0, description="Rank of the update B A.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: list[str] | None = Field(
        None,
        description="Layers to adapt (names or name suffixes). Omitted: every linear layer of the model's body "
        "(attention and feed-forward; not the task head or the output layer), as the QLoRA paper found best; "
        "measured here it scores above query/value LoRA and full fine-tuning (benchmarks/RESULTS.md).",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train too.")
    rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead of alpha / r (rank-stabilised).")
    dora: bool = Field(False, description="Weight-decomposed LoRA: train magnitude and direction separately.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="How A and B start: default (Kaiming A, zero B), gaussian, or from W0 by SVD "
        "(pissa) or QR (olora).",
    )

    @model_validator(mode="after")
    def _init_and_dora(self) -> "Config":
        if self.dora and self.init in ("pissa", "olora"):
            raise ValueError(
                f"init {self.init} cannot be combined with dora: its adapter could not be converted "
                "back to the original base; use one or the other"
            )
        return self


def rewrites_base(config: Config) -> bool:
    # PiSSA/OLoRA: W0 keeps the residual W0 - B0 A0, which rounding would change; bias: the base's own biases train
    # (and are saved whole), next to layer norms that CPU autocast runs in the base's dtype
    return config.init in ("pissa", "olora") or config.bias != "none"


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PeftModel":
    from peft import LoraConfig

    if config.target_modules is None:  # every linear layer of the body (Config.target_modules says why)
        modules = all_linear(model, context.head_modules)
    else:
        modules = peft_targets(model, config.target_modules, LORA_DEFAULTS, context)
    if config.init == "olora" and uses_conv1d(model, modules):
        raise UserError(
            "method.init olora: peft's OLoRA initialisation does not handle GPT-2-style Conv1D layers (the adapted "
            "model fails with a shape error); use init: pissa, or the default, on this model"
        )
    if config.init in ("pissa", "olora"):
        refuse_quantized(
            f"method.init {config.init}",
            model,
            (4, 8),
            "it rewrites the base weights (W0 - B0 A0), "
            "which stay quantised; use the default init, or remove the quantization section",
        )
    if config.dora:
        # Seen on bitsandbytes 0.50's CPU backend: after DoRA reads the 8-bit weight, the layer's own forward fails
        # ("'NoneType' object has no attribute 'dtype'"). DoRA on a 4-bit base works.
        refuse_quantized(
            "method.dora",
            model,
            (8,),
            "peft's DoRA leaves the 8-bit layer unable to run its "
            "forward pass (bitsandbytes 0.50); use quantization.bits: 4, or dora: false",
        )
    init = {"default": True, "gaussian": "gaussian"}.get(config.init, config.init)
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=modules,
        bias=config.bias,
        fan_in_fan_out=uses_conv1d(model, modules),  # GPT-2 Conv1D stores W transposed
        use_rslora=config.rslora,
        use_dora=config.dora,
        init_lora_weights=init,
        modules_to_save=context.head_modules,
    )
    model = peft_wrap(model, peft_config, context)
    if config.init in ("pissa", "olora"):
        _keep_initial_adapter(model, init)
    from peftkit.methods.lora_branch import install  # imports torch and peft: only when a model is adapted

    install(model)  # a cheaper training forward for each LoRA layer (its docstring)
    return model


def _keep_initial_adapter(model: "PeftModel", init: str) -> None:
    """PiSSA / OLoRA subtract their initial B0 A0 from W0; remember B0 A0 (before any step) for the export. It
    travels with the model (the export may happen in another function than `apply`), read only by `save`."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # no Hub lookup
    setattr(model, INITIAL, {k: v.detach().clone() for k, v in state.items() if ".lora_" in k})


def save(model: "PeftModel", out: Path) -> None:
    """The `save` hook (methods/base.py): a PiSSA / OLoRA adapter is converted for the original base; any other
    LoRA is saved as peft saves it."""
    if hasattr(model, INITIAL):
        save_for_original_base(model, out)
    else:
        save_peft(model, out)


def save_for_original_base(model: "PeftModel", out: Path) -> None:
    """Save a PiSSA / OLoRA adapter as a plain LoRA for the unmodified base (the export every user can load).

    The model computes (W0 - s B0 A0) + s B A = W0 + s [B, -B0] [A; A0]: a LoRA of rank 2r with the same scale s.
    peft can do this (save_pretrained's path_initial_model_for_weight_conversion), but in peft 0.21.2 it fails
    with a KeyError when the model has modules_to_save, which every peftkit task head is; so it is done here.
    """
    import copy

    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    initial = getattr(model, INITIAL)
    state = {}
    for key, value in get_peft_model_state_dict(model, save_embedding_layers=False).items():
        if ".lora_A." in key:
            value = torch.cat([value, initial[key]], dim=0)
        elif ".lora_B." in key:
            value = torch.cat([value, -initial[key]], dim=1)
        state[key] = value.detach().contiguous().cpu()
    config = copy.deepcopy(model.peft_config["default"])
    scale_ratio = 2**0.5 if config.use_rslora else 2  # keep alpha / r (or alpha / sqrt r) unchanged at rank 2r
    config.r, config.lora_alpha, config.init_lora_weights = 2 * config.r, config.lora_alpha * scale_ratio, True
    config.save_pretrained(out)
    save_file(state, Path(out) / "adapter_model.safetensors", metadata={"format": "pt"})
