"""Causal language modelling (text generation): domain adaptation on plain text, or instruction tuning on
prompt/response pairs.

- plain text (`text` column): each text is one sequence, or with `packing` all texts are joined (separated by
  the end-of-sequence token) and cut into blocks of `max_length`, so no step is spent on padding;
- prompt/response (`prompt` and `response` columns): formatted with the tokenizer's chat template when it has
  one (as the model saw in its instruction tuning), else as "prompt\\nresponse"; with `response_only_loss` the
  prompt's tokens are masked out of the loss, so the model learns to answer, not to ask.
Scored by the mean token loss and its exponential, perplexity (lower is better). `peftkit predict` generates.
"""

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from peftkit.errors import UserError
from peftkit.sections import Section
from peftkit.tasks.common import LabelKind

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from peft import PeftModel
    from transformers import BatchEncoding, DataCollatorForSeq2Seq, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.utils import ModelOutput

COLUMNS = {"text": False, "prompt": False, "response": False}  # text, or prompt + response (checked below)
TEXT_ROLES = ("text", "prompt", "response")
LABEL_ROLE = None
LABELS_PER_TOKEN = False
SPLIT_BY = None
METRICS = ("perplexity", "loss")
PEFT_TASK_TYPE = "CAUSAL_LM"
AUTO_CLASS = "AutoModelForCausalLM"  # the transformers class with this task's head
PIPELINE_TAG = "text-generation"  # the Hub's name for the task
HEAD_MODULES = ()  # the language-model head is the (often tied) embedding: it stays frozen
IGNORE = -100


class Config(Section):
    type: Literal["causal_lm"]
    max_length: int = Field(256, gt=1, description="Tokens per sequence (longer texts are truncated).")
    packing: bool = Field(False, description="Plain text: join all texts and cut them into max_length blocks.")
    response_only_loss: bool = Field(True, description="Prompt/response data: train on the response tokens only.")
    chat_template: Literal["auto", "never"] = Field(
        "auto", description="Prompt/response data: use the tokenizer's chat template when it has one (auto)."
    )
    max_new_tokens: int = Field(64, gt=0, description="`peftkit predict`: tokens to generate per prompt.")


def load_model(
    path: str, labels: list[str] | None, tokenizer: "PreTrainedTokenizerBase", **kwargs: Any
) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def preprocess(splits: "DatasetDict", tokenizer: "PreTrainedTokenizerBase", config: Config) -> "DatasetDict":
    columns = next(iter(splits.values())).column_names  # the same in every split (data.load)
    if "prompt" in columns and "response" in columns:
        encode = lambda b: _pairs(b, tokenizer, config)  # noqa: E731
    elif "text" in columns:
        encode = lambda b: _texts(b, tokenizer, config)  # noqa: E731
    else:
        raise UserError(
            "data.columns: causal_lm reads a `text` column (plain text) or `prompt` and `response` columns; map "
            f"them with data.columns (the source has: {', '.join(c for c in columns if c != 'source_row')})"
        )
    return splits.map(encode, batched=True, remove_columns=columns, desc="tokenize")


def _texts(batch: dict[str, list], tokenizer: "PreTrainedTokenizerBase", config: Config) -> dict:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] + eos for t in batch["text"]]
    if config.packing:
        flat = [token for seq in ids for token in seq]  # joined within this map batch (1,000 texts)
        ids = [flat[i : i + config.max_length] for i in range(0, len(flat), config.max_length)]
        ids = [block for block in ids if len(block) > 1]
    else:
        ids = [seq[: config.max_length] for seq in ids]
    return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids], "labels": [list(s) for s in ids]}


def _pairs(batch: dict[str, list], tokenizer: "PreTrainedTokenizerBase", config: Config) -> dict:
    use_template = config.chat_template == "auto" and tokenizer.chat_template is not None
    input_ids, labels = [], []
    for prompt, response in zip(batch["prompt"], batch["response"]):
        prompt_ids, full = prompt_and_full(tokenizer, prompt, response, use_template)
        full = full[: config.max_length]
        masked = min(len(prompt_ids), len(full)) if config.response_only_loss else 0
        input_ids.append(full)
        labels.append([IGNORE] * masked + full[masked:])
    return {"input_ids": input_ids, "attention_mask": [[1] * len(s) for s in input_ids], "labels": labels}


def prompt_and_full(
    tokenizer: "PreTrainedTokenizerBase", prompt: str, response: str | None, use_template: bool
) -> tuple[list[int], list[int]]:
    """(prompt token ids ending where the response starts, prompt + response token ids)."""
    if use_template:
        user = [{"role": "user", "content": prompt}]
        prompt_ids = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
        if response is None:
            return prompt_ids, prompt_ids
        full = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True))
        if full[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, full
        # A template whose generation prompt is not a prefix of the full conversation: append the response.
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return prompt_ids, prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"] + eos
    prompt_ids = tokenizer(prompt + "\n")["input_ids"]
    if response is None:
        return prompt_ids, prompt_ids
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"] + eos


def _ids(encoded: "BatchEncoding | list[int]") -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def metrics(config: Config) -> tuple[str, ...]:
    """Every one of METRICS, whatever the section says."""
    return METRICS


def label_kind(config: Config) -> LabelKind:
    """No label role: the answer of tasks without one."""
    return "class"


def loss(config: Config, train: "Dataset", labels: list[str] | None) -> None:
    """The model's own loss (the task has no class weights or smoothing to apply)."""
    return None


def collator(tokenizer: "PreTrainedTokenizerBase") -> "DataCollatorForSeq2Seq":
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)  # pads labels with -100, not pad ids


def eval_outputs(outputs: "ModelOutput", batch: "Mapping[str, torch.Tensor]") -> "tuple[torch.Tensor, torch.Tensor]":
    """(per-sequence [summed token loss, scored tokens], unused) — perplexity is pooled over tokens."""
    import torch

    logits = outputs.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
    )  # (B, L-1), 0 where ignored
    counts = (targets != IGNORE).sum(dim=1)
    return torch.stack([losses.sum(dim=1), counts.float()], dim=1), counts


def compute_metrics(
    predictions: list,
    references: list,
    labels: list[str] | None,
    config: Config | None = None,
    features: "Dataset | None" = None,
) -> dict:
    total = sum(p[0] for p in predictions)
    tokens = sum(p[1] for p in predictions)
    loss = total / max(tokens, 1)
    return {"perplexity": math.exp(min(loss, 50)), "loss": loss, "tokens": int(tokens)}


def predict(
    model: "PreTrainedModel | PeftModel", tokenizer: "PreTrainedTokenizerBase", texts: list[str], config: Config
) -> list[dict]:
    """Greedy continuation of each prompt (through the chat template when the tokenizer has one)."""
    import torch

    use_template = config.chat_template == "auto" and tokenizer.chat_template is not None
    device = next(model.parameters()).device
    results = []
    for text in texts:
        prompt_ids, _ = prompt_and_full(tokenizer, text, None, use_template)
        ids = torch.tensor([prompt_ids], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        generated = tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
        results.append({"prompt": text, "generated": generated})
    return results
