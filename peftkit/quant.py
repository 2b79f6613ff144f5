"""Load the frozen base in 8-bit or 4-bit through bitsandbytes, keeping the task head in full precision."""

from peftkit.errors import UserError
from peftkit.recipe import QuantizationSection

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def load_kwargs(cfg: QuantizationSection, head_modules: list[str], device) -> dict:
    """from_pretrained keyword arguments for a quantised base."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("quantization needs bitsandbytes: pip install 'peftkit[quant]'") from None
    import torch
    from transformers import BitsAndBytesConfig

    # The freshly initialised head must stay out of quantisation: bitsandbytes crashes on it (BERT: "'Parameter'
    # object has no attribute 'CB'") and it is trained in full precision anyway. The pooler feeds it (ASSETS.md).
    skip = [*head_modules, "pooler"]
    if cfg.bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, _DTYPES[cfg.compute_dtype]),
            llm_int8_skip_modules=skip,
        )
    return {"quantization_config": config, "device_map": {"": device}}


def prepare(model):
    """peft's k-bit preparation: freeze the base, upcast norms, make inputs require grad for checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
