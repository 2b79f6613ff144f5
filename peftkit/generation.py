"""Generated answers and their scores, for causal LM with answers (prompt/response pairs, chat data):
`eval.generate` (before training and with the kept adapter) and `peftkit predict`.

    prompts (token ids, from tasks/causal_lm.answer_prompts) -> generate: batches, left-padded -> answers
    answers + references -> score: exact match, token F1 (SQuAD's normalisation), ROUGE-L (metrics/generation.py)

Left padding: a decoder continues from the last position of each row, so shorter prompts are padded on the
left, and the attention mask keeps the padding out (transformers' generate derives the positions from it).
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from peftkit.sections import GenerateSection

log = logging.getLogger("peftkit")
_METRIC = Path(__file__).resolve().parent / "metrics" / "generation.py"


def generate(
    model: "PreTrainedModel | PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: list[list[int]],
    options: "GenerateSection",
) -> list[str]:
    """The model's answer to each prompt (its new tokens, decoded without special tokens), `options.batch_size`
    prompts at a time. Sampling draws from a generator seeded with `options.seed` (torch's global state is
    left as it was), so the same options give the same answers."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(options.seed)
        for start in range(0, len(prompts), options.batch_size):
            batch = prompts[start : start + options.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            sampling = {"temperature": options.temperature, "top_p": options.top_p} if options.do_sample else {}
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=options.max_new_tokens,
                do_sample=options.do_sample,
                pad_token_id=pad,
                **sampling,
            )
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return [answer.strip() for answer in answers]


def score(answers: list[str], references: list[str]) -> dict:
    """Exact match, token F1 and ROUGE-L of the answers (in percent, means over the answers)."""
    import evaluate

    scores = evaluate.load(str(_METRIC)).compute(predictions=answers, references=references)
    return {**scores, "answers": len(answers)}
