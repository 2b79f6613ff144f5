"""Tiny random models and small generated data, built on the spot: the fast tests download nothing."""

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest

POSITIVE = "good great fine superb lovely brilliant charming moving".split()
NEGATIVE = "bad awful poor dull boring clumsy tedious weak".split()
FILLER = "the a movie film plot actor story scene was is and but".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer BERT, 32 wide unless told, with a word-level vocabulary of the words the test data uses."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + POSITIVE + NEGATIVE + FILLER) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(SPECIAL + POSITIVE + NEGATIVE + FILLER),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def make_llama(folder: Path, tie: bool = False, chat_template: str | None = None) -> Path:
    """A 2-layer Llama (grouped-query attention) over the tiny BERT's word vocabulary, [SEP] as its end of text;
    `tie`: input and output embeddings shared (as SmolLM2's); `chat_template`: saved with its tokenizer."""
    import torch
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + POSITIVE + NEGATIVE + FILLER) + "\n")
    tokenizer = BertTokenizerFast(str(vocab), eos_token="[SEP]", bos_token="[CLS]")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable two-class data: the label is carried by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", sentiment_rows(200))


def small_recipe(model: Path, data: Path, runs: Path) -> dict:
    """The recipe `recipe_file` writes, as a dict (for fixtures that outlive one test)."""
    return {
        "model": {"name": str(model)},
        "data": {"source": str(data), "columns": {"text": "review", "label": "sentiment"}, "labels": ["neg", "pos"]},
        "task": {"type": "classification", "max_length": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3},
        "export": {"output_dir": str(runs / "{name}")},
    }


@pytest.fixture
def recipe_file(tmp_path, tiny_bert, sentiment_csv):
    """Write a small recipe for the tiny model and data; keyword arguments replace whole sections."""

    def write(**sections) -> Path:
        import yaml

        recipe = small_recipe(tiny_bert, sentiment_csv, tmp_path / "runs")
        recipe.update(sections)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def peftkit(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would (`env`: its environment, e.g. HF_ENDPOINT; default: ours)."""
    return subprocess.run(
        [sys.executable, "-m", "peftkit", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def peftkit_here(*args) -> subprocess.CompletedProcess:
    """The command line run inside the test process: the same entry point, exit codes and output as `peftkit()`,
    without an interpreter start-up and library imports per call (~6 s). For tests that call it many times."""
    import contextlib
    import io

    from peftkit import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else int(done.code is not None)
    return subprocess.CompletedProcess(["peftkit", *map(str, args)], code, out.getvalue(), err.getvalue())
