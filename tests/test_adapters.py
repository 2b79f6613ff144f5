"""Several adapters on one base (peftkit/multi_adapter.py): predict with each without reloading the base, and combine
LoRA runs with peft's add_weighted_adapter into a new run folder. Tiny BERT runs trained on the spot."""

import json
import shutil

import pytest
import yaml

from .conftest import peftkit_here

TEXTS = ["a lovely film", "the plot was dull", "good movie but boring actor"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, sentiment_csv):
    """a, b: LoRA r=4, two seeds; renamed: LoRA r=8 whose labels are called bad/good; rslora: rsLoRA r=4; prefix:
    prefix tuning; ia3: IA3. All on the same tiny base and data."""
    folder = tmp_path_factory.mktemp("adapters")
    base = {
        "model": {"name": str(tiny_bert)},
        "data": {
            "source": str(sentiment_csv),
            "columns": {"text": "review", "label": "sentiment"},
            "labels": ["neg", "pos"],
        },
        "task": {"type": "classification", "max_length": 32},
        "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "lr": 2e-2},
        "eval": {"splits": ["validation"]},
        "export": {"output_dir": str(folder / "runs" / "{name}")},
    }
    variants = {
        "a": {"method": {"name": "lora", "r": 4, "alpha": 8}, "seed": 1},
        "b": {"method": {"name": "lora", "r": 4, "alpha": 8}, "seed": 2},
        "renamed": {"method": {"name": "lora", "r": 8, "alpha": 8}, "seed": 3, "labels": {"neg": "bad", "pos": "good"}},
        "rslora": {"method": {"name": "lora", "r": 4, "alpha": 8, "rslora": True}, "seed": 4},
        "prefix": {"method": {"name": "prefix_tuning", "num_virtual_tokens": 2}, "seed": 1},
        "ia3": {"method": {"name": "ia3"}, "seed": 1},
    }
    made = {}
    for name, v in variants.items():
        recipe = {
            **base,
            "name": name,
            "method": v["method"],
            "train": {**base["train"], "seed": v["seed"]},
            "data": {**base["data"], "labels": v.get("labels", base["data"]["labels"])},
        }
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = peftkit_here("run", path)
        assert result.returncode == 0, result.stderr
        made[name] = folder / "runs" / name
    return made


def _alone(run_dir):
    """What `peftkit predict RUN` computes: the run's own base and adapter."""
    from peftkit.loading import load_trained

    recipe, task, tokenizer, model, _ = load_trained(run_dir)
    return task.predict(model, tokenizer, TEXTS, recipe.task)


def test_several_adapters_predict_as_each_run_alone(runs):
    from peftkit import multi_adapter

    loaded = multi_adapter.load([runs["a"], runs["b"], runs["renamed"]])
    rows = multi_adapter.predict(loaded, TEXTS)
    for name in ("a", "b", "renamed"):
        alone = _alone(runs[name])
        assert [r[f"{name} label"] for r in rows] == [r["label"] for r in alone]
        assert [r[f"{name} probability"] for r in rows] == [r["probability"] for r in alone]  # exactly
    assert {r["renamed label"] for r in rows} <= {"bad", "good"} and {r["a label"] for r in rows} <= {"neg", "pos"}
    assert [r["a probability"] for r in rows] != [r["b probability"] for r in rows]  # the switch did something


def test_the_base_is_loaded_once_and_switching_switches_the_head(runs, monkeypatch):
    import torch
    import transformers
    from peft.utils.other import ModulesToSaveWrapper
    from safetensors.torch import load_file

    from peftkit import multi_adapter

    auto = transformers.AutoModelForSequenceClassification
    original, calls = auto.from_pretrained, []
    monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: calls.append(a) or original(*a, **k))
    loaded = multi_adapter.load([runs["a"], runs["b"]])
    assert len(calls) == 1  # one base for both adapters

    head = loaded.model.base_model.model.classifier
    assert isinstance(head, ModulesToSaveWrapper)
    hidden = torch.randn(3, head.original_module.in_features)
    for source in loaded.sources:
        saved = load_file(source.adapter_dir / "adapter_model.safetensors")
        weight, bias = saved["base_model.model.classifier.weight"], saved["base_model.model.classifier.bias"]
        multi_adapter.use(loaded, source)
        with torch.no_grad():
            assert torch.allclose(head(hidden), hidden @ weight.T + bias, atol=1e-6), source.name
    a, b = (load_file(runs[n] / "adapter" / "adapter_model.safetensors") for n in ("a", "b"))
    assert not torch.equal(a["base_model.model.classifier.weight"], b["base_model.model.classifier.weight"])


def test_predict_command_with_adapters(runs):
    result = peftkit_here("predict", runs["a"], "--adapter", runs["renamed"], *TEXTS)
    assert result.returncode == 0, result.stderr
    header = result.stdout.split("┡")[0]  # the table's header cells (rich wraps them to the terminal's width)
    assert header.count("label") == 2 and header.count("probability") == 2 and "renamed" in header
    assert "good" in result.stdout or "bad" in result.stdout  # the second run's own label names


@pytest.mark.parametrize("first", ["a", "rslora"])  # rsLoRA: peft's combination would be sqrt(r) too large
def test_combine_with_weights_1_0_reproduces_the_first_run(runs, tmp_path, first):
    out = tmp_path / "first-only"
    result = peftkit_here("combine", runs[first], runs["b"], "--weights", "1,0", "--how", "linear", "--out", out)
    assert result.returncode == 0, result.stderr
    combined, alone = _alone(out), _alone(runs[first])
    assert [r["label"] for r in combined] == [r["label"] for r in alone]
    assert [r["probability"] for r in combined] == pytest.approx([r["probability"] for r in alone], abs=1e-5)


