"""`peftkit estimate`: the peak memory of one training process, predicted before anything is loaded.

    recipe -> the data's lengths (a sample of the train split, tokenized by the task's own preprocessing)
           -> the model built on the meta device from its config (no weights) and adapted as `peftkit run` adapts
              it (loading.adapt: method, fp32 trainables, gradient checkpointing, fast dropout): exact counts
           -> weights by dtype and bits (bitsandbytes' 8-/4-bit layouts; head, pooler, lm_head and embeddings
              stay in full precision, as quant.py loads them)
           -> two training steps and one evaluation batch on fake tensors (shapes and dtypes, no memory, no
              compute) with every tensor's storage tracked while it lives: activations, their gradients,
              attention scores, logits, AdamW's states, at their peak
           -> + the runtime (this process's resident memory once the libraries and the data are in)

Parts are per process. Under `train.distributed.strategy: fsdp` the weights, gradients and optimizer states are
divided across the processes, plus the whole weights FSDP gathers while it computes (sharding.units: the root unit
through the step, and a unit with the next one prefetched); under DDP each process holds them all.

On a CPU, resident memory outgrows the tensors alive at the peak: glibc raises its mmap threshold as large blocks
are freed, so later activation-sized temporaries come from its heap and stay resident after they are freed
(measured: a MiniLM fp32 forward's live tensors 471 MiB, resident growth 863 MiB; with the threshold pinned by
MALLOC_MMAP_THRESHOLD_ growth is 501 MiB, at twice the step time). CPU_ALLOCATOR_SHARE sizes that part. Under
bf16, oneDNN also keeps the matmul primitives it compiled for each shape a run meets (CPU_BF16_PRIMITIVES_MIB).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import assets, batches, data, devices, loading, measure, sharding, train
from peftkit.errors import UserError
from peftkit.recipe import Recipe
from peftkit.tasks import TASKS

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from peftkit.tasks.common import Task

log = logging.getLogger("peftkit")

MIB = 2**20
SAMPLE_ROWS = 5000  # train rows tokenized for the length statistic: a few seconds
# Not measurable before CUDA starts: what a CUDA context takes on the device besides torch's allocations (typical
# for recent drivers and torch; the H200 runs in benchmarks/RESULTS.md). Torch's own peaks leave it out.
CUDA_CONTEXT_MIB = 500
# Resident memory a CPU run gains once it computes, beyond the imports and the data this process holds when it
# measures itself: torch's and oneDNN's kernel code paged in, the Accelerator, the DataLoader, the metrics; and the
# freed temporaries glibc's heap keeps resident, as a share of the activations' peak (module docstring). Both
# fitted to the measured peaks of benchmarks/RESULTS.md ("Will it fit?"), where the fit's errors are listed.
CPU_COMPUTE_MIB = 300
CPU_ALLOCATOR_SHARE = 0.6
# bf16 on a CPU: the matmul primitives oneDNN compiles and keeps, one set per shape, up to the cache's capacity
# (devices.ONEDNN_CACHE_CAPACITY, which peftkit sets). Measured on the demo recipe, a bf16-native CPU: 1,415 MiB with
# no cache, 1,575 at 128 primitives, over 150 steps. With it, whole runs of the shipped recipes peak 18% above to
# 14% below the estimate (benchmarks/RESULTS.md, "Will it fit?").
CPU_BF16_PRIMITIVES_MIB = 200
HEADROOM = 0.9  # "fits" below this share of the available memory; "tight" up to all of it


@dataclass
class Estimate:
    """The predicted peak of one process, in MiB by part, and where it is compared."""

    parts: dict[str, float]  # runtime, base weights, trainable, gradients, optimizer, activations
    facts: dict[str, Any]  # counts, batch, lengths and where they came from, precision, attention, ...
    device: str
    available_mib: float | None  # free device memory (CUDA) or MemAvailable (CPU); None when unknown
    processes: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def total_mib(self) -> float:
        return sum(self.parts.values())

    @property
    def needed_mib(self) -> float:
        """What the machine must hold: every process on a CPU shares its memory; on GPUs each has its own."""
        return self.total_mib * (self.processes if self.device == "cpu" else 1)

    @property
    def verdict(self) -> str:
        if self.available_mib is None:
            return "unknown"
        if self.needed_mib <= HEADROOM * self.available_mib:
            return "fits"
        return "tight" if self.needed_mib <= self.available_mib else "does not fit"

    def as_dict(self) -> dict:
        return {
            "parts_mib": {k: round(v, 1) for k, v in self.parts.items()},
            "total_mib": round(self.total_mib, 1),
            "processes": self.processes,
            "needed_mib": round(self.needed_mib, 1),
            "device": self.device,
            "available_mib": None if self.available_mib is None else round(self.available_mib, 1),
            "verdict": self.verdict,
            **self.facts,
            "notes": self.notes,
        }


def estimate(recipe: Recipe, processes: int = 1, device: str | None = None) -> Estimate:
    """The predicted peak memory per process of `peftkit run RECIPE --processes N`. `device`: cuda or cpu (default:
    where the run would train)."""
    import torch
    import transformers

    if recipe.quantization:
        with contextlib.suppress(ImportError):  # the run imports it: part of its runtime
            import bitsandbytes  # noqa: F401

    task = TASKS[recipe.task.type]
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = devices.resolve_precision(recipe.train.precision, where)
    splits, labels = data.load(recipe.data, task, kind=task.label_kind(recipe.task))
    ref = assets.resolve_model(recipe.model.name)
    try:
        config = transformers.AutoConfig.from_pretrained(
            ref, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            ref, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except OSError as err:
        raise assets.hub_error("model.name", recipe.model.name, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    length, length_source = train_length(recipe, task, splits, tokenizer)
    runtime = runtime_mib(where)
    model = meta_model(config, task.AUTO_CLASS, labels, tokenizer, loading.attention(recipe, where, precision),
                       loading.base_dtype(recipe, precision))  # fmt: skip
    steps = batches.total_steps(len(splits["train"]), recipe.train, processes)
    _, model = loading.adapt(model, tokenizer, recipe, task, where, steps)
    return from_model(
        model, recipe, where, precision, length, length_source, runtime, processes, "validation" in splits
    )


def from_model(
    model: torch.nn.Module,
    recipe: Recipe,
    device: torch.device,
    precision: str,
    length: int,
    length_source: str,
    runtime: float,
    processes: int = 1,
    validation: bool = True,
) -> Estimate:
    """The estimate for an adapted `model` on the meta device (estimate() and `peftkit init` build it)."""
    counts = measure.parameter_counts(model)
    shard = processes if sharding.applies(recipe, processes) else 1
    weights = weight_bytes(model, recipe, shard)
    trainable = weights["trainable"]
    batch, eval_batch = recipe.train.batch_size, recipe.eval.batch_size
    dynamic = simulate(model, recipe, device, precision, batch, eval_batch, length)
    grads, optimizer = trainable, 2 * trainable  # fp32 gradients; AdamW's exp_avg and exp_avg_sq
    activations = max(0.0, dynamic["peak"] - grads - optimizer)
    notes = []
    if shard > 1:
        notes.append(
            f"FSDP: weights, gradients and optimizer states split {shard} ways, plus {weights['gathered'] / MIB:,.0f} "
            "MiB of whole weights gathered while computing (the root unit, and the two largest units: one "
            "computing, the next prefetched)"
        )
    elif processes > 1:
        notes.append("DDP: every process holds the whole model, and gradient buckets as large as the gradients")
    parts = {
        "runtime": runtime,
        "base weights": weights["frozen"] / MIB,
        "trainable": (trainable * (2 if validation else 1)) / shard / MIB,  # + the best evaluation's copy
        "gradients": grads * (2 if shard == 1 < processes else 1) / shard / MIB,  # DDP's buckets: a second copy
        "optimizer": optimizer / shard / MIB,
        "activations": activations / MIB,
    }
    if device.type == "cpu":
        parts["allocator"] = CPU_ALLOCATOR_SHARE * activations / MIB
        if precision == "bf16":
            parts["oneDNN"] = float(CPU_BF16_PRIMITIVES_MIB)
    facts = {
        **counts,
        "batch_size": batch,
        "eval_batch_size": eval_batch,
        "length": length,
        "length_source": length_source,
        "precision": precision,
        "base_dtype": weights["base_dtype"],
        "bits": recipe.quantization.bits if recipe.quantization else None,
        "attention": dynamic["attention"],
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "peak_phase": dynamic["phase"],
        "shard": shard,
    }
    return Estimate(parts, facts, device.type, available_mib(device), processes, notes)


# --- the model without weights --------------------------------------------------------------------------------


def meta_model(
    config: PretrainedConfig,
    auto_class: str,
    labels: list | None,
    tokenizer: PreTrainedTokenizerBase,
    attn: str = "sdpa",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """The model of `config` with the task's head (`auto_class`, over `labels`) on the meta device: every
    parameter's shape and dtype, no memory, nothing read but the config. `peftkit init` inspects it; estimate()
    adapts it."""
    import torch
    import transformers

    if labels:
        config.num_labels = len(labels)  # the head's size
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find each row's end with it
    try:
        with torch.device("meta"):
            model = getattr(transformers, auto_class).from_config(config, attn_implementation=attn, dtype=dtype)
    except ValueError as err:
        raise UserError(
            f"model.name: a {config.model_type} model has no {auto_class} head in transformers ({err})"
        ) from None
    model.tie_weights()  # tied embeddings must count once
    return model


def weight_bytes(model: torch.nn.Module, recipe: Recipe, shard: int = 1) -> dict:
    """Bytes of the trainable (fp32) and the frozen parameters and buffers per process, a quantised base's linear
    layers in bitsandbytes' layout (quant.load_kwargs keeps the head, pooler and lm_head, and embeddings, out).
    `shard` > 1: FSDP over that many processes; `frozen` is then a process's shard plus the whole weights it
    gathers at once (`gathered`: the root unit, kept gathered through a step, and the two largest units, one
    computing and the next prefetched), and `trainable` the whole of them (from_model divides)."""
    import torch

    quantized = recipe.quantization
    skip = {"pooler", "lm_head", *TASKS[recipe.task.type].HEAD_MODULES}
    layer_of = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not set(name.split(".")) & skip:
            layer_of[id(module.weight)] = module
    trainable = frozen = 0
    dtypes = set()
    size: dict[int, float] = {}  # the frozen parameters' bytes
    for p in {id(p): p for p in model.parameters()}.values():
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
        elif quantized and id(p) in layer_of:
            size[id(p)] = quantized_bytes(p.shape, recipe)
        else:
            size[id(p)] = p.numel() * p.element_size()
            dtypes.add(str(p.dtype).removeprefix("torch."))
    frozen = sum(size.values())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # never sharded
    gathered = 0.0
    if shard > 1:
        blocks = [sum(size.get(id(p), 0) for p in block.parameters()) for block in sharding.units(model)]
        root = frozen - sum(blocks)
        gathered = (root + sum(sorted(blocks)[-2:])) * (1 - 1 / shard)
        frozen = frozen / shard + gathered
    return {
        "trainable": trainable,
        "frozen": frozen + buffers,
        "gathered": gathered,
        "base_dtype": "/".join(sorted(dtypes)),
    }


def quantized_bytes(shape: torch.Size, recipe: Recipe) -> float:
    """A [out, in] weight in bitsandbytes: 8-bit, one byte per weight plus an fp32 scale per row; 4-bit, half a
    byte plus one absmax per block of 64 (fp32, or with double quantisation a byte and an fp32 per 256 blocks)."""
    out, numel = shape[0], math.prod(shape)
    if recipe.quantization.bits == 8:
        return numel + 4 * out
    blocks = numel / 64
    scales = blocks + 4 * blocks / 256 if recipe.quantization.double_quant else 4 * blocks
    return numel / 2 + scales


# --- activations: a training step on fake tensors -------------------------------------------------------------


class _Live:
    """Bytes of the tensor storages created while tracking, as long as they live, and their peak. A storage is
    counted once however many views share it; what existed before (parameters, buffers) is not counted."""

    def __init__(self, existing: set[int]) -> None:
        self.existing, self.live, self.now, self.peak = existing, {}, 0, 0

    def add(self, storage: Any) -> None:
        key = storage._cdata
        if key in self.existing or key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = weakref.ref(storage, functools.partial(self._free, key, size))
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, key: int, size: int, _ref: Any) -> None:
        if self.live.pop(key, None) is not None:
            self.now -= size

    def reset(self) -> None:
        self.peak = self.now


def simulate(
    model: torch.nn.Module,
    recipe: Recipe,
    device: torch.device,
    precision: str,
    batch: int,
    eval_batch: int,
    length: int,
) -> dict:
    """The peak bytes above the weights of two training steps (forward, backward, AdamW's step: its states
    appear in the first) and of one evaluation batch without gradients, run on fake tensors: the model's own
    code, the run's autocast, attention implementation and checkpointing, with shapes and dtypes only. The
    batch is full (`length` tokens every row, no padding mask), as a length-grouped run's longest batch is."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    mode = FakeTensorMode()
    fakes: dict[int, Any] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:  # tied parameters stay one tensor; t is kept alive so its id is not reused
            inner = t.data if isinstance(t, torch.nn.Parameter) else t
            fakes[id(t)] = (t, FakeTensor(mode, inner.to("meta"), device))
        return fakes[id(t)][1]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b)
    params = [p for p in model.parameters()]
    existing = {t.untyped_storage()._cdata for t in [*params, *model.buffers()]}
    live = _Live(existing)

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    live.add(t.untyped_storage())
            return out

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    task = recipe.task.type
    with mode:
        optimizer = train._optimizer(model, recipe.train)
        with Track():
            model.train()
            for _ in range(2):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = model(**_inputs(task, batch, length, device)).loss
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            train_peak = live.peak
            live.reset()
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(**_inputs(task, eval_batch, length, device))
                del out
            eval_peak = live.peak  # from what was live before it (optimizer states) up
    inner = next((m for m in model.modules() if hasattr(m, "config")), model)
    attention = getattr(inner.config, "_attn_implementation", None)
    phase = "training step" if train_peak >= eval_peak else "evaluation batch"
    return {"peak": max(train_peak, eval_peak), "phase": phase, "attention": attention}


