"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) — peftkit's own, because peft has none and
the `adapters` library pins transformers 4.x (~=4.57), and peftkit runs on transformers 5.

A small two-layer network is added on the output of a sublayer, before its residual connection:

    h  <-  h + up(f(down(h)))        down: d -> d / reduction_factor    up: d / reduction_factor -> d, zeros

  houlsby: after the attention output projection and after the feed-forward output layer of every block
  pfeiffer: after the feed-forward output layer only (half the parameters, about the same quality)

`up` starts at zero, so the adapted model equals the base at init. Not mergeable: the non-linearity f cannot be
folded into a weight matrix. Saved in peftkit's format (methods/base.py).
"""

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from peftkit.errors import UserError
from peftkit.methods.base import Context, train_only
from peftkit.sections import Section

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

FORMAT = "peftkit"  # peftkit's own format (peft lacks or breaks this method)
MERGEABLE = False
NOT_MERGEABLE_BECAUSE = (
    "a bottleneck adapter has a non-linearity between its two layers, which no weight matrix can absorb. "
    "Serve the base with the adapter: `peftkit predict RUN_DIR`, or peftkit.run.load_trained(RUN_DIR) in Python."
)
ATTR = "peftkit_adapter"

# Regexes over module names: the attention output projection and the feed-forward output layer, per family.
SUBLAYERS = {
    "bert": (r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"),
    "gpt2": (r"attn\.c_proj$", r"mlp\.c_proj$"),
    "llama": (r"self_attn\.o_proj$", r"mlp\.down_proj$"),
    "distilbert": (r"attention\.out_lin$", r"ffn\.lin2$"),
}
FAMILY = {
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "camembert": "bert",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "phi3": "llama",
}


class Config(Section):
    name: Literal["bottleneck"]
    style: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only."
    )
    reduction_factor: int = Field(16, gt=0, description="Bottleneck width = hidden size / reduction_factor.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="f between the layers.")
    init_std: float = Field(1e-2, gt=0, description="Std of the down projection's normal init (up starts at 0).")
    attention_modules: str | None = Field(
        None, description="Regex over module names for the attention output layers; omitted: per architecture."
    )
    ffn_modules: str | None = Field(
        None, description="Regex over module names for the feed-forward output layers; omitted: per architecture."
    )


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PreTrainedModel":
    import torch
    from transformers.activations import ACT2FN

    class Bottleneck(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.down = torch.nn.Linear(width, max(1, width // config.reduction_factor))
            self.act = ACT2FN[config.non_linearity]
            self.up = torch.nn.Linear(self.down.out_features, width)
            torch.nn.init.normal_(self.down.weight, std=config.init_std)
            torch.nn.init.zeros_(self.down.bias)
            torch.nn.init.zeros_(self.up.weight)  # zero up: the block is the identity at init
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, h: "torch.Tensor") -> "torch.Tensor":
            return h + self.up(self.act(self.down(h)))

    for _, module in _targets(model, config, context):
        width = module.nf if hasattr(module, "nf") else module.out_features  # GPT-2 Conv1D: nf
        module.add_module(ATTR, Bottleneck(width).to(module.weight.device))
        module.register_forward_hook(lambda mod, args, out: getattr(mod, ATTR)(out))
    train_only(model, lambda name: f".{ATTR}." in name, context)
    return model


def _targets(model: "PreTrainedModel", config: Config, context: Context) -> list[tuple[str, "torch.nn.Module"]]:
    model_type = model.config.model_type
    defaults = SUBLAYERS.get(FAMILY.get(model_type, model_type))
    attention = config.attention_modules or (defaults and defaults[0])
    ffn = config.ffn_modules or (defaults and defaults[1])
    names = [n for n, m in model.named_modules() if hasattr(m, "weight") and n]
    if not attention or not ffn:
        raise UserError(
            f"method.bottleneck: no default layers for model type '{model_type}'; set method.attention_modules "
            f"and method.ffn_modules (regexes over module names), e.g. from: {', '.join(names[:12])} ..."
        )
    patterns = [("method.ffn_modules", ffn)]
    if config.style == "houlsby":
        patterns.append(("method.attention_modules", attention))
    modules = dict(model.named_modules())
    chosen = []
    for key, pattern in patterns:
        matched = [n for n in names if re.search(pattern, n) and not _in_head(n, context)]
        if not matched:
            raise UserError(f"{key}: {pattern!r} matches no layer of this model; layers: {', '.join(names[:12])} ...")
        chosen += [(n, modules[n]) for n in matched]
    return chosen


def _in_head(name: str, context: Context) -> bool:
    return any(name == h or name.startswith(h + ".") for h in context.head_modules)