def test_combined_run_is_a_run_for_eval_merge_and_predict(runs, tmp_path):
    out = tmp_path / "half"
    result = peftkit_here("combine", runs["a"], runs["b"], "--weights", "0.5,0.5", "--how", "cat", "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "combine.json", "metrics.json", "recipe.yaml"]
    assert not out.with_name("half.partial").exists()
    record = json.loads((out / "combine.json").read_text())
    assert record["how"] == "cat" and record["weights"] == [0.5, 0.5] and record["rank"] == 8
    assert [s["run"] for s in record["sources"]] == [str(runs["a"]), str(runs["b"])]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]

    evaluated = peftkit_here("eval", out, "--split", "validation")
    assert evaluated.returncode == 0, evaluated.stderr
    scored = json.loads((out / "metrics.json").read_text())  # combine scored it as eval does
    assert f"{scored['validation']['accuracy']:.4f}" in evaluated.stdout and scored["validation"]["rows"] == 20
    assert "half" in result.stdout  # the combined row in the table, next to its sources
    pushed = peftkit_here("push", out, "--repo", "me/half", "--dry-run")  # it has results for a model card
    assert pushed.returncode == 0, pushed.stderr
    assert "a combination of adapters has no training" in pushed.stderr
    merged = peftkit_here("merge", out, tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr
    both = peftkit_here("predict", out, "--adapter", runs["a"], TEXTS[0])  # a combined run shares a base too
    assert both.returncode == 0, both.stderr


def test_combined_head_is_the_weighted_average(runs, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "mix"
    result = peftkit_here("combine", runs["a"], runs["b"], "--weights", "3,1", "--how", "svd", "--out", out)
    assert result.returncode == 0, result.stderr
    key = "base_model.model.classifier.weight"
    a, b, mix = (load_file(d / "adapter" / "adapter_model.safetensors")[key] for d in (runs["a"], runs["b"], out))
    assert torch.allclose(mix, 0.75 * a + 0.25 * b, atol=1e-6)


def _edited_copy(run, tmp_path, change):
    """A copy of a finished run whose recipe says something else (base model, quantization)."""
    copy = tmp_path / f"{run.name}-edited"
    shutil.copytree(run, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    change(recipe)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return copy


def test_runs_that_cannot_share_a_base_are_refused(runs, tmp_path):
    other_base = _edited_copy(runs["b"], tmp_path, lambda r: r["model"].update(name=str(tmp_path / "other-bert")))
    eight_bit = _edited_copy(runs["b"], tmp_path / "q", lambda r: r.update(quantization={"bits": 8}))
    cases = [
        (("predict", runs["a"], "--adapter", other_base, "x"), ["differ in base model", "other-bert"]),
        (("predict", runs["a"], "--adapter", eight_bit, "x"), ["differ in quantization", "bits 8"]),
        (("predict", runs["a"], "--adapter", runs["prefix"], "x"), ["prefix_tuning", "peftkit's own format"]),
        (("predict", runs["a"], "--adapter", runs["ia3"], "x"), ["different peft methods", "(ia3)"]),
        (("predict", runs["a"], "--adapter", runs["a"], "x"), ["given twice"]),
        (("combine", runs["a"], runs["ia3"], "--weights", "1,1", "--how", "cat"), ["is ia3", "LoRA adapters only"]),
        (
            ("combine", runs["a"], runs["renamed"], "--weights", "1,1", "--how", "linear"),
            ["ranks must be equal", "r=8"],
        ),
        (("combine", runs["a"], runs["renamed"], "--weights", "1,1", "--how", "cat"), ["different labels", "'bad'"]),
        (("combine", runs["a"], runs["b"], "--weights", "1,-1", "--how", "cat"), ["non-negative", "head"]),
        (("combine", runs["a"], runs["b"], "--weights", "1", "--how", "cat"), ["1 weight(s) for 2 runs"]),
        (("combine", runs["a"], runs["b"], "--weights", "1,x", "--how", "cat"), ["'x' is not a number"]),
        (("combine", runs["a"], runs["b"], "--weights", "1,1", "--how", "ties"), ["give --density"]),
        (("combine", runs["a"], runs["b"], "--weights", "1,1", "--how", "ties", "--density", "1.5"), ["in (0, 1]"]),
        (("combine", runs["a"], runs["b"], "--weights", "1,1", "--how", "dare_ties", "--density", "0"), ["in (0, 1]"]),
        (
            ("combine", runs["a"], runs["b"], "--weights", "1,1", "--how", "linear", "--density", "0.5"),
            ["leave --density out"],
        ),
        (("combine", runs["a"], runs["b"], "--weights", "1,1", "--how", "cat", "--svd-rank", "2"), ["--svd-rank"]),
        (("combine", runs["a"], runs["b"], "--weights", "1,1", "--how", "liner"), ["did you mean 'linear'"]),
        (("combine", runs["a"], "--weights", "1", "--how", "cat"), ["at least two runs"]),
        (("combine", runs["a"], runs["b"], "--weights", "1,1", "--how", "cat", "--out", runs["b"]), ["already exists"]),
    ]
    for args, expected in cases:
        result = peftkit_here(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        for text in expected:
            assert text in result.stderr, (args, result.stderr)
    assert not list(tmp_path.glob("*.partial")) and not list(runs["a"].parent.glob("*+*"))  # nothing written