def _inputs(task: str, batch: int, length: int, device: torch.device) -> dict:
    """A full batch of token ids with the task's targets (values do not matter: only shapes flow)."""
    import torch

    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    targets = {
        "classification": {"labels": torch.zeros(batch, dtype=torch.long, device=device)},
        "token_classification": {"labels": torch.zeros(batch, length, dtype=torch.long, device=device)},
        "question_answering": {
            "start_positions": torch.zeros(batch, dtype=torch.long, device=device),
            "end_positions": torch.zeros(batch, dtype=torch.long, device=device),
        },
        "causal_lm": {"labels": ids},
    }
    return {"input_ids": ids, **targets[task]}


# --- lengths, runtime, the machine ----------------------------------------------------------------------------


def train_length(recipe: Recipe, task: Task, splits: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[int, str]:
    """Tokens per row of the longest batch, and where that figure comes from. Batches are padded to their own
    longest row, and a length-grouped run (train.group_by_length) trains on its longest batch first."""
    cfg = recipe.task
    if recipe.task.type == "causal_lm" and getattr(cfg, "packing", False):
        return cfg.max_length, "task.max_length (packed blocks are full)"
    rows = splits["train"]
    picked = sorted(random.Random(0).sample(range(len(rows)), min(SAMPLE_ROWS, len(rows))))
    from datasets import DatasetDict

    encoded = task.preprocess(DatasetDict({"train": rows.select(picked)}), tokenizer, cfg)["train"]
    lengths = [len(ids) for ids in encoded["input_ids"]]
    if not lengths:
        return cfg.max_length, "task.max_length (no row left after preprocessing)"
    whole = "all" if len(picked) == len(rows) else f"a sample of {len(picked):,}"
    return max(lengths), f"longest of {whole} train rows tokenized (task.max_length {cfg.max_length})"


def runtime_mib(device: torch.device) -> float:
    """The process besides the model and the training: on a CPU this process's resident memory now, with torch,
    transformers, peft, accelerate and datasets imported and the data read (what a run holds before loading the
    base), plus CPU_COMPUTE_MIB; on CUDA the context (CUDA_CONTEXT_MIB; host memory is not the device's)."""
    if device.type == "cuda":
        return float(CUDA_CONTEXT_MIB)
    import accelerate  # noqa: F401 - the run imports it
    import peft  # noqa: F401

    return measure.memory_now(device).get("rss_mib", 0.0) + CPU_COMPUTE_MIB


def available_mib(device: torch.device) -> float | None:
    """Free memory of the GPU (torch.cuda.mem_get_info), or the machine's MemAvailable on a CPU."""
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free / MIB
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def warning(recipe: Recipe, processes: int = 1, device: str | None = None) -> str | None:
    """One line for `peftkit run` on a GPU when the estimate exceeds the free device memory, else None."""
    result = estimate(recipe, processes, device=device)
    if result.available_mib is None or result.needed_mib <= result.available_mib:
        return None
    return (
        f"memory: the estimate is {result.needed_mib:,.0f} MiB per process and {result.available_mib:,.0f} MiB "
        f"are free on the {result.device}; it may run out (`peftkit estimate` splits it; {recipe.name} runs anyway)"
    )
