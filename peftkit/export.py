"""Save what was trained (adapter + task head, in peft's format) and merge it into a standalone model, checking
that the merged model computes what the adapter did."""

import json
import logging
from pathlib import Path

from peftkit import __version__, atomic
from peftkit.errors import UserError

log = logging.getLogger("peftkit")


def save_adapter(model, tokenizer, out: Path, recipe, labels) -> None:
    """The trained part in its method's format (methods/base.py): peft's, so plain `PeftModel.from_pretrained`
    loads it, head included; peftkit's own for prefix tuning and bottleneck adapters; the whole model for full
    fine-tuning. Plus the tokenizer, and peftkit.json with what the formats do not hold (task, labels)."""
    from peftkit.methods import base

    fmt = base.save(model, out, recipe.method, recipe.model.name)
    tokenizer.save_pretrained(out)
    info = {"peftkit_version": __version__, "task": recipe.task.type, "method": recipe.method.name,
            "format": fmt, "base_model": recipe.model.name, "labels": labels}  # fmt: skip
    (out / "peftkit.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def adapter_bytes(adapter_dir: Path) -> int:
    """Size of the trained weights on disk (all formats keep them in .safetensors files; the tokenizer aside)."""
    return sum(f.stat().st_size for f in Path(adapter_dir).glob("*.safetensors"))


def merge(run_dir: Path, out: Path, overwrite: bool = False, tolerance: float | None = None) -> dict:
    """Fold the adapter into the base weights, save a standalone model (safetensors), reload it from disk and
    compare its logits with the unmerged model's on a fixed batch. Fails above the tolerance; the output
    folder then never appears."""
    import torch
    from peft import PeftModel

    from peftkit.methods import METHODS
    from peftkit.run import load_trained

    recipe, task, tokenizer, model, _ = load_trained(run_dir, torch.device("cpu"))
    method = METHODS[recipe.method.name]
    if not method.MERGEABLE:
        raise UserError(f"method '{recipe.method.name}' cannot be merged: {method.NOT_MERGEABLE_BECAUSE}")
    tolerance = tolerance or recipe.export.merge_tolerance
    batch = probe_batch(tokenizer)
    with torch.no_grad():
        unmerged = model(**batch).logits
    assert isinstance(model, PeftModel)
    merged = model.merge_and_unload()
    with atomic.building(out, overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = type(merged).from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (reloaded(**batch).logits - unmerged).abs().max().item()
        log.info("merged vs unmerged logits: max abs difference %.3g (tolerance %.1g)", diff, tolerance)
        if not diff <= tolerance:
            raise UserError(
                f"merge check failed: merged and unmerged logits differ by up to {diff:.3g} (tolerance "
                f"{tolerance:g}); nothing was written. Raise export.merge_tolerance only if you accept that."
            )
    return {"max_abs_diff": diff, "tolerance": tolerance, "output": str(out)}


def probe_batch(tokenizer, batch: int = 8, length: int = 48, seed: int = 0) -> dict:
    """A fixed batch of random ordinary tokens: the merge check tests the maths, so it needs no dataset."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), 30_000)) if i not in special])
    ids = ordinary[torch.randint(len(ordinary), (batch, length), generator=generator)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
