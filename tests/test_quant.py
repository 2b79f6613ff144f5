"""8-bit and 4-bit bases (bitsandbytes' CPU backend) on tiny models: quantised loading with the head kept in full
precision, training only the adapter, adapter round trip, merging onto a dequantised base with its report, the
methods that refuse a quantised base, and gradient checkpointing."""

import json
import os

import pytest
import torch

from peftkit import quant
from peftkit.errors import UserError
from peftkit.methods import METHODS, base, storage
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

    from peftkit import measure

    full = sum(p.numel() for p in AutoModel.from_pretrained(saved(arch, task)).parameters())
    heads = sum(p.numel() for p in head.parameters()) if head is not getattr(model, "lm_head", None) else 0
    assert measure.parameter_counts(model)["total_params"] == full + heads  # 4-bit weights count unpacked

    method = METHODS["lora"]
    model = method.apply(model, method.Config(name="lora", **OPTIONS["lora"]), context(model, task))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    inputs = batch(task)
    losses = train_steps(model, inputs, 8, method="lora")
    assert losses[-1] < losses[0]
    now = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight
        for n, m in model.named_modules()
        if isinstance(m, layer)
    }
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
        return quant.load_kwargs(config, [], torch.device("cpu"), precision)[
            "quantization_config"
        ].bnb_4bit_compute_dtype

    assert dtype("fp32") == dtype("no") == torch.float32  # no native bf16: emulated bf16 would be ~400x slower
    assert dtype("bf16") == torch.bfloat16 and dtype("fp16") == torch.float16
    assert dtype("fp32", "bf16") == torch.bfloat16  # an explicit choice wins


@pytest.mark.parametrize("method", ["lora", "prefix_tuning", "bottleneck"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    def gradients(checkpointing: bool):
        model = tiny("llama", "lm")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = METHODS[method].apply(
            model, METHODS[method].Config(name=method, **OPTIONS[method]), context(model, "lm")
        )
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
        runs[bits] = run(load_recipe(path)).output
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


# --- bitsandbytes' repacked 4-bit CPU layout (quant.cpu_layout) ---------------------------------------------------
# On a CPU with AVX512-BF16 bitsandbytes repacks a 4-bit layer in place at its first forward in eval mode without
# grad. PEFTKIT_CPU_BF16=native turns that on anywhere (with a plain-torch kernel where the CPU lacks the
# instructions), so these tests take the bf16-native machines' path on every machine. The layers must be at least
# 64 wide (bitsandbytes' block): hence a 64-wide BERT.


@pytest.fixture
def bf16_native(monkeypatch):
    from peftkit import cpu_kind

    monkeypatch.setenv(cpu_kind.ENV, "native")


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory):
    from .conftest import make_bert

    return make_bert(tmp_path_factory.mktemp("wide") / "bert-64", hidden=64)


def load_4bit(folder, inference: bool):
    from transformers import AutoModelForSequenceClassification

    kwargs = quant.load_kwargs(QuantizationSection(bits=4), ["classifier"], torch.device("cpu"))
    torch.manual_seed(0)  # the same fresh head every time
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32, num_labels=2, **kwargs)
    return quant.prepare(model, inference)


