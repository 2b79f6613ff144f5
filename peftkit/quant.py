"""Load the frozen base in 8-bit or 4-bit through bitsandbytes, keeping the task head in full precision."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

from peftkit import cpu_kind
from peftkit.errors import UserError
from peftkit.sections import QuantizationSection

if TYPE_CHECKING:
    import torch
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Linear4bit
    from transformers import PreTrainedModel

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_BLOCK_N = 32  # rows per block of bitsandbytes' repacked CPU layout (functional._convert_weight_packed_for_cpu)
_registered = False  # reference_gemv_4bit, once per process


def load_kwargs(cfg: QuantizationSection, head_modules: list[str], device: torch.device, precision: str = "no") -> dict:
    """from_pretrained keyword arguments for a quantised base. `precision`: the run's (bf16/fp16/fp32/no), which
    compute_dtype auto follows: bf16 only where the machine computes it natively (devices.resolve_precision)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("quantization needs bitsandbytes: pip install 'peftkit[quant]'") from None
    import torch
    from transformers import BitsAndBytesConfig

    # The freshly initialised head must stay out of quantisation: bitsandbytes crashes on it (BERT: "'Parameter'
    # object has no attribute 'CB'" in 8-bit, a bare AssertionError in 4-bit) and it is trained in full precision
    # anyway. BERT's pooler, which feeds it, is kept out too: classifier + pooler is the skip list seen to load.
    # Giving a skip list replaces transformers' default one, which keeps the output layer (`lm_head`, tied to the
    # input embeddings in GPT-2) in full precision; quantising it crashes the same way, so it is listed too.
    skip = [*head_modules, "pooler", "lm_head"]
    compute_dtype = (
        cfg.compute_dtype if cfg.compute_dtype != "auto" else {"bf16": "bf16", "fp16": "fp16"}.get(precision, "fp32")
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


def prepare(model: PreTrainedModel, inference: bool = False) -> PreTrainedModel:
    """peft's k-bit preparation (freeze the base, upcast norms, make inputs require grad for checkpointing), and
    the 4-bit layers' CPU layout: see cpu_layout."""
    from peft import prepare_model_for_kbit_training

    cpu_layout(model, inference)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def cpu_layout(model: torch.nn.Module, inference: bool) -> None:
    """Whether bitsandbytes may repack each 4-bit layer for its CPU bf16 kernel.

    bitsandbytes 0.50, on a CPU with AVX512-BF16 (cpu_kind.py), rewrites a Linear4bit's weight in place into
    another layout at its first forward in eval mode without grad, and from then on multiplies with a bf16
    kernel that has no backward. Measured (tests/test_quant.py): after one evaluation pass, a LoRA step on the
    repacked base gets no gradient at all for the adapter (autograd only warns), so training between
    evaluations learned nothing but the head; the repack also rounds double-quantised scales to bf16, which
    moves the frozen base. So a run that trains keeps bitsandbytes' own layout throughout, and its evaluations
    compute as its training does (peftkit eval too). Prediction keeps bitsandbytes' fast path. The repack also
    fails on layers whose input is not a whole number of scale blocks (64) or whose output is not a whole number
    of its 32-row tiles ("shape '[32, 0]' is invalid" on a 32-wide layer): those keep their layout.
    PEFTKIT_CPU_BF16 decides it as it decides the rest (native turns the repack on anywhere)."""
    import bitsandbytes as bnb

    repack = inference and cpu_kind.cpu_bf16_native()
    if repack and not bnb.functional.has_avx512bf16():
        _register_reference_kernel()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            fits = module.in_features % state.blocksize == 0 and module.out_features % _BLOCK_N == 0
            module.support_avx512bf16_for_cpu = repack and fits


def is_repacked(module: torch.nn.Module) -> bool:
    """A 4-bit layer whose weight bitsandbytes has repacked for its CPU kernel (shape [N, K/2], bf16 scales)."""
    return getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)


def repacked_weight(packed: torch.Tensor, state: QuantState | SimpleNamespace) -> torch.Tensor:
    """The [N, K] float32 matrix a repacked 4-bit weight ([N, K/2] uint8) stands for: its codes' values times
    their block's absmax ([K/blocksize, N], bf16 in this layout)."""
    values = state.code.float()[_repacked_codes(packed).long()]
    return values * state.absmax.float().t().repeat_interleave(state.blocksize, dim=1)


def _repacked_codes(packed: torch.Tensor) -> torch.Tensor:
    """[N, K] 4-bit codes of a repacked weight: the inverse of bitsandbytes' _convert_weight_packed_for_cpu, where
    each run of 32 bytes is a tile of 32 rows x 2 columns, rows 0-15 in the low nibbles, 16-31 in the high ones."""
    import torch

    n, half = packed.shape
    flat = packed.reshape(-1, _BLOCK_N)
    codes = torch.cat([flat & 0xF, (flat >> 4) & 0xF], dim=-1)  # [N/32 * K/2, 64]
    return codes.reshape(n // _BLOCK_N, half, _BLOCK_N, 2).transpose(1, 2).reshape(n, 2 * half)


def _unpack(module: Linear4bit) -> None:
    """A repacked layer back in bitsandbytes' own layout, exactly as the repacked kernel computed it: codes two to
    a byte, high nibble first, and the scales as the flat per-block fp32 vector, not double-quantised again.
    (bitsandbytes 0.50's own inverse re-quantises double-quantised scales, and leaves the others transposed.)"""
    state = module.weight.quant_state
    codes = _repacked_codes(module.weight.data).reshape(-1)
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(state.original_qshape)
    storage = getattr(state, "original_storage_type", None)
    module.weight.data = packed.view(storage) if storage else packed
    state.absmax = state.absmax.float().t().reshape(-1).contiguous()  # [K/blocksize, N] -> blocks in row order
    state.nested, state.dtype, state.packing_format_for_cpu = False, state.original_dtype, False


def reference_gemv_4bit(  # noqa: N803 - bitsandbytes' argument names
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
) -> torch.Tensor:
    """bitsandbytes' CPU kernel for the repacked layout, in plain torch: bf16 activations times the bf16 weight,
    fp32 accumulation, returned in A's dtype. (Linear4bit calls the plain overload only, never `.out`.)"""
    import torch

    state = SimpleNamespace(code=code, absmax=absmax, blocksize=blocksize)
    weight = repacked_weight(B.view(torch.uint8).reshape(shapeB[0], -1), state).to(torch.bfloat16)
    return torch.nn.functional.linear(A.to(torch.bfloat16), weight).to(A.dtype)


def _register_reference_kernel() -> None:
    """On a CPU without AVX512-BF16 bitsandbytes registers no kernel for its repacked layout (its C kernel needs
    those instructions); PEFTKIT_CPU_BF16=native registers reference_gemv_4bit (tests/test_quant.py checks it
    against bitsandbytes' own where the CPU has it)."""
    global _registered
    if not _registered:
        import torch

        torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu", reference_gemv_4bit)
        _registered = True


def dequantize(model: PreTrainedModel) -> PreTrainedModel:
    """The quantised model with every 8/4-bit layer turned back into a full-precision one (transformers'
    dequantize), and GPT-2's Conv1D layers restored: bitsandbytes replaced them by Linear layers, whose weight is
    the transpose of Conv1D's, so the merged model would not load back as the architecture it claims to be."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for module in model.modules():  # repacked by an inference pass (cpu_layout): transformers reads only the other
        if is_repacked(module):
            _unpack(module)
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
