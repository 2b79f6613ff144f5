"""`peftkit export --format onnx`: a merged encoder classifier, tagger or extractive-QA model as an ONNX folder
for onnxruntime.

The folder is laid out as Hugging Face Optimum's ONNX models are, so `optimum.onnxruntime.ORTModelFor...` and a
plain onnxruntime session both read it:

    model.onnx                 fp32, opset 17; inputs input_ids, attention_mask (and token_type_ids where the
                               model takes them, except for QA: see export_onnx), int64 (batch, sequence)
                               with both axes dynamic; outputs logits (start_logits / end_logits for question
                               answering)
    config.json                the merged model's config, id2label included (the label map)
    tokenizer files            what encodes text the way training did
    peftkit.json               task, labels, inputs and outputs, the verification's numbers

Exported with torch's TorchScript-based exporter (`dynamo=False`): deprecated in torch 2.9+, but it needs no
onnxscript and traces these models exactly; the dynamo exporter would add a dependency for no gain here. fp32
only: onnxruntime's CPU kernels are fastest in fp32 and int8, and an fp16 graph would only help on GPUs.

Verification runs the file in onnxruntime on a padded batch of a different shape than the one traced (so the
dynamic axes are exercised) and compares with the merged torch model; fails above export.merge_tolerance."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import __version__, assets, atomic
from peftkit.errors import UserError
from peftkit.exports.common import PROMPTS, merged_folder, require
from peftkit.run_folder import INFO, finished_adapter

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("peftkit")

MODEL = "model.onnx"
OPSET = 17
DTYPES = ("fp32",)
# task -> (outputs, the axes of each output that vary: 1 = per token)
OUTPUTS = {
    "classification": (("logits",), {"logits": {0: "batch"}}),
    "token_classification": (("logits",), {"logits": {0: "batch", 1: "sequence"}}),
    "question_answering": (
        ("start_logits", "end_logits"),
        {"start_logits": {0: "batch", 1: "sequence"}, "end_logits": {0: "batch", 1: "sequence"}},
    ),
}


def export_onnx(run_dir: Path, out: Path, dtype: str, overwrite: bool, verify: bool) -> dict:
    """Merge the run, export it to an ONNX folder at `out` (atomically) and verify it with onnxruntime."""
    require("onnx", "onnxruntime")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: ONNX export writes fp32 only (onnxruntime's CPU kernels are fastest in it)")
    _, recipe, info = finished_adapter(run_dir)
    if recipe.task.type not in OUTPUTS:
        raise UserError(
            f"ONNX export covers encoder {', '.join(OUTPUTS)} runs; this is a {recipe.task.type} run "
            "(export a decoder with --format gguf)"
        )
    atomic.check(out, overwrite)  # before the minutes of merging
    with merged_folder(run_dir) as (folder, merge_report), atomic.building(out, overwrite) as tmp:
        model, tokenizer = _load(folder, recipe.task.type)
        inputs = input_names(model, tokenizer)
        if recipe.task.type == "question_answering" and "token_type_ids" in inputs:
            # peft 0.21's PeftModelForQuestionAnswering does not pass token_type_ids on to the model, so the adapter
            # was trained and evaluated with every segment id 0; the export computes that too (the input left out,
            # BERT then uses zeros) instead of what the merged model would do with real segment ids
            inputs.remove("token_type_ids")
        outputs, output_axes = OUTPUTS[recipe.task.type]
        export(model, tokenizer, inputs, outputs, output_axes, tmp / MODEL)
        for file in folder.iterdir():  # config (label map) and tokenizer; the weights are in model.onnx
            if file.is_file() and not file.name.endswith(".safetensors"):
                shutil.copy2(file, tmp / file.name)
        report = {"output": str(out), "dtype": dtype, "merge_max_abs_diff": merge_report["max_abs_diff"]}
        report["bytes"] = (tmp / MODEL).stat().st_size
        if verify:
            report |= check(model, tokenizer, tmp / MODEL, inputs, outputs, recipe.export.merge_tolerance)
        about = {
            "peftkit_version": __version__,
            "task": recipe.task.type,
            "base_model": info["base_model"],
            "labels": info["labels"],
            "inputs": inputs,
            "outputs": list(outputs),
            "opset": OPSET,
            "verification": {k: v for k, v in report.items() if k not in ("output", "bytes")},
        }
        (tmp / INFO).write_text(json.dumps(about, indent=2), encoding="utf-8")
    return report


def _load(folder: Path, task_type: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from peftkit.tasks import TASKS

    auto = getattr(transformers, TASKS[task_type].AUTO_CLASS)
    # eager attention traces to plain matmuls and softmax, which every onnxruntime build runs
    model = auto.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **assets.MODEL_LOADING)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def input_names(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's outputs the model takes, in the order of the model's forward() (the TorchScript exporter
    names inputs by position)."""
    wanted = set(tokenizer.model_input_names) | {"input_ids", "attention_mask"}
    return [name for name in inspect.signature(model.forward).parameters if name in wanted]


def export(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: list[str],
    outputs: tuple[str, ...],
    output_axes: dict[str, dict[int, str]],
    path: Path,
) -> None:
    import torch

    batch = _encode(tokenizer, PROMPTS[:2], inputs)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs} | output_axes
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(batch[name] for name in inputs),
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=OPSET,
        )
    import onnx

    onnx.checker.check_model(str(path))


def check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    inputs: list[str],
    outputs: tuple[str, ...],
    tolerance: float,
) -> dict:
    """onnxruntime vs torch on all PROMPTS padded together (another batch size and length than traced)."""
    import torch

    session = session_of(path)
    batch = _encode(tokenizer, PROMPTS, inputs)
    got = session.run(list(outputs), {name: batch[name].numpy() for name in inputs})
    with torch.no_grad():
        want = model(**batch)
    diff = max(_max_diff(want[name], value) for name, value in zip(outputs, got))
    log.info("ONNX (onnxruntime) vs merged torch model: max abs difference %.3g (tolerance %g)", diff, tolerance)
    if not diff <= tolerance:
        raise UserError(
            f"ONNX check failed: onnxruntime and torch differ by up to {diff:.3g} (tolerance {tolerance:g}); "
            "nothing was written"
        )
    return {"max_abs_diff": diff, "tolerance": tolerance}


def session_of(path: Path) -> object:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], inputs: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return {name: encoded[name] for name in inputs}


def _max_diff(want: torch.Tensor, got: np.ndarray) -> float:
    import torch

    return (want.float() - torch.from_numpy(got)).abs().max().item()
