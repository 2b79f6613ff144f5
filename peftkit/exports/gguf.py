"""`peftkit export --format gguf`: a merged decoder (Llama architecture, or GPT-2) as one GGUF file for llama.cpp /
Ollama.

The file holds what llama.cpp's `convert_hf_to_gguf.py` writes for a Llama-architecture model: the
hyper-parameters under `llama.*`, the byte-level BPE tokenizer (`tokenizer.ggml.*`: tokens, token types, merges,
special ids, add-bos/eos flags, chat template), and the tensors under llama.cpp's names (gguf's `TensorNameMap`).
Two conversions matter:

- q_proj / k_proj rows are permuted. transformers' Llama applies rotary embeddings to the two halves of each
  head (`rotate_half`: dimension i pairs with i + d/2); llama.cpp's `llama` graph pairs neighbours (2i, 2i+1).
  Reordering each head's rows from [first half; second half] to interleaved makes the two compute the same
  thing (transformers' GGUF loader applies the inverse when it reads the file back, which the verification uses).
- Tied embeddings (SmolLM2): no `output.weight` is written; llama.cpp then uses `token_embd.weight` as the
  output projection, and transformers' loader sets `tie_word_embeddings` from its absence.

GPT-2 (its converter's GPT2Model): Conv1D weights are stored (in, out) and transposed to (out, in), and
`output.weight` is written as a copy of the embedding, which llama.cpp's gpt2 graph reads.

Norms and other 1-D tensors stay f32 whatever the dtype (as the converter keeps them); a 2-D tensor whose rows are
not a multiple of q8_0's 32-value block falls back to f16, as in the converter.

Verification loads the file back with transformers' GGUF loader (dequantised to fp32) and compares its logits on
a few prompts with the merged model's: max abs difference, its ratio to the logits' range, and how often the top
next token agrees. f32 must match to the merge tolerance; the lossy dtypes must stay within BOUNDS (relative to
the logits' range, measured on a tiny random Llama and on SmolLM2: see benchmarks/RESULTS.md)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import __version__, assets, atomic
from peftkit.errors import UserError
from peftkit.exports.common import PROMPTS, merged_folder, require
from peftkit.run_folder import finished_adapter

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("peftkit")

DTYPES = ("f32", "f16", "bf16", "q8_0")
SUPPORTED = {"llama": "LLAMA", "gpt2": "GPT2"}  # transformers model_type -> gguf.MODEL_ARCH member
# largest max-abs logit difference accepted, as a share of the logits' range (max - min) on the prompts; f32 is
# held to the recipe's export.merge_tolerance in absolute terms instead
BOUNDS = {"f16": 0.01, "bf16": 0.05, "q8_0": 0.05}

# llama.cpp names the pre-tokenizer (the regex split before BPE) by the hash of one text's token ids
# (convert_hf_to_gguf.py: get_vocab_base_pre); the ones of byte-level BPE models peftkit trains on
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}


def export_gguf(run_dir: Path, out: Path, dtype: str, overwrite: bool, verify: bool) -> dict:
    """Merge the run, write it as GGUF at `out` (atomically), and verify it by loading it back; returns the report
    (merge check, output, size, and the verification's numbers)."""
    require("gguf")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: GGUF export writes {', '.join(DTYPES)}")
    _, recipe, _ = finished_adapter(run_dir)
    if recipe.task.type != "causal_lm":
        raise UserError(
            f"GGUF export is for causal-LM (decoder) runs; this is a {recipe.task.type} run (export it with "
            "--format onnx)"
        )
    atomic.check_file(out, overwrite)  # before the minutes of merging
    with merged_folder(run_dir) as (folder, merge_report):
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        model_type = config.get("model_type")
        if model_type not in SUPPORTED:
            raise UserError(
                f"GGUF export supports the {' and '.join(SUPPORTED)} architectures (e.g. SmolLM2, Llama 3, GPT-2); "
                f"this run's base is '{model_type}'. Serve it with its adapter instead (README: serving)"
            )
        with atomic.writing_file(out, overwrite) as tmp:
            write(folder, config, tmp, dtype)
            report = {"output": str(out), "dtype": dtype, "merge_max_abs_diff": merge_report["max_abs_diff"]}
            report["bytes"] = tmp.stat().st_size
            if verify:
                report |= check(folder, tmp, dtype, recipe.export.merge_tolerance)
    return report


def write(folder: Path, config: dict, path: Path, dtype: str) -> None:
    """The GGUF file of the merged model saved in `folder` (config.json, safetensors, tokenizer)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    arch = gguf.MODEL_ARCH[SUPPORTED[config["model_type"]]]
    file_type, tensor_type = _types(dtype)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_string("general.generator", f"peftkit {__version__}")
    hyper = _llama if config["model_type"] == "llama" else _gpt2
    tensors = hyper(writer, config)
    writer.add_file_type(file_type)
    _vocab(writer, AutoTokenizer.from_pretrained(folder), folder, config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = gguf.TensorNameMap(arch, config.get("num_hidden_layers") or config["n_layer"])
    state: dict[str, torch.Tensor] = {}
    for part in sorted(folder.glob("model*.safetensors")):
        state |= load_file(part)
    for name, tensor in state.items():
        for gguf_name, data in tensors(name, tensor.float(), names):
            _add_tensor(writer, gguf_name, data.numpy(), tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _name(names: object, name: str) -> str:
    found = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise UserError(f"GGUF export: no llama.cpp name for tensor {name}; the model is not a plain Llama / GPT-2")
    return found


def _llama(writer: object, config: dict) -> Callable:
    """Llama's hyper-parameters (convert_hf_to_gguf.py's LlamaModel); returns its tensor conversion."""
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export: rope scaling '{rope['rope_type']}' is not written yet; plain RoPE only")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)

    def tensors(name: str, data: torch.Tensor, names: object) -> list[tuple[str, torch.Tensor]]:
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            return []  # tied: llama.cpp reads the output projection from token_embd (no output.weight)
        if name.endswith("rotary_emb.inv_freq"):
            return []
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_kv)
        return [(_name(names, name), data)]

    return tensors


def _gpt2(writer: object, config: dict) -> Callable:
    """GPT-2's hyper-parameters (convert_hf_to_gguf.py's GPT2Model); returns its tensor conversion: Conv1D
    weights (in, out) transposed to (out, in), and the output projection written as a copy of the embedding
    (GPT-2 ties them; llama.cpp's gpt2 graph reads output.weight)."""
    writer.add_block_count(config["n_layer"])
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

    def tensors(name: str, data: torch.Tensor, names: object) -> list[tuple[str, torch.Tensor]]:
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            return []  # causal-mask buffers; lm_head is the embedding, written below
        if name.endswith(conv1d):
            data = data.T.contiguous()
        found = [(_name(names, name), data)]
        if name.endswith("wte.weight"):
            found.append(("output.weight", data))
        return found

    return tensors


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from transformers' half-split rotary layout to llama.cpp's interleaved one: within a head
    of d rows, row i of the first half goes to 2i and row i of the second half to 2i + 1 (also for biases)."""
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def _types(dtype: str) -> tuple[int, int]:
    import gguf

    return {
        "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
        "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    }[dtype]


def _add_tensor(writer: object, name: str, data: np.ndarray, tensor_type: int) -> None:
    import gguf

    # norms, 1-D tensors and position embeddings in f32, as llama.cpp's converter and its kernels expect
    keep = data.ndim <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight"
    qtype = gguf.GGMLQuantizationType.F32 if keep else tensor_type
    try:
        quantized = gguf.quantize(data, qtype)
    except gguf.QuantError:  # rows not a multiple of the quant block: f16, as the converter falls back
        qtype = gguf.GGMLQuantizationType.F16
        quantized = gguf.quantize(data, qtype)
    writer.add_tensor(name, quantized, raw_dtype=qtype)


def _vocab(writer: object, tokenizer: PreTrainedTokenizerBase, folder: Path, vocab_size: int) -> None:
    """tokenizer.ggml.*: llama.cpp's `gpt2` (byte-level BPE) tokenizer, as the converter's _set_vocab_gpt2."""
    import gguf

    tokenizer_json = folder / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8")) if tokenizer_json.is_file() else {}
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3); this run's tokenizer is "
            f"{spec.get('model', {}).get('type', type(tokenizer).__name__)}"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"GGUF export: the tokenizer has ids beyond the model's vocab_size {vocab_size}")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = tokenizer.added_tokens_decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        log.warning("GGUF export: pre-tokenizer not recognised (hash %s); writing 'default'", digest[:12])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True)  # merges, special ids, add-bos/eos flags
    # transformers 5 saves the template as chat_template.jinja, which gguf 0.19's SpecialVocab does not read
    special.chat_template = special.chat_template or tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def check(folder: Path, path: Path, dtype: str, tolerance: float) -> dict:
    """Load the GGUF back with transformers' loader and compare it with the merged model on PROMPTS; raise when
    it is off by more than the dtype allows. Also checks the tokenizer read from the file encodes alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **assets.MODEL_LOADING).eval()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # transformers 5.24's loader reads gpt2.context_length into `n_ctx`, which GPT2Config ignores, so a model with
    # n_positions other than GPT-2's 1024 would not load: state it (the file's own value is checked by tests)
    extra = {"n_positions": config["n_positions"]} if config["model_type"] == "gpt2" else {}
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **extra, **assets.MODEL_LOADING
    )
    loaded.eval()
    from_file = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    same_tokens = all(from_file.encode(p, add_special_tokens=False) == tokenizer.encode(p, add_special_tokens=False)
                      for p in PROMPTS)  # fmt: skip
    diff, span, agree, total = 0.0, 0.0, 0, 0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        want, got = _logits(merged, ids), _logits(loaded, ids)
        diff = max(diff, (want - got).abs().max().item())
        span = max(span, (want.max() - want.min()).item())
        agree += (want.argmax(-1) == got.argmax(-1)).sum().item()
        total += ids.shape[1]
    report = {"max_abs_diff": diff, "relative_diff": diff / span, "top1_agreement": agree / total}
    report["tokenizer_round_trip"] = same_tokens
    log.info(
        "GGUF %s loaded back vs merged model: max abs logit difference %.3g (%.2g of the logits' range), "
        "top-1 agreement %.3f",
        dtype,
        diff,
        report["relative_diff"],
        report["top1_agreement"],
    )
    bound = f"{tolerance:g}" if dtype == "f32" else f"{BOUNDS[dtype]:g} of the logits' range"
    ok = diff <= tolerance if dtype == "f32" else report["relative_diff"] <= BOUNDS[dtype]
    if not ok or not same_tokens:
        what = "the tokenizer read from the file encodes differently" if ok else f"bound {bound}"
        raise UserError(
            f"GGUF check failed: the file loaded back differs from the merged model by up to {diff:.3g} ({what}); "
            "nothing was written"
        )
    report["bound"] = bound
    return report


def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()[0]
