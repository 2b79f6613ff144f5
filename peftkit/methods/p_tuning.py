"""P-tuning (Liu et al. 2021, "GPT understands, too"), through peft.

Like prompt tuning, learned virtual tokens are prepended to the input, but they come out of a small prompt
encoder (an MLP or LSTM over trainable embeddings), which makes optimisation steadier. Not mergeable: the prompt
is extra input, not a change of weights.
"""

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from peftkit.methods.base import Context, left_if_last_token_pooled, peft_wrap, refuse_per_token_tasks
from peftkit.sections import Section

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

FORMAT = "peft"  # peft's format: plain `PeftModel.from_pretrained` loads it
MERGEABLE = False
NOT_MERGEABLE_BECAUSE = (
    "p-tuning adds virtual input tokens, which no weight of the base model can absorb. Serve the base with the "
    "adapter: PeftModel.from_pretrained(base, RUN_DIR/adapter), or `peftkit predict RUN_DIR`."
)


class Config(Section):
    name: Literal["p_tuning"]
    num_virtual_tokens: int = Field(20, gt=0, description="Length of the learned prompt.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="The prompt encoder's architecture.")
    encoder_hidden_size: int | None = Field(None, gt=0, description="Its hidden size; omitted: the model's.")


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PeftModel":
    refuse_per_token_tasks(config.name, context)
    from peft import PromptEncoderConfig

    peft_config = PromptEncoderConfig(
        num_virtual_tokens=config.num_virtual_tokens,
        encoder_reparameterization_type=config.encoder.upper(),
        encoder_hidden_size=config.encoder_hidden_size or model.config.hidden_size,
    )
    return peft_wrap(model, peft_config, context)


padding_side = left_if_last_token_pooled  # the hook (methods/base.py OPTIONAL)
