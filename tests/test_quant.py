"""8-bit and 4-bit bases (bitsandbytes' CPU backend) on tiny models: quantised loading with the head kept in full
precision, training only the adapter, adapter round trip, merging onto a dequantised base with its report, the
methods that refuse a quantised base, and gradient checkpointing."""

import json

import pytest
import torch

from peftkit import quant
from peftkit.errors import UserError
from peftkit.methods import METHODS
from peftkit.methods import base as storage
from peftkit.recipe import QuantizationSection

from .conftest import peftkit
from .test_methods import OPTIONS, batch, context, outputs, tiny, train_steps

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random models saved to disk, as bitsandbytes quantises while loading."""
    folder = tmp_path_factory.mktemp("quant")

    def path(arch: str, task: str):
        out = folder / f"{arch}-{task}"
        if not out.exists():
            tiny(arch, task).save_pretrained(out)
        return out

    return path


def load(folder, task: str, bits: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "cls" else AutoModelForCausalLM
    kwargs = quant.load_kwargs(QuantizationSection(bits=bits), ["classifier", "score"], torch.device("cpu"))
    return quant.prepare(auto.from_pretrained(folder, dtype=torch.float32, **kwargs)).eval()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch, task", [("bert", "cls"), ("gpt2", "lm"), ("llama", "cls")])
def test_lora_trains_on_a_quantized_base_and_round_trips(saved, tmp_path, arch, task, bits):
    import bitsandbytes as bnb

    model = load(saved(arch, task), task, bits)
    layer = {8: bnb.nn.Linear8bitLt, 4: bnb.nn.Linear4bit}[bits]
    quantized = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, layer)}
    assert quantized, "nothing was quantised"
    head = getattr(model, "classifier", None) or getattr(model, "score", None) or model.lm_head
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # kept out of quantisation
    from transformers import AutoModel

    from peftkit import bench

    full = sum(p.numel() for p in AutoModel.from_pretrained(saved(arch, task)).parameters())
    heads = sum(p.numel() for p in head.parameters()) if head is not getattr(model, "lm_head", None) else 0
    assert bench.parameter_counts(model)["total_params"] == full + heads  # 4-bit weights count unpacked

    method = METHODS["lora"]
    model = method.apply(model, method.Config(name="lora", **OPTIONS["lora"]), context(model, task))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    inputs = batch(task)
    losses = train_steps(model, inputs, 8, method="lora")
    assert losses[-1] < losses[0]
    now = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight for n, m in model.named_modules()
           if isinstance(m, layer)}  # fmt: skip
    assert all(torch.equal(now[n], w) for n, w in quantized.items())  # the base did not move

    storage.save(model, tmp_path, method.Config(name="lora"), "tiny")
    reloaded = storage.load(load(saved(arch, task), task, bits), tmp_path, context(model, task)).eval()
    assert torch.allclose(outputs(reloaded, inputs), outputs(model, inputs), atol=1e-6)


@pytest.mark.parametrize(
    "method, options, bits, message",
    [
        ("full", {}, 8, "8/4-bit weights cannot be trained"),
        ("lora", {"init": "pissa"}, 4, "rewrites the base weights"),
        ("lora", {"init": "olora"}, 8, "rewrites the base weights"),
        ("lora", {"dora": True}, 8, "use quantization.bits: 4"),
        ("loha", {}, 4, "4-bit layers store packed"),
        ("lokr", {}, 4, "4-bit layers store packed"),
    ],
)
def test_methods_that_cannot_train_on_a_quantized_base_say_why(saved, method, options, bits, message):
    model = load(saved("llama", "cls"), "cls", bits)
    config = METHODS[method].Config(name=method, **{**OPTIONS[method], **options})
    with pytest.raises(UserError, match=message):
        METHODS[method].apply(model, config, context(model, "cls"))


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'peftkit\[quant\]'"):
        quant.load_kwargs(QuantizationSection(bits=4), [], torch.device("cpu"))


def test_compute_dtype_auto_follows_the_runs_precision():
    def dtype(precision, choice="auto"):
        config = QuantizationSection(bits=4, compute_dtype=choice)
        return quant.load_kwargs(config, [], torch.device("cpu"), precision)["quantization_config"].bnb_4bit_compute_dtype

    assert dtype("fp32") == dtype("no") == torch.float32  # no native bf16: emulated bf16 would be ~400x slower
    assert dtype("bf16") == torch.bfloat16 and dtype("fp16") == torch.float16
    assert dtype("fp32", "bf16") == torch.bfloat16  # an explicit choice wins


@pytest.mark.parametrize("method", ["lora", "prefix_tuning", "bottleneck"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    def gradients(checkpointing: bool):
        model = tiny("llama", "lm")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = METHODS[method].apply(model, METHODS[method].Config(name=method, **OPTIONS[method]),
                                      context(model, "lm"))  # fmt: skip
        model.train()
        model(**batch("lm")).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and all(g is not None for g in checkpointed.values())
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


@pytest.fixture(scope="module")
def quantized_runs(tmp_path_factory, tiny_bert, sentiment_csv):
    """Finished 8-bit and 4-bit LoRA runs (in-process: the command line is tested on the merge below)."""
    import yaml

    from peftkit.recipe import load_recipe
    from peftkit.run import run

    folder = tmp_path_factory.mktemp("qruns")
    runs = {}
    for bits in (8, 4):
        recipe = {
            "model": {"name": str(tiny_bert)},
            "data": {"source": str(sentiment_csv), "columns": {"text": "review", "label": "sentiment"}},
            "task": {"type": "classification", "max_length": 32},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value", "dense"]},
            "quantization": {"bits": bits},
            "train": {"batch_size": 16, "lr": 1e-2, "max_steps": 6, "gradient_checkpointing": True},
            "export": {"output_dir": str(folder / "runs" / "{name}")},
        }
        path = folder / f"q{bits}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        runs[bits] = run(load_recipe(path))
        assert json.loads((runs[bits] / "metrics.json").read_text())["train"]["steps"] == 6
    return runs


@pytest.mark.parametrize("bits, vs_trained", [(4, 1e-5), (8, 1e-2)])
def test_merge_onto_a_quantized_base_saves_full_precision_and_reports(quantized_runs, tmp_path, bits, vs_trained):
    """Tolerances for tiny random models (the real numbers are in benchmarks/RESULTS.md): 4-bit computes with
    the dequantised weights, so the merged model equals what was trained up to float rounding; 8-bit also
    quantises activations, so it differs a little more."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.export import merge

    report = merge(quantized_runs[bits], tmp_path / "merged")
    assert report["max_abs_diff"] <= 1e-5
    assert report["vs_quantized_base"] <= vs_trained
    assert report["vs_full_precision_base"] > 0  # quantisation changed the base: the report is not vacuous
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.float32


def test_merge_requantizes_only_when_asked(quantized_runs, tmp_path):
    result = peftkit("merge", quantized_runs[8], tmp_path / "requantized", "--requantize")
    assert result.returncode == 0, result.stderr
    assert "vs the quantised base + adapter" in result.stdout.replace("\n", " ")
    assert "re-quantised: max abs logit difference" in result.stdout
    config = json.loads((tmp_path / "requantized" / "config.json").read_text())
    assert config["quantization_config"]["load_in_8bit"] is True


def test_merge_restores_gpt2_conv1d_layers(saved, tmp_path):
    """bitsandbytes turns GPT-2's Conv1D layers into Linear ones (transposed weight); the dequantised base gets
    Conv1D back, so the merged model is a normal GPT-2 checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = quant.dequantize(load(saved("gpt2", "lm"), "lm", 8))
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    inputs = batch("lm")
    assert torch.allclose(outputs(reloaded, inputs), outputs(model, inputs), atol=1e-6)
    original = outputs(tiny("gpt2", "lm"), inputs)
    assert (outputs(reloaded, inputs) - original).abs().max() < 0.05 * original.abs().max()  # same model, 8-bit error
