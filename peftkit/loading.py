"""Loading models: the recipe's base (quantised if it asks, with the task's head), the method's context, and a
finished run's adapter on its base, for predicting, evaluating, merging and pushing.

Used by the pipeline (run.py) and by every command that works on a finished run (export, multi_adapter, cli).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import assets, quant
from peftkit.methods import METHODS, storage
from peftkit.methods.base import Context, optional, trainable_in_fp32
from peftkit.recipe import Recipe
from peftkit.run_folder import finished_adapter
from peftkit.tasks import TASKS

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from peftkit.tasks.common import Task

log = logging.getLogger("peftkit")


def method_context(recipe: Recipe, task: Task, model: torch.nn.Module, total_steps: int = 1000) -> Context:
    return Context(
        head_modules=[name for name in task.HEAD_MODULES if hasattr(model, name)],
        peft_task_type=task.PEFT_TASK_TYPE,
        total_steps=total_steps,
        model_path=getattr(model, "name_or_path", None),  # where the base was loaded from
    )


def load_base(
    recipe: Recipe,
    task: Task,
    labels: list[str] | None,
    device: torch.device,
    precision: str = "no",
    dequantize: bool = False,
    inference: bool = False,
    weightless: bool = False,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, model) for the recipe's base model, quantised if the recipe asks, head freshly initialised.
    `dequantize`: load the quantised weights, then turn them back into full-precision layers (for merging).
    `inference`: the model will only predict, so a 4-bit base may take bitsandbytes' inference-only CPU
    layout (quant.cpu_layout); False (the default) for training and for whatever must compute as training did.
    `weightless`: the model on the meta device, nothing read but its config (a sharded run's other processes,
    which receive their shards from the main process: sharding.shard)."""
    from transformers import AutoTokenizer

    ref = assets.resolve_model(recipe.model.name)
    common = {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: code from %s will run on this machine", recipe.model.name)
    attn = attention(recipe, device, precision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **common)
        if tokenizer.pad_token is None:  # GPT-2 / Llama tokenizers have none; padding reuses end-of-sequence
            tokenizer.pad_token = tokenizer.eos_token
        kwargs = {**common, **assets.MODEL_LOADING, "attn_implementation": attn, "dtype": base_dtype(recipe, precision)}
        if weightless:
            kwargs["device_map"] = "meta"
        if recipe.quantization:
            kwargs.update(quant.load_kwargs(recipe.quantization, list(task.HEAD_MODULES), device, precision))
        model = task.load_model(ref, labels, tokenizer, **kwargs)
    except OSError as err:
        raise assets.hub_error("model.name", recipe.model.name, err) from None
    if recipe.quantization:
        model = quant.dequantize(model) if dequantize else quant.prepare(model, inference)
    return tokenizer, model


def attention(recipe: Recipe, device: torch.device, precision: str) -> str:
    """The attention implementation the base is loaded with (model.attn_implementation, auto resolved)."""
    if recipe.model.attn_implementation != "auto":
        return recipe.model.attn_implementation
    # Measured (benchmarks/RESULTS.md): under bf16 autocast on CPU, SDPA's flash-attention backward is ~2.5x
    # slower than eager attention; in fp32 on CPU and on GPUs SDPA is as fast or faster.
    return "eager" if device.type == "cpu" and precision == "bf16" else "sdpa"


def adapted_model(
    recipe: Recipe,
    task: Task,
    labels: list[str] | None,
    device: torch.device,
    precision: str,
    total_steps: int,
    weightless: bool = False,
) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """(tokenizer, model) ready to train: the recipe's base with its method applied (only the method and the head
    train, in fp32), gradient checkpointing and the fast dropout as the recipe asks, and the tokenizer padding on
    the side the method needs. What `peftkit run` trains; `total_steps`: the run's optimizer steps; `weightless`:
    on the meta device (load_base)."""
    tokenizer, model = load_base(recipe, task, labels, device, precision, weightless=weightless)
    return adapt(model, tokenizer, recipe, task, device, total_steps)


def adapt(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    task: Task,
    device: torch.device,
    total_steps: int,
) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """(tokenizer, model): the base `model` made ready to train, as adapted_model does it (and `peftkit estimate` on
    a model without weights, on the meta device): gradient checkpointing, the method, fp32 trainables, fast
    dropout; and the tokenizer padding on the side the method needs (both changed in place, both returned)."""
    if recipe.train.gradient_checkpointing:
        # Non-reentrant: the reentrant variant drops gradients when the checkpointed block's inputs do not
        # require grad, which is the case with a frozen (e.g. quantised) base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    method = METHODS[recipe.method.name]
    context = method_context(recipe, task, model, total_steps)
    model = method.apply(model, recipe.method, context)
    trainable_in_fp32(model)  # a bf16 base (model.dtype) left the copied task head in bf16
    use_fast_dropout(model, recipe, device)
    tokenizer.padding_side = optional(method, "padding_side")(context) or tokenizer.padding_side
    return tokenizer, model


def use_fast_dropout(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> None:
    """train.fast_dropout in a CPU run: every dropout of the adapted `model` (its nn.Dropout modules, its
    attention's, the method's own) draws its mask from random integers (dropout.py). Left alone on GPUs."""
    if recipe.train.fast_dropout and device.type == "cpu":
        from peftkit import dropout  # imports torch at its top: loaded only when a run trains

        done = dropout.install(model)
        # `peftkit estimate` and `init` adapt a meta-device model (no weights): nothing of theirs trains, so not told
        meta = any(p.is_meta for p in model.parameters())
        log.log(logging.DEBUG if meta else logging.INFO, "fast dropout: %s", done)


def base_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    """fp32, or bf16 for a frozen base the method leaves untouched in a bf16 run (model.dtype auto). Under autocast
    every matmul runs in bf16 anyway, so an fp32 base only doubles the base's memory, and is cast again at every
    use (autocast caches its casts of trainable weights only). Not fp16: its range is too small for the residual
    stream of models pretrained in bf16, which fp16 autocast keeps in fp32. A quantised base keeps fp32 for the
    layers that are not quantised, as peft's k-bit preparation wants them."""
    import torch

    method = METHODS[recipe.method.name]
    if (
        recipe.model.dtype == "fp32"
        or precision != "bf16"
        or recipe.quantization
        or optional(method, "rewrites_base")(recipe.method)
    ):
        return torch.float32
    return torch.bfloat16


def load_trained(
    run_dir: Path,
    device: torch.device | None = None,
    dequantize: bool = False,
    recipe: Recipe | None = None,
    inference: bool = True,
) -> tuple[Recipe, Task, PreTrainedTokenizerBase, PreTrainedModel | PeftModel, list[str] | None]:
    """(recipe, task, tokenizer, model with its adapter, labels) of a finished run, ready for inference.
    `dequantize`: a quantised base is turned back into full precision first; `recipe` replaces the run's own
    (e.g. without its quantization section, for the adapter on the original full-precision base); `inference`
    False: computing exactly as training did (load_base)."""
    import torch
    from transformers import AutoTokenizer

    adapter_dir, own_recipe, info = finished_adapter(run_dir)
    recipe = recipe or own_recipe
    task, labels = TASKS[recipe.task.type], info["labels"]
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    _, model = load_base(recipe, task, labels, device, dequantize=dequantize, inference=inference)
    model = storage.load(model, adapter_dir, method_context(recipe, task, model))
    return recipe, task, tokenizer, model.to(device).eval(), labels
