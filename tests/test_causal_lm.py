"""Causal LM: packing, response-only loss with and without a chat template, perplexity, and the CLI (chat data and
packing's isolation: test_chat.py)."""

import csv
import json
import math

import pytest
import torch

from peftkit.tasks import causal_lm

from .conftest import NEGATIVE, POSITIVE, make_llama, peftkit_here

# like real templates: the generation prompt ("[CLS] the", standing for "<|im_start|>assistant") is where the
# assistant's turn starts
CHAT = (
    "{% for m in messages %}[CLS] {% if m['role'] == 'assistant' %}the {% endif %}{{ m['content'] }} [SEP] "
    "{% endfor %}{% if add_generation_prompt %}[CLS] the {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama over the tiny BERT's word vocabulary, with a chat template."""
    return make_llama(tmp_path_factory.mktemp("models") / "tiny-llama", chat_template=CHAT)


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_packing_keeps_every_token_in_full_blocks(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    texts = ["the movie was good", "a dull plot", "the film is superb and moving"]
    config = causal_lm.Config(type="causal_lm", max_length=5, packing=True)
    out = causal_lm._texts({"text": texts}, tokenizer, config)
    plain = causal_lm._texts({"text": texts}, tokenizer, causal_lm.Config(type="causal_lm", max_length=64))
    flat = [t for seq in plain["input_ids"] for t in seq]
    assert [t for block in out["input_ids"] for t in block] == flat
    assert all(len(b) == 5 for b in out["input_ids"][:-1])
    for ids, labels, positions in zip(out["input_ids"], out["labels"], out["position_ids"]):
        # every token scored but a text's first in its block, which no token of the same text precedes
        assert labels == [-100 if p == 0 else t for t, p in zip(ids, positions)]
    # texts of 7, 6 and 9 tokens ([CLS] ... [SEP] and the end of sequence) in blocks of 5: positions restart at
    # each text and at each block
    assert [len(seq) for seq in plain["input_ids"]] == [7, 6, 9]
    assert out["position_ids"] == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2], [0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 1]]


@pytest.mark.parametrize("template", ["auto", "never"])
def test_response_only_loss_masks_the_prompt(tiny_llama, template):
    tokenizer = tokenizer_of(tiny_llama)
    config = causal_lm.Config(type="causal_lm", chat_template=template)
    out = causal_lm._pairs({"prompt": ["was the movie good"], "response": ["superb"]}, tokenizer, config)
    ids, labels = out["input_ids"][0], out["labels"][0]
    scored = [t for t, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(scored, skip_special_tokens=True).strip() == "superb"
    assert (
        ids[: labels.index(scored[0])]
        == causal_lm.prompt_and_full(tokenizer, "was the movie good", None, template == "auto")[0]
    )
    everything = causal_lm._pairs(
        {"prompt": ["was the movie good"], "response": ["superb"]},
        tokenizer,
        causal_lm.Config(type="causal_lm", chat_template=template, response_only_loss=False),
    )
    assert everything["labels"][0] == everything["input_ids"][0]


def test_perplexity_is_the_exponential_of_the_models_token_loss(tiny_llama):
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    encoded = causal_lm._texts(
        {"text": ["the movie was good and the plot was dull"]}, tokenizer, causal_lm.Config(type="causal_lm")
    )
    batch = causal_lm.collator(tokenizer)([{k: v[0] for k, v in encoded.items()}])
    with torch.no_grad():
        outputs = model(**batch)
    preds, _ = causal_lm.eval_outputs(outputs, batch)
    metrics = causal_lm.compute_metrics(preds.tolist(), None, None)
    assert metrics["loss"] == pytest.approx(outputs.loss.item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(outputs.loss.item()), rel=1e-5)


def test_lm_run_reports_perplexity_before_and_after_and_generates(tmp_path, tiny_llama):
    import yaml

    data = tmp_path / "pairs.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "answer"])
        for i in range(60):
            word = (POSITIVE + NEGATIVE)[i % 16]
            writer.writerow([f"was the movie {word}", "good" if word in POSITIVE else "bad"])
    recipe = {
        "model": {"name": str(tiny_llama)},
        "data": {"source": str(data), "columns": {"prompt": "instruction", "response": "answer"}},
        "task": {"type": "causal_lm", "max_length": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "train": {"batch_size": 8, "lr": 2e-2, "max_steps": 12},
        "eval": {"before_training": True, "generate": {"samples": 6, "max_new_tokens": 3}},
        "export": {"output_dir": str(tmp_path / "runs" / "{name}")},
    }
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(recipe))
    result = peftkit_here("run", tmp_path / "lm.yaml")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "lm"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "metric_for_best: perplexity" in (run_dir / "recipe.yaml").read_text()
    assert metrics["test"]["perplexity"] < metrics["before_training"]["test"]["perplexity"]
    for when in ("before_training", "after"):  # eval.generate: answers scored before training and after
        scores = metrics["generation"] if when == "after" else metrics["generation"][when]
        assert set(scores) >= {"validation", "test"}
        test = scores["test"]
        assert test["answers"] == 6 and len(test["examples"]) == 3
        assert all(0 <= test[k] <= 100 for k in ("exact_match", "f1", "rouge_l"))
    result = peftkit_here("predict", run_dir, "was the movie superb")
    assert result.returncode == 0, result.stderr
    assert "generated" in result.stdout
    sampled = [
        peftkit_here("predict", run_dir, "was the movie superb", "a dull", "--max-new-tokens", "3", *flags).stdout
        for flags in (["--temperature", "0.9", "--seed", "1"],) * 2
    ]
    assert sampled[0] == sampled[1] and "generated" in sampled[0]  # sampling, seeded: reproducible
    result = peftkit_here("predict", run_dir, "x", "--temperature", "0")
    assert result.returncode == 2 and "above 0" in result.stderr


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_causal_lm_never_sees_later_tokens(tiny_bert, tiny_llama, kind):
    """BERT's LM head model attends both ways unless its config says is_decoder (transformers only warns): trained
    as a causal LM it would copy the next token. Changing the last token must leave every earlier position's logits
    as they were, for an encoder loaded as a causal LM as for a decoder."""
    from transformers import AutoTokenizer

    folder = tiny_bert if kind == "bert" else tiny_llama
    model = causal_lm.load_model(str(folder), None, AutoTokenizer.from_pretrained(folder)).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    changed = ids.clone()
    changed[0, -1] = 9
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert torch.equal(before[:, :-1], after[:, :-1])
    assert not torch.equal(before[:, -1], after[:, -1])
