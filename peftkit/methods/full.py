"""Full fine-tuning: every weight trains. Not parameter-efficient — it is the reference every method is
compared with (the LoRA paper's claim is "as good as full fine-tuning with <1% of the parameters").

The export is the whole model (`save_pretrained`), so there is nothing to merge. Use a learning rate ~10-50x
lower than LoRA's (2e-5 .. 5e-5 is the usual range for BERT-sized models).
"""

from typing import TYPE_CHECKING, Literal

from peftkit.methods.base import Context, refuse_quantized
from peftkit.sections import Section

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMAT = "full"  # the whole model, with save_pretrained
MERGEABLE = False
NOT_MERGEABLE_BECAUSE = (
    "full fine-tuning trains the weights themselves, so RUN_DIR/adapter already is a standalone model: load it "
    "with from_pretrained, there is nothing to merge."
)


class Config(Section):
    name: Literal["full"]


def rewrites_base(config: Config) -> bool:
    return True  # every weight trains: fp32 master weights under mixed precision


def apply(model: "PreTrainedModel", config: Config, context: Context) -> "PreTrainedModel":
    refuse_quantized(
        "method full",
        model,
        (4, 8),
        "it trains every weight, and 8/4-bit weights cannot be "
        "trained; remove the quantization section, or use a parameter-efficient method such as lora",
    )
    for param in model.parameters():
        param.requires_grad_(True)
    return model
