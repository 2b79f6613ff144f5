"""`peftkit export`: GGUF of a tiny Llama LoRA run (loaded back by transformers' GGUF loader, metadata as
llama.cpp's converter writes it), ONNX of a tiny BERT classifier and tagger (onnxruntime against torch), refusals,
--force and atomicity."""

import csv
import json

import numpy as np
import pytest
import torch

from peftkit.errors import UserError

from .conftest import FILLER, NEGATIVE, POSITIVE, peftkit_here
from .test_ner import ner_sentences, write_conll

WORDS = FILLER + POSITIVE + NEGATIVE
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def bpe_tokenizer(folder):
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained on the test words, ChatML specials."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    texts = [" ".join(WORDS)] * 20 + ["The movie was. A quiet, moving film about a family? Question: Answer:"] * 5
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """{'llama' / 'gpt2' / 'qwen2': folder}: 2-layer decoders over the BPE tokenizer; the Llama has grouped-query
    attention (4 heads, 2 KV heads) and tied embeddings, as SmolLM2; Qwen2 is an architecture GGUF export refuses."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folders = {}
    for name in ("llama", "gpt2", "qwen2"):
        folder = tmp_path_factory.mktemp("models") / f"tiny-{name}-bpe"
        tokenizer = bpe_tokenizer(folder)
        ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        torch.manual_seed(0)
        if name == "llama":
            config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                 tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, **ids)  # fmt: skip
            LlamaForCausalLM(config).save_pretrained(folder)
        elif name == "gpt2":
            config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
            GPT2LMHeadModel(config).save_pretrained(folder)
        else:
            shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
            config = Qwen2Config(vocab_size=len(tokenizer), intermediate_size=64, **shape, **ids)
            Qwen2ForCausalLM(config).save_pretrained(folder)
        folders[name] = folder
    return folders


def lm_run(model, folder, name, targets):
    import yaml

    data = folder / "texts.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        for i in range(60):
            writer.writerow([" ".join(WORDS[(i + k) % len(WORDS)] for k in range(6))])
    recipe = {
        "model": {"name": str(model)},
        "data": {"source": str(data), "columns": {"text": "text"}},
        "task": {"type": "causal_lm", "max_length": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": targets},
        "train": {"batch_size": 8, "lr": 2e-2, "max_steps": 3},
        "export": {"output_dir": str(folder / "runs" / "{name}")},
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    result = peftkit_here("run", folder / f"{name}.yaml")
    assert result.returncode == 0, result.stderr
    return folder / "runs" / name


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, decoders):
    return lm_run(decoders["llama"], tmp_path_factory.mktemp("llama"), "lm", ["q_proj", "k_proj", "v_proj", "o_proj"])


def logits_of(model, tokenizer, texts):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer.encode(t)])).logits[0] for t in texts]


# max abs logit difference between the file loaded back and the adapter on its base, as a share of the logits'
# range: f32 exact up to float rounding; measured on this tiny model f16 ~2e-4, bf16 ~2e-3, q8_0 ~5e-3
BOUNDS = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2}


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_export_loads_back_with_the_adapters_logits(llama_run, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from peftkit.loading import load_trained

    out = tmp_path / f"lm-{dtype}.gguf"
    result = peftkit_here("export", llama_run, "--format", "gguf", "--dtype", dtype, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "loaded back with transformers: max abs logit difference" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no .partial left
    # independently of the command's own check: the file against the unmerged adapter on its base
    _, _, tokenizer, adapted, _ = load_trained(llama_run, torch.device("cpu"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    texts = ["the movie was good", "a dull plot and a boring story"]
    for want, got in zip(logits_of(adapted.float(), tokenizer, texts), logits_of(loaded, tokenizer, texts)):
        assert (want - got).abs().max() <= BOUNDS[dtype] * (want.max() - want.min()) + 1e-6
        assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_gguf_metadata_is_what_llama_cpp_reads(llama_run, tmp_path, decoders):
    import gguf
    from transformers import AutoTokenizer

    out = tmp_path / "lm.gguf"
    result = peftkit_here("export", llama_run, "--format", "gguf", "--dtype", "q8_0", "--out", out, "--no-verify")
    assert result.returncode == 0, result.stderr and "not verified" in result.stdout
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tokenizer = AutoTokenizer.from_pretrained(decoders["llama"])
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {"block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 128,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16}  # fmt: skip
    assert {k: fields[f"llama.{k}"] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
    assert fields["tokenizer.ggml.merges"] and fields["tokenizer.chat_template"] == TEMPLATE
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    control = gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == control
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd.weight, as the converter leaves it
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert len(tensors) == 1 + 1 + 2 * 9  # token_embd, output_norm, 9 per block


def test_q_k_permutation_is_llama_cpps_interleaved_rotary_layout():
    from peftkit.exports.gguf import permute

    heads, head_dim = 2, 8
    weight = torch.arange(heads * head_dim, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row r holds r
    rows = permute(weight, heads)[:, 0].tolist()
    # each head's row i (first half) goes to 2i, row i + d/2 (second half) to 2i + 1
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_gpt2_gguf_export_loads_back_with_the_adapters_logits(tmp_path_factory, decoders, tmp_path, dtype):
    import gguf
    from transformers import AutoModelForCausalLM

    from peftkit.loading import load_trained

    run = lm_run(decoders["gpt2"], tmp_path_factory.mktemp("gpt2"), "gpt", ["c_attn", "c_proj", "c_fc"])
    out = tmp_path / "gpt.gguf"
    result = peftkit_here("export", run, "--format", "gguf", "--dtype", dtype, "--out", out)
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "gpt2" and fields["gpt2.context_length"] == 128
    assert fields["gpt2.embedding_length"] == 32 and fields["gpt2.feed_forward_length"] == 128
    tensors = {t.name: t for t in reader.tensors}
    assert {"output.weight", "position_embd.weight", "blk.1.attn_qkv.weight"} <= set(tensors)  # gpt2 reads output
    assert tensors["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    _, _, tokenizer, adapted, _ = load_trained(run, torch.device("cpu"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32, n_positions=128)
    texts = ["the movie was good", "a dull plot and a boring story"]
    for want, got in zip(logits_of(adapted.float(), tokenizer, texts), logits_of(loaded.eval(), tokenizer, texts)):
        assert (want - got).abs().max() <= BOUNDS[dtype] * (want.max() - want.min()) + 1e-6


def test_gguf_refuses_other_architectures_and_tasks(tmp_path_factory, decoders, tmp_path):
    qwen_run = lm_run(decoders["qwen2"], tmp_path_factory.mktemp("qwen2"), "qwen", ["q_proj", "v_proj"])
    result = peftkit_here("export", qwen_run, "--format", "gguf", "--out", tmp_path / "qwen.gguf")
    assert result.returncode == 2 and "supports the llama and gpt2 architectures" in result.stderr
    assert "'qwen2'" in result.stderr and "Traceback" not in result.stderr and not list(tmp_path.iterdir())
    result = peftkit_here("export", qwen_run, "--format", "onnx", "--out", tmp_path / "qwen-onnx")
    assert result.returncode == 2 and "this is a causal_lm run" in result.stderr


def test_gguf_refuses_an_existing_file_without_force_and_leaves_nothing_on_failure(llama_run, tmp_path, monkeypatch):
    from peftkit.exports import gguf as gguf_export

    out = tmp_path / "lm.gguf"
    out.write_text("an older export")
    result = peftkit_here("export", llama_run, "--format", "gguf", "--out", out)
    assert result.returncode == 2 and "already exists; pass --overwrite (or --force)" in result.stderr
    assert out.read_text() == "an older export"

    def fail(*args):
        raise RuntimeError("killed while checking")

    monkeypatch.setattr(gguf_export, "check", fail)
    with pytest.raises(RuntimeError, match="killed"):
        gguf_export.export_gguf(llama_run, out, "f16", overwrite=True, verify=True)
    assert out.read_text() == "an older export" and sorted(p.name for p in tmp_path.iterdir()) == ["lm.gguf"]
    monkeypatch.undo()
    result = peftkit_here("export", llama_run, "--format", "gguf", "--out", out, "--force")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["lm.gguf"]


def test_a_missing_library_is_a_user_error_naming_the_install(monkeypatch, tmp_path):
    import importlib.util

    from peftkit.exports import common

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(UserError, match=r'onnxruntime, which is not installed: pip install "peftkit\[export\]"'):
        common.require("onnx", "onnxruntime")


# ONNX


def encoder_run(folder, tiny_bert, task, data, columns, **task_options):
    import yaml

    recipe = {
        "model": {"name": str(tiny_bert)},
        "data": {"source": str(data), **({"columns": columns} if columns else {})},
        "task": {"type": task, "max_length": 32, **task_options},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"batch_size": 16, "lr": 1e-2, "max_steps": 3},
        "export": {"output_dir": str(folder / "runs" / "{name}")},
    }
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(recipe))
    result = peftkit_here("run", folder / f"{task}.yaml")
    assert result.returncode == 0, result.stderr
    return folder / "runs" / task


@pytest.mark.parametrize("task", ["classification", "token_classification"])
def test_onnx_export_matches_torch_in_onnxruntime(task, tmp_path, tiny_bert, sentiment_csv):
    import onnxruntime
    from transformers import AutoTokenizer

    from peftkit.loading import load_trained

    if task == "classification":
        run = encoder_run(tmp_path, tiny_bert, task, sentiment_csv, {"text": "review", "label": "sentiment"})
    else:
        run = encoder_run(tmp_path, tiny_bert, task, write_conll(tmp_path / "ner.conll", ner_sentences(120)), None)
    out = tmp_path / "onnx"
    result = peftkit_here("export", run, "--format", "onnx", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime vs torch: max abs logit difference" in result.stdout
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "peftkit.json"} <= files
    assert not any(name.endswith(".safetensors") for name in files)
    info = json.loads((out / "peftkit.json").read_text())
    labels = json.loads((run / "adapter" / "peftkit.json").read_text())["labels"]
    assert info["labels"] == labels and info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    config = json.loads((out / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(labels))] == labels

    # what a user does: the folder's tokenizer, onnxruntime, a batch of another size and length than traced
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["good", "the plot was dull and boring but the actor was superb and lovely", "a film", "weak"]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {i.name: batch[i.name] for i in session.get_inputs()})
    _, _, _, adapted, _ = load_trained(run, torch.device("cpu"))
    with torch.no_grad():
        want = adapted.float()(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    assert logits.shape == want.shape and np.abs(logits - want).max() < 1e-4

    again = peftkit_here("export", run, "--format", "onnx", "--out", out)
    assert again.returncode == 2 and "already exists; pass --overwrite (or --force)" in again.stderr
    fp16 = peftkit_here("export", run, "--format", "onnx", "--dtype", "fp16", "--out", tmp_path / "half")
    assert fp16.returncode == 2 and "fp32 only" in fp16.stderr and not (tmp_path / "half").exists()


def test_onnx_export_of_extractive_qa_gives_start_and_end_logits(tmp_path, tiny_bert):
    import onnxruntime
    from transformers import AutoTokenizer

    from peftkit.loading import load_trained

    from .test_qa import squad_document

    data = tmp_path / "squad.json"
    data.write_text(json.dumps(squad_document(30)))
    run = encoder_run(tmp_path, tiny_bert, "question_answering", data, None, max_length=48, doc_stride=16)
    out = tmp_path / "onnx"
    result = peftkit_here("export", run, "--format", "onnx", "--out", out)
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "peftkit.json").read_text())
    assert info["outputs"] == ["start_logits", "end_logits"]
    # peft's QA model drops token_type_ids, so the adapter trained with segment ids 0: so does the export
    assert info["inputs"] == ["input_ids", "attention_mask"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    pairs = (
        ["was the movie good", "who was dull"],
        ["the movie was good and lovely", "the actor was dull but the plot was fine"],
    )
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = tokenizer(*pairs, padding=True, return_tensors="np")
    start, end = session.run(["start_logits", "end_logits"], {i.name: batch[i.name] for i in session.get_inputs()})
    _, _, _, adapted, _ = load_trained(run, torch.device("cpu"))
    with torch.no_grad():
        want = adapted.float()(**tokenizer(*pairs, padding=True, return_tensors="pt"))
    assert np.abs(start - want.start_logits.numpy()).max() < 1e-4 and np.abs(end - want.end_logits.numpy()).max() < 1e-4


def test_gguf_refuses_a_classifier_and_export_an_unknown_format(tmp_path, tiny_bert, sentiment_csv):
    run = encoder_run(tmp_path, tiny_bert, "classification", sentiment_csv, {"text": "review", "label": "sentiment"})
    result = peftkit_here("export", run, "--format", "gguf", "--out", tmp_path / "x.gguf")
    assert result.returncode == 2 and "GGUF export is for causal-LM" in result.stderr
    result = peftkit_here("export", run, "--format", "tflite")
    assert result.returncode == 2 and "choose gguf or onnx" in result.stderr
