"""`train.distributed.strategy: fsdp`: the model sharded across the processes with torch's FSDP2
(`torch.distributed.fsdp.fully_shard`), while accelerate keeps the process group, the precision and the launch.

Why torch's FSDP2 directly rather than accelerate's FSDP plugin: accelerate 1.15 applies its plugin only to GPU-like
devices and silently trains plain DDP on CPU processes (MULTI_CPU), so one code path that runs (and is tested) on
CPU and GPU alike goes through `fully_shard` itself.

- Wrap policy: each transformer block (the classes transformers names in the model's `_no_split_modules`:
  BertLayer, LlamaDecoderLayer, GPT2Block, ...) is one FSDP unit, then the whole adapted model is the root unit.
  A block holding a weight tied to one outside it (tied embeddings) stays in the root: a shared parameter must
  live in one unit. FSDP2 shards per parameter, so frozen and trainable parameters side by side need nothing
  special; the trained ones must share one dtype (fp32: loading.trainable_in_fp32).
- Precision: no `MixedPrecisionPolicy`; the forward runs under the same autocast as DDP's (accelerate's), and
  parameters are gathered in the dtype they are held in (a bf16 base in a bf16 run, fp32 trainables), gradients
  reduced in fp32. A policy with param_dtype bf16 would also compute norms, softmax and the trained weights'
  updates' inputs in bf16, where autocast keeps them fp32: the numerics would differ from a DDP run's.
- Loading (what accelerate calls cpu_ram_efficient_loading): only the main process reads the weights; the others
  build the model on the meta device (no memory), shard it there, allocate their shards alone, and receive them
  from the main process (`set_model_state_dict(..., broadcast_from_rank0=True)`). Without it N processes on one
  machine would each hold the whole base in RAM before sharding it: N copies of a 70B model's 140 GB.
- Saving: the trained tensors are gathered whole (methods.base.trainable_tensors, a collective then) on every
  process, so the adapter, the kept best weights and checkpoints are written from full tensors, in the very formats
  a single-process run writes; the optimizer state is gathered whole too (`get_optimizer_state_dict`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from peftkit.errors import UserError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from peftkit.methods.base import Method
    from peftkit.recipe import Recipe

log = logging.getLogger("peftkit")


def applies(recipe: Recipe, processes: int) -> bool:
    """Whether a run of `recipe` on `processes` processes is sharded: strategy fsdp, and more than one process."""
    return recipe.train.distributed.strategy == "fsdp" and processes > 1


def refuse_unsupported(recipe: Recipe, method: Method) -> None:
    """What FSDP cannot train here, said before any time is spent (before the base is loaded)."""
    from peftkit.methods.base import optional

    if recipe.quantization:
        raise UserError(
            f"train.distributed.strategy fsdp cannot shard a {recipe.quantization.bits}-bit base: fully_shard turns "
            "every parameter into a plain sharded tensor, which drops the quantisation state bitsandbytes keeps on "
            "its parameters (Params4bit.quant_state, Int8Params.SCB), and bitsandbytes 0.50's CPU backend has no "
            "FSDP-aware storage (bnb_4bit_quant_storage only helps FSDP1's flat parameters on GPUs). Use strategy "
            "ddp with the quantised base (every process holds the 4-bit base), or fsdp without quantization"
        )
    if method.FORMAT != "full" and optional(method, "rewrites_base")(recipe.method):
        raise UserError(
            "train.distributed.strategy fsdp: this method's options (PiSSA / OLoRA initialisation, or trained "
            "biases) convert the adapter against the original base weights when it is saved, which sharding splits "
            "across the processes; use strategy ddp, or LoRA's default initialisation"
        )
    hooks = [name for name in ("after_optimizer_step", "training_state") if optional(method, name) is not None]
    if hooks:
        raise UserError(
            f"train.distributed.strategy fsdp: the method's {', '.join(hooks)} hook reads whole weights between "
            "steps (AdaLoRA's rank allocation), which sharding splits across the processes; use strategy ddp"
        )


def block_classes(model: torch.nn.Module) -> set[str]:
    """The names of the model's transformer block classes: every `_no_split_modules` transformers declares in it."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded one by one before the root: every transformer block (block_classes), except one holding
    a weight tied to one outside it (tied embeddings), which stays in the root: a shared parameter must live in one
    unit. `peftkit estimate` sizes FSDP's gathered weights from them."""
    names = block_classes(model)
    tied = _tied_parameters(model)
    return [
        m
        for m in model.modules()
        if type(m).__name__ in names and m is not model and not any(id(p) in tied for p in m.parameters())
    ]


def shard(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Shard `model` in place across the accelerator's processes (see the module's docstring): the main process's
    whole model, the others' the same model on the meta device, which receive their shards from it. Returns the
    model, with its forward under the run's autocast as accelerate's prepare would have put it."""
    from accelerate.utils import broadcast_object_list, convert_outputs_to_fp32, get_mixed_precision_context_manager
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    main = accelerator.is_main_process
    # the main process's whole tensors, kept by reference while fully_shard copies each into its own shard
    whole = model.state_dict() if main else {}
    buffers = _unsaved_buffers(model, whole) if main else None
    # no model.to(device) first: fully_shard moves each unit's weights to the mesh's device as it shards them, so a
    # GPU holds the shards so far and one whole block at a time, never the whole model
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    blocks = units(model)
    for block in reversed(blocks):  # inner blocks before the ones that hold them
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not main:  # its shards (and buffers) allocated, in place: tied weights stay one parameter
        model.to_empty(device=accelerator.device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del whole
    _set_buffers(model, broadcast_object_list([buffers])[0])  # the main process's, on every process
    log.info(
        "fsdp: %d block(s) (%s) and the root sharded over %d processes, from the main process's weights",
        len(blocks),
        ", ".join(sorted({type(b).__name__ for b in blocks})) or "none",
        accelerator.num_processes,
    )
    if accelerator.native_amp:  # what accelerate's prepare_model does, which a sharded model does not go through
        autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
        model._original_forward = model.forward
        model.forward = convert_outputs_to_fp32(autocast(model.forward))
    return model


def _unsaved_buffers(model: torch.nn.Module, saved: dict) -> dict[str, torch.Tensor]:
    """The buffers the model's state dict (`saved`) leaves out (non-persistent: rotary frequencies, position ids),
    by name."""
    return {name: buffer.detach().cpu() for name, buffer in model.named_buffers() if name not in saved}


def _set_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        module._buffers[leaf] = value.to(module._buffers[leaf].device)


def _tied_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters reachable under more than one name (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict:
    """The optimizer's state for a checkpoint: its own state_dict, or under FSDP the whole (gathered) one, keyed by
    parameter names, on every process (a collective: every process calls it)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(optimizer), options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict) -> None:
    """Put back what optimizer_state() took (every process holds the whole state; each keeps its shard)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer
