"""Prompt tuning (Lester et al. 2021), through peft.

Learned "virtual token" embeddings are prepended to the input; the whole model stays frozen. Works on encoders
and decoders and every task. Not mergeable: the prompt is extra input, not a change of weights.
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
    "prompt tuning adds virtual input tokens, which no weight of the base model can absorb. Serve the base "
    "with the adapter: PeftModel.from_pretrained(base, RUN_DIR/adapter), or `peftkit predict RUN_DIR`."
)


class Config(Section):
    name: Literal["prompt_tuning"]
    num_virtual_tokens: int = Field(20, gt=0, description="Length of the learned prompt.")
    init_text: str | None = Field(
        None,
        description="Start the prompt from this text's token embeddings (e.g. 'Classify the sentiment:'); "
        "omitted: random.",
    )


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PeftModel":
    refuse_per_token_tasks(config.name, context)
    from peft import PromptTuningConfig

    peft_config = PromptTuningConfig(
        num_virtual_tokens=config.num_virtual_tokens,
        prompt_tuning_init="TEXT" if config.init_text else "RANDOM",
        prompt_tuning_init_text=config.init_text,
        tokenizer_name_or_path=context.model_path if config.init_text else None,
    )
    return peft_wrap(model, peft_config, context)


padding_side = left_if_last_token_pooled  # the hook (methods/base.py OPTIONAL)