def four_bit_layers(model) -> dict:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def evaluation_pass(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def bert_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (4, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}


def test_training_after_an_evaluation_pass_reaches_every_adapter_layer(bf16_native, wide_bert):
    """The bug this layout rule fixes: bitsandbytes' repacked kernel has no backward, so after one evaluation pass
    every LoRA gradient was None (autograd only warned) and training learned nothing but the head."""
    lora = METHODS["lora"]
    context = base.Context(head_modules=["classifier"], peft_task_type="SEQ_CLS", total_steps=10)
    model = lora.apply(load_4bit(wide_bert, inference=False), lora.Config(name="lora", r=4, dropout=0.0), context)
    evaluation_pass(model, bert_batch())
    assert not any(quant.is_repacked(m) for m in four_bit_layers(model).values())
    model.train()
    model(**bert_batch()).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # (A's is 0 while B is 0, at init)

    inference = load_4bit(wide_bert, inference=True)  # ... while inference takes the repacked layout
    evaluation_pass(inference, bert_batch())
    assert all(quant.is_repacked(m) for m in four_bit_layers(inference).values())


def test_the_repacked_layout_computes_and_reads_back_as_the_same_weights(bf16_native, wide_bert):
    from bitsandbytes.functional import dequantize_4bit

    from peftkit import measure

    model = load_4bit(wide_bert, inference=True)
    layers = four_bit_layers(model)
    weights = {n: dequantize_4bit(m.weight.data, m.weight.quant_state).float() for n, m in layers.items()}
    counts = measure.parameter_counts(model)
    training_layout = evaluation_pass(load_4bit(wide_bert, inference=False), bert_batch())
    repacked = evaluation_pass(model, bert_batch())  # repacks every layer, then multiplies in bf16
    assert all(quant.is_repacked(m) for m in layers.values())
    assert (repacked - training_layout).abs().max() <= 0.05 * training_layout.abs().max()  # bf16 vs fp32 compute
    for name, layer in layers.items():  # the scales were rounded to bf16: 2^-8 relative at most
        read = quant.repacked_weight(layer.weight.data, layer.weight.quant_state)
        assert (read - weights[name]).abs().max() <= 2**-8 * weights[name].abs().max()
    assert measure.parameter_counts(model) == counts
    dense = quant.dequantize(model)  # what merge does with a quantised base
    for name, w in weights.items():  # every layer: 64- and 128-wide inputs (one and two scale blocks per row)
        linear = dense.get_submodule(name)
        assert type(linear) is torch.nn.Linear
        assert (linear.weight - w).abs().max() <= 2**-8 * w.abs().max()


def test_layers_narrower_than_a_block_keep_their_layout(bf16_native, tiny_bert):
    """bitsandbytes' repack fails on them ("shape '[32, 0]' is invalid"): the 32-wide BERT's layers that read 32
    features stay as they are, its 64-wide ones are repacked, and the evaluation pass runs."""
    model = load_4bit(tiny_bert, inference=True)
    evaluation_pass(model, bert_batch())
    layers = four_bit_layers(model).values()
    assert {quant.is_repacked(m) for m in layers if m.in_features == 32} == {False}
    assert {quant.is_repacked(m) for m in layers if m.in_features == 64} == {True}


def test_reference_kernel_matches_bitsandbytes_own(wide_bert):
    """quant.reference_gemv_4bit stands in for bitsandbytes' C kernel where the CPU lacks AVX512-BF16."""
    import bitsandbytes as bnb

    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes has no kernel of its own to compare with")
    layer = next(iter(four_bit_layers(load_4bit(wide_bert, inference=False)).values()))
    layer.weight.data, state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(0))
    args = (x, layer.weight.data, state.shape, state.absmax, state.code, state.blocksize)
    theirs = torch.ops.bitsandbytes.gemv_4bit.default(*args).float()
    ours = quant.reference_gemv_4bit(*args).float()
    assert (ours - theirs).abs().max() <= 1e-2 * theirs.abs().max()


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, wide_bert, sentiment_csv):
    """A finished 4-bit LoRA run on the bf16-native path: evaluated before training and after each of 2 epochs."""
    import yaml

    from peftkit import cpu_kind

    from .conftest import small_recipe

    folder = tmp_path_factory.mktemp("wide-run")
    recipe = small_recipe(wide_bert, sentiment_csv, folder)
    recipe.update(quantization={"bits": 4}, eval={"before_training": True})
    recipe["train"].update(epochs=2, lr=1e-2)
    (folder / "wide.yaml").write_text(yaml.safe_dump(recipe))
    # a process of its own: accelerate's precision (auto: bf16 on this path) is set once per process
    result = peftkit("run", folder / "wide.yaml", env={**os.environ, cpu_kind.ENV: "native"})
    assert result.returncode == 0, result.stderr
    return folder / "wide"  # small_recipe: export.output_dir is FOLDER/{name}


def test_a_4bit_run_trains_its_adapter_through_its_evaluations(wide_run):
    from safetensors.torch import load_file

    saved = load_file(wide_run / "adapter" / "adapter_model.safetensors")
    b = {n: t for n, t in saved.items() if "lora_B" in n}
    assert b and all(t.abs().sum() > 0 for t in b.values())  # lora_B starts at zero: each one trained
    assert json.loads((wide_run / "metrics.json").read_text())["precision"] == "bf16"  # auto, on this path


def test_merge_predict_and_eval_of_a_4bit_run_on_the_bf16_native_path(bf16_native, wide_run, tmp_path):
    from peftkit import multi_adapter
    from peftkit.export import merge
    from peftkit.loading import load_trained
    from peftkit.tasks import classification

    report = merge(wide_run, tmp_path / "merged")
    assert report["max_abs_diff"] <= 1e-5 and report["vs_quantized_base"] <= 1e-5  # computed as it was trained
    assert report["vs_full_precision_base"] > 0

    recipe, _, tokenizer, model, _ = load_trained(wide_run)  # inference: repacked at its first forward
    texts = ["a great film", "a dull and boring plot"]
    alone = classification.predict(model, tokenizer, texts, recipe.task)
    assert any(quant.is_repacked(m) for m in four_bit_layers(model).values())
    import shutil

    twin = shutil.copytree(wide_run, tmp_path / "twin")
    loaded = multi_adapter.load([str(wide_run), str(twin)])  # one base, two adapters (the same weights under two names)
    rows = multi_adapter.predict(loaded, texts)
    for name in (wide_run.name, "twin"):
        assert [r[f"{name} label"] for r in rows] == [r["label"] for r in alone]
    assert any(quant.is_repacked(m) for m in four_bit_layers(loaded.model).values())
    from peftkit import cpu_kind

    evaluated = peftkit("eval", wide_run, env={**os.environ, cpu_kind.ENV: "native"})  # its own accelerate precision
    assert evaluated.returncode == 0, evaluated.stderr
