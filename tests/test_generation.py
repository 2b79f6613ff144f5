"""Generated answers: the scores (exact match, token F1, ROUGE-L), batched left-padded generation against one
prompt at a time, seeded sampling, and eval.generate's checks. The run with eval.generate end to end:
test_causal_lm.py."""

import pytest
import torch

from peftkit import generation
from peftkit.metrics.generation import rouge_l
from peftkit.sections import GenerateSection

from .conftest import peftkit_here
from .test_causal_lm import tiny_llama, tokenizer_of  # noqa: F401  (a fixture)


def test_scores_of_known_answers():
    assert rouge_l("The cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)  # LCS 5 of 6 and 6
    assert rouge_l("a b c d", "b d") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("Fresh!", "fresh") == 1.0
    scores = generation.score(["The cat sat on the mat", "Fresh.", ""], ["the cat is on the mat", "fresh", "rotten"])
    assert scores["answers"] == 3
    assert scores["exact_match"] == pytest.approx(100 / 3)  # "Fresh." = "fresh" after normalisation
    assert scores["f1"] == pytest.approx(100 * (0.75 + 1 + 0) / 3)  # articles dropped: 3 of 4 tokens shared
    assert scores["rouge_l"] == pytest.approx(100 * (5 / 6 + 1 + 0) / 3)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_llama):  # noqa: F811
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    prompts = [tokenizer(t)["input_ids"] for t in ("the movie", "a dull plot with superb acting", "good")]
    greedy = GenerateSection(max_new_tokens=5, batch_size=3)
    together = generation.generate(model, tokenizer, prompts, greedy)
    apart = [generation.generate(model, tokenizer, [p], greedy)[0] for p in prompts]
    assert together == apart and len(together) == 3 and any(together)
    state = torch.get_rng_state()
    sampled = GenerateSection(max_new_tokens=5, do_sample=True, temperature=1.5, seed=7)
    first = generation.generate(model, tokenizer, prompts, sampled)
    assert generation.generate(model, tokenizer, prompts, sampled) == first  # seeded
    assert torch.equal(torch.get_rng_state(), state)  # and the global generator left as it was
    assert not model.training


def test_eval_generate_needs_a_decoder_and_answers(tmp_path, recipe_file, tiny_llama):  # noqa: F811
    import yaml

    result = peftkit_here("validate", recipe_file(eval={"generate": {"samples": 4}}))
    assert result.returncode == 2 and "eval.generate" in result.stderr and "classification" in result.stderr
    data = tmp_path / "texts.csv"
    data.write_text("text\n" + "\n".join(f"the movie was good {i}" for i in range(40)) + "\n")
    recipe = {
        "model": {"name": str(tiny_llama)},
        "data": {"source": str(data)},
        "task": {"type": "causal_lm", "max_length": 16},
        "method": {"name": "lora", "r": 2, "alpha": 4},
        "train": {"max_steps": 1},
        "eval": {"generate": {"samples": 2}},
        "export": {"output_dir": str(tmp_path / "runs" / "{name}")},
    }
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(recipe))
    result = peftkit_here("run", tmp_path / "plain.yaml")
    assert result.returncode == 2 and "no answers to compare" in result.stderr
