"""Load the frozen base in 8-bit or 4-bit through bitsandbytes, keeping the task head in full precision."""

from peftkit.errors import UserError
from peftkit.recipe import QuantizationSection

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def load_kwargs(cfg: QuantizationSection, head_modules: list[str], device, precision: str = "no") -> dict:
    """from_pretrained keyword arguments for a quantised base. `precision`: the run's (bf16/fp16/fp32/no), which
    compute_dtype auto follows: bf16 only where the machine computes it natively (train.resolve_precision)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("quantization needs bitsandbytes: pip install 'peftkit[quant]'") from None
    import torch
    from transformers import BitsAndBytesConfig

    # The freshly initialised head must stay out of quantisation: bitsandbytes crashes on it (BERT: "'Parameter'
    # object has no attribute 'CB'") and it is trained in full precision anyway. The pooler feeds it (ASSETS.md).
    # Giving a skip list replaces transformers' default one, which keeps the output layer (`lm_head`, tied to the
    # input embeddings in GPT-2) in full precision; quantising it crashes the same way, so it is listed too.
    skip = [*head_modules, "pooler", "lm_head"]
    compute_dtype = cfg.compute_dtype if cfg.compute_dtype != "auto" else {"bf16": "bf16", "fp16": "fp16"}.get(
        precision, "fp32"
    )
    if cfg.bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, _DTYPES[compute_dtype]),
            llm_int8_skip_modules=skip,
        )
    return {"quantization_config": config, "device_map": {"": device}}


def prepare(model):
    """peft's k-bit preparation: freeze the base, upcast norms, make inputs require grad for checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def dequantize(model):
    """The quantised model with every 8/4-bit layer turned back into a full-precision one (transformers'
    dequantize), and GPT-2's Conv1D layers restored: bitsandbytes replaced them by Linear layers, whose weight is
    the transpose of Conv1D's, so the merged model would not load back as the architecture it claims to be."""
    import torch
    from transformers.pytorch_utils import Conv1D

    model = model.dequantize(dtype=torch.float32)
    with torch.device("meta"):
        reference = type(model)._from_config(model.config)
    for name, module in reference.named_modules():
        current = model.get_submodule(name) if name else model
        if isinstance(module, Conv1D) and isinstance(current, torch.nn.Linear):
            conv = Conv1D(current.out_features, current.in_features)
            conv.weight = torch.nn.Parameter(current.weight.detach().t().contiguous())
            conv.bias = current.bias
            model.set_submodule(name, conv)
    return model
