"""Token classification: CoNLL reading, tag alignment, entity decoding and scoring, and a run through the CLI."""

import bz2
import json
import random

import pytest

from peftkit.errors import UserError
from peftkit.recipe import DataSection
from peftkit.tasks import token_classification as ner

from .conftest import FILLER, NEGATIVE, POSITIVE, peftkit_here


def ner_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Sentences of the tiny BERT's words; sentiment words are entities (B-pos/I-pos, B-neg), the rest O."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 7)):
            kind = rng.choice(["O", "O", "pos", "neg"])
            if kind == "O":
                tokens.append(rng.choice(FILLER)), tags.append("O")
            else:
                words = POSITIVE if kind == "pos" else NEGATIVE
                span = rng.randint(1, 2)
                tokens += rng.sample(words, span)
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (span - 1)
        sentences.append((tokens, tags))
    return sentences


def write_conll(path, sentences, separator="\t", extra_column=False):
    lines = ["-DOCSTART-\tO", ""]
    for tokens, tags in sentences:
        for token, tag in zip(tokens, tags):
            lines.append(separator.join([token, "X", tag] if extra_column else [token, tag]))
        lines.append("\t")  # a tab-only line also ends a sentence (seen in the real WNUT file)
    text = "\n".join(lines) + "\n"
    if path.suffix == ".bz2":
        path.write_bytes(bz2.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def load(path, task=ner, **data):
    from peftkit import data as data_module

    return data_module.load(DataSection(source=str(path), **data), task)


@pytest.mark.parametrize(
    "name,separator,extra", [("a.conll", "\t", False), ("b.txt", " ", True), ("c.conll.bz2", "\t", False)]
)
def test_conll_files_are_read_as_sentences(tmp_path, name, separator, extra):
    sentences = ner_sentences(40)
    path = write_conll(tmp_path / name, sentences, separator, extra)
    splits, labels = load(path, format="conll", splits={"train": 0.8, "validation": 0.1, "test": 0.1})
    assert labels[0] == "O" and set(labels) == {tag for _, tags in sentences for tag in tags}  # "O" gets id 0
    assert sum(len(s) for s in splits.values()) == 40
    row = splits["train"][0]
    original = sentences[row["source_row"] - 1]
    assert row["tokens"] == original[0] and [labels[t] for t in row["tags"]] == original[1]


def test_bad_tags_are_reported_with_their_sentence(tmp_path):
    sentences = ner_sentences(20)
    sentences[4] = (sentences[4][0], ["B-person"] + sentences[4][1][1:])
    path = write_conll(tmp_path / "bad.conll", sentences)
    with pytest.raises(
        UserError, match=r"1 sentence\(s\) have tags not in data.labels: 'B-person' \(1\) \(source rows 5\)"
    ):
        load(path, labels=["O", "B-pos", "I-pos", "B-neg", "I-neg"])
    splits, _ = load(path, labels=["O", "B-pos", "I-pos", "B-neg", "I-neg"], unknown_labels="drop")
    assert sum(len(s) for s in splits.values()) == 19


def test_token_and_tag_counts_must_agree(tmp_path):
    rows = [{"tokens": t, "tags": g} for t, g in ner_sentences(10)]
    rows[3]["tags"] = rows[3]["tags"][:-1]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match="source sentence 4"):
        load(path)


def test_first_subword_carries_the_tag(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, List
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "new", "york", "##er", "is", "big"]))
    tokenizer = BertTokenizerFast(str(vocab))
    names = ["O", "B-loc", "I-loc"]
    data = Dataset.from_list([{"tokens": ["new", "yorker", "is", "big"], "tags": [1, 2, 0, 0]}])
    data = DatasetDict({"train": data.cast_column("tags", List(ClassLabel(names=names)))})
    first = ner.preprocess(data, tokenizer, ner.Config(type="token_classification"))["train"][0]
    # [CLS] new york ##er is big [SEP]
    assert first["labels"] == [-100, 1, 2, -100, 0, 0, -100]
    every = ner.preprocess(data, tokenizer, ner.Config(type="token_classification", label_all_subwords=True))
    assert every["train"][0]["labels"] == [-100, 1, 2, 2, 0, 0, -100]


def test_entities_and_entity_level_scores():
    words = "I saw the Empire State Building in New York".split()
    tags = ["O", "O", "O", "B-facility", "I-facility", "I-facility", "O", "B-geo", "I-geo"]
    assert [(e["text"], e["type"]) for e in ner.entities(words, tags)] == [
        ("Empire State Building", "facility"),
        ("New York", "geo"),
    ]
    labels = ["O", "B-geo", "I-geo", "B-facility", "I-facility"]
    ref = [[0, 1, 2, 0, 3, -100]]
    pred = [[0, 1, 0, 0, 3, 4]]  # "New" alone is a wrong span; the facility is right; the last position is unscored
    scores = ner.compute_metrics(pred, ref, labels)
    assert scores["precision"] == pytest.approx(1 / 2) and scores["recall"] == pytest.approx(1 / 2)
    assert scores["per_type"]["facility"]["f1"] == 1.0 and scores["per_type"]["geo"]["f1"] == 0.0


def test_ner_run_eval_predict_through_the_cli(tmp_path, tiny_bert):
    import yaml

    path = write_conll(tmp_path / "ner.conll", ner_sentences(120))
    recipe = {
        "model": {"name": str(tiny_bert)},
        "data": {"source": str(path)},
        "task": {"type": "token_classification", "max_length": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"batch_size": 16, "lr": 1e-2, "max_steps": 4},
        "export": {"output_dir": str(tmp_path / "runs" / "{name}")},
    }
    (tmp_path / "ner.yaml").write_text(yaml.safe_dump(recipe))
    result = peftkit_here("run", tmp_path / "ner.yaml")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "ner"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"f1", "precision", "recall", "per_type"} <= set(metrics["test"])
    assert "metric_for_best: f1" in (run_dir / "recipe.yaml").read_text()
    result = peftkit_here("eval", run_dir, "--split", "test")
    assert result.returncode == 0 and f"{metrics['test']['f1']:.4f}" in result.stdout
    result = peftkit_here("predict", run_dir, "the movie was good and lovely")
    assert result.returncode == 0, result.stderr
    assert "entities" in result.stdout
