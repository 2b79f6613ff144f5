"""Prefix tuning (Li & Liang 2021) — peftkit's own, because peft's fails on transformers 5 for everything but
causal LM (BERT and GPT-2 classification: "Model does not support past key values which are required for prefix
tuning"; transformers 5 renamed `past_key_values` to `cache`).

Every attention layer attends to P learned key/value vectors in front of the sequence's own:

    attention(q, [Pk; K], [Pv; V])       Pk, Pv: (layers, kv_heads, P, head_dim), trained

Done through transformers' AttentionInterface, so it is model-agnostic (BERT, GPT-2, Llama, ...; encoders and
decoders; every task): a registered attention function prepends the layer's prefix to keys and values, extends
the mask so every query may attend to the prefix, and hands over to the SDPA kernel. Generation with a KV cache
works unchanged: the cache holds the sequence's keys only and the prefix is prepended at each call.

Optional reparameterisation (the paper's MLP): the prefix is computed as MLP(E) from a smaller embedding E,
which trains more stably; the MLP is saved with the adapter. Not mergeable: the prefix adds keys and values,
which no weight can absorb. Saved in peftkit's format (methods/base.py).
"""

import itertools
from typing import TYPE_CHECKING, Any, Literal

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
    "prefix tuning adds learned key/value vectors to every attention layer, which cannot be folded into the "
    "weights. Serve the base with the adapter: `peftkit predict RUN_DIR`, or peftkit.run.load_trained(RUN_DIR)."
)
ATTR = "peftkit_prefix"
_names = itertools.count()


class Config(Section):
    name: Literal["prefix_tuning"]
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix length P (per layer).")
    reparameterize: bool = Field(False, description="Compute the prefix with an MLP from a P x hidden embedding.")
    encoder_hidden_size: int = Field(512, gt=0, description="Hidden size of that MLP.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init of the prefix (or its embedding).")


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PreTrainedModel":
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers, tokens = cfg.num_hidden_layers, config.num_virtual_tokens

    class Prefix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shape = (tokens, layers, 2, kv_heads, head_dim)
            if config.reparameterize:
                self.embedding = torch.nn.Parameter(torch.randn(tokens, cfg.hidden_size) * config.init_std)
                self.mlp = torch.nn.Sequential(
                    torch.nn.Linear(cfg.hidden_size, config.encoder_hidden_size),
                    torch.nn.Tanh(),
                    torch.nn.Linear(config.encoder_hidden_size, layers * 2 * kv_heads * head_dim),
                )
            else:
                self.prefix = torch.nn.Parameter(torch.randn(self.shape) * config.init_std)
            self.current = None

        def refresh(self, *_: object) -> None:
            # once per model call: (layers, 2, kv_heads, P, head_dim), with the graph to the parameters
            raw = self.mlp(self.embedding).view(self.shape) if config.reparameterize else self.prefix
            self.current = raw.permute(1, 2, 3, 0, 4)

    _number_attention_layers(model, layers)
    prefix = Prefix().to(next(model.parameters()).device)
    model.add_module(ATTR, prefix)
    model.register_forward_pre_hook(prefix.refresh)

    def attention(
        module: "torch.nn.Module",
        query: "torch.Tensor",
        key: "torch.Tensor",
        value: "torch.Tensor",
        attention_mask: "torch.Tensor | None",
        **kwargs: Any,
    ) -> "tuple[torch.Tensor, None]":
        batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        pk, pv = (p.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1) for p in prefix.current[module.layer_idx])
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if attention_mask is None:  # no padding: the mask builder left causality to the kernel's is_causal flag
            causal = getattr(module, "is_causal", False) and q_len > 1
            if causal and k_len > q_len:  # prefill of a static cache: keys past the queries are empty slots
                key, value, k_len = key[:, :, : tokens + q_len], value[:, :, : tokens + q_len], q_len
            attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
            attention_mask = (attention_mask.tril() if causal else attention_mask)[None, None]
        keep = torch.ones(*attention_mask.shape[:-1], tokens, device=query.device, dtype=attention_mask.dtype)
        if attention_mask.dtype != torch.bool:  # an additive float mask: 0 keeps a position
            keep = torch.zeros_like(keep)
        attention_mask = torch.cat([keep, attention_mask], dim=-1)
        kwargs.pop("is_causal", None)  # causality is in the mask now
        return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False, **kwargs)

    name = f"peftkit_prefix_{next(_names)}"
    AttentionInterface.register(name, attention)
    # Without a mask function under the same name the attention function gets attention_mask=None even when the
    # batch has padding, so padding would silently stop being masked.
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    train_only(model, lambda n: n.startswith(ATTR + ".") or f".{ATTR}." in n, context)
    return model


def _number_attention_layers(model: "PreTrainedModel", layers: int) -> None:
    """The attention function finds a layer's prefix by `module.layer_idx`, which BERT, GPT-2 and Llama
    attention modules carry; for models whose attention has none (e.g. DistilBERT), number them in order."""
    if any(hasattr(m, "layer_idx") for m in model.modules()):
        return
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    if len(attention) != layers:
        raise UserError(
            f"method prefix_tuning: cannot tell this model's ({model.config.model_type}) attention layers apart "
            f"(found {len(attention)} modules named *Attention for {layers} layers); use another method"
        )
    for index, module in enumerate(attention):
        module.layer_idx = index
