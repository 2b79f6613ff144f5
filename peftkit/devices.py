"""The device and precision a run trains in: the Accelerator built for them (accelerate), `auto` resolved by
the machine (bf16 where it is computed natively), oneDNN's primitive cache bounded on CPUs, and an `accelerate
launch` FSDP config turned into peftkit's own sharding."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from peftkit import cpu_kind
from peftkit.errors import UserError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

# oneDNN keeps each matmul primitive it builds, 1,024 of them by default, and batches padded to their own longest
# row meet a new set of shapes with each new length: on bf16-native CPUs that cache grew the demo's resident memory
# by ~0.6 GB over a run. 128 still holds every shape a step uses again (the layers share them): measured on 150
# demo steps, 1,575 MiB and 170 samples/s against 1,965 MiB and 149 at the default; 32 was slower (RESULTS.md).
ONEDNN_CACHE_CAPACITY = 128


def resolve_precision(choice: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware computes it natively, else fp32. On a CPU without AMX or AVX512-BF16,
    bf16 matmuls are emulated and hundreds of times slower than fp32 (measured: benchmarks/RESULTS.md); which
    kind of CPU this is, cpu_kind.py says (PEFTKIT_CPU_BF16 overrides it)."""
    import torch

    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_kind.cpu_bf16_native() else "fp32"
    return "fp32"


def precision_of(accelerator: Accelerator) -> str:
    """bf16 / fp16 / fp32 (accelerate calls full precision "no")."""
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def make_accelerator(
    precision_choice: str, grad_accum: int, cpu: bool = False, log_with: Sequence[str] = ()
) -> Accelerator:
    """`log_with`: the accelerate trackers the run reports to (tracking.accelerate_trackers), which only the
    constructor takes; they start later, in the run folder (tracking.start)."""
    import torch
    from accelerate import Accelerator

    device = torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")
    if device.type == "cpu":  # read by oneDNN when it first caches a primitive; a user's own value is kept
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    precision = resolve_precision(precision_choice, device)
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]
    # The scheduler is stepped once per optimizer step, whatever the number of processes (accelerate's default
    # steps it once per process, for schedules planned in single-process steps); fit() plans in per-process steps.
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=grad_accum,
        cpu=device.type == "cpu",
        step_scheduler_with_optimizer=False,
        log_with=list(log_with) or None,
    )
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        # DeepSpeed: saving the adapter, the best epoch's weights and checkpoints would need ZeRO's partitions
        # gathered, which is not written; refused rather than saved wrong. (FSDP never gets here: launched_fsdp
        # turned accelerate's FSDP config into train.distributed.strategy fsdp first.)
        raise UserError(
            f"accelerate config: {accelerator.distributed_type.name} is not supported by peftkit yet "
            "(the adapter is saved from the main process's weights, which ZeRO partitions); use "
            "train.distributed.strategy fsdp to shard the model (torch's FSDP2), or data parallelism (DDP: "
            "`peftkit run RECIPE --processes N`, or `accelerate launch --multi_gpu`)"
        )
    return accelerator


def launched_fsdp() -> bool:
    """Whether `accelerate launch` was given an FSDP config (ACCELERATE_USE_FSDP). The variable is taken out of the
    environment, so that accelerate does not wrap the model itself (on GPUs): peftkit shards it with torch's FSDP2
    (sharding.py), as `train.distributed.strategy: fsdp` asks, on CPU and GPU alike. The config's other FSDP
    settings are not read: the wrap policy is the model's block class, the state dict gathered whole."""
    return os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")
