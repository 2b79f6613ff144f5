"""Save what was trained (adapter + task head, in peft's format) and merge it into a standalone model, checking
that the merged model computes what the adapter did."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import __version__, assets, atomic, quant
from peftkit.errors import UserError
from peftkit.loading import load_trained
from peftkit.methods import METHODS, storage
from peftkit.run_folder import INFO

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from peftkit.recipe import Recipe
    from peftkit.tasks.common import Task

log = logging.getLogger("peftkit")


def save_adapter(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    recipe: Recipe,
    labels: list[str] | None,
    gathered: dict | None = None,
) -> None:
    """The trained part in its method's format (methods/storage.py): peft's, so plain `PeftModel.from_pretrained`
    loads it, head included; peftkit's own for prefix tuning and bottleneck adapters; the whole model for full
    fine-tuning. Plus the tokenizer, and peftkit.json with what the formats do not hold (task, labels).
    `gathered`: a sharded model's trained tensors, gathered whole (methods.base.trainable_tensors)."""
    fmt = storage.save(model, out, recipe.method, recipe.model.name, gathered)
    tokenizer.save_pretrained(out)
    info = {
        "peftkit_version": __version__,
        "task": recipe.task.type,
        "method": recipe.method.name,
        "format": fmt,
        "base_model": recipe.model.name,
        "labels": labels,
    }
    (out / INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")


def adapter_bytes(adapter_dir: Path) -> int:
    """Size of the trained weights on disk (all formats keep them in .safetensors files; the tokenizer aside)."""
    return sum(f.stat().st_size for f in Path(adapter_dir).glob("*.safetensors"))


def merge(
    run_dir: Path, out: Path, overwrite: bool = False, tolerance: float | None = None, requantize: bool = False
) -> dict:
    """Fold the adapter into the base weights, save a standalone model (safetensors), reload it from disk and
    compare its logits with the unmerged model's on a fixed batch. Fails above the tolerance; the output
    folder then never appears.

    A run trained on an 8/4-bit base merges in full precision: the base is dequantised, the adapter folded in,
    and the merged model saved unquantised. (peft's own merge into a bitsandbytes layer re-quantises W0 + ΔW,
    which silently loses part of ΔW.) The report then also gives how far the merged model is from what was
    trained (quantised base + adapter) and from the adapter on the original full-precision base. Re-quantising
    the merged model is lossy too; it happens only with `requantize`, and its error is reported."""
    import torch

    # computed as in training (no inference-only 4-bit layout, quant.cpu_layout): the reference is what was trained
    recipe, task, tokenizer, model, _ = load_trained(run_dir, torch.device("cpu"), inference=False)
    method = METHODS[recipe.method.name]
    if not method.MERGEABLE:
        raise UserError(f"method '{recipe.method.name}' cannot be merged: {method.NOT_MERGEABLE_BECAUSE}")
    if requantize and not recipe.quantization:
        raise UserError("--requantize: this run trained on a full-precision base, so there is nothing to re-quantise")
    tolerance = tolerance or recipe.export.merge_tolerance
    batch = probe_batch(tokenizer)
    report = {"tolerance": tolerance, "output": str(out)}
    if recipe.quantization:
        trained = _logits(model, batch)  # what was trained and evaluated: quantised base + adapter
        del model
        _, _, _, model, _ = load_trained(run_dir, torch.device("cpu"), dequantize=True)
    unmerged = _logits(model, batch)
    merged = model.merge_and_unload()
    with atomic.building(out, overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = type(merged).from_pretrained(tmp, dtype=torch.float32, **assets.MODEL_LOADING).eval()
        merged_logits = _logits(reloaded, batch)
        report["max_abs_diff"] = diff = _max_diff(merged_logits, unmerged)
        log.info("merged vs unmerged logits: max abs difference %.3g (tolerance %.1g)", diff, tolerance)
        if not diff <= tolerance:
            raise UserError(
                f"merge check failed: merged and unmerged logits differ by up to {diff:.3g} (tolerance "
                f"{tolerance:g}); nothing was written. Raise export.merge_tolerance only if you accept that."
            )
        if recipe.quantization:
            report["vs_quantized_base"] = _max_diff(merged_logits, trained)
            full_precision = recipe.model_copy(update={"quantization": None})
            _, _, _, reference, _ = load_trained(run_dir, torch.device("cpu"), recipe=full_precision)
            report["vs_full_precision_base"] = _max_diff(merged_logits, _logits(reference, batch))
            del reference
            log.info(
                "merged (full precision) vs quantised base + adapter: %.3g; vs original base + adapter: %.3g",
                report["vs_quantized_base"],
                report["vs_full_precision_base"],
            )
            if requantize:
                report["requantized_vs_quantized_base"] = _requantize(tmp, type(merged), recipe, task, batch, trained)
    return report


def _requantize(
    folder: Path,
    model_class: type[PreTrainedModel],
    recipe: Recipe,
    task: Task,
    batch: dict[str, torch.Tensor],
    trained: torch.Tensor,
) -> float:
    """Replace the merged model in `folder` by its 8/4-bit copy (the recipe's quantization settings); returns its
    max abs logit difference from the quantised base + adapter that was trained."""
    import torch

    kwargs = quant.load_kwargs(recipe.quantization, list(task.HEAD_MODULES), torch.device("cpu"))
    model = model_class.from_pretrained(folder, dtype=torch.float32, **assets.MODEL_LOADING, **kwargs).eval()
    # bitsandbytes' CPU repack (quant.cpu_layout) would change the layers before they are saved, and it saves
    # a repacked layer without double quantisation with its scales transposed (bitsandbytes 0.50)
    quant.cpu_layout(model, inference=False)
    diff = _max_diff(_logits(model, batch), trained)
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    model.save_pretrained(folder, safe_serialization=True)
    log.info("re-quantised %d-bit merged model vs quantised base + adapter: %.3g", recipe.quantization.bits, diff)
    return diff


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch

    with torch.no_grad():
        outputs = model(**batch)
    if "logits" in outputs:
        return outputs.logits.float()
    return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1).float()  # extractive QA: (B, T, 2)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def probe_batch(tokenizer: PreTrainedTokenizerBase, batch: int = 8, length: int = 48, seed: int = 0) -> dict:
    """A fixed batch of random ordinary tokens: the merge check tests the maths, so it needs no dataset."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), 30_000)) if i not in special])
    ids = ordinary[torch.randint(len(ordinary), (batch, length), generator=generator)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
