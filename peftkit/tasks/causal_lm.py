"""Causal language modelling (text generation): domain adaptation on plain text, instruction tuning on
prompt/response pairs, or chat tuning on conversations.

- plain text (`text` column): each text is one sequence;
- prompt/response (`prompt` and `response` columns): formatted with the chat template when there is one (as the
  model saw in its instruction tuning), else as "prompt\\nresponse"; with `response_only_loss` the prompt's tokens
  are masked out of the loss, so the model learns to answer, not to ask;
- conversations (a `messages` column, OpenAI-style lists of {role, content} with roles system / user /
  assistant; or ShareGPT's `conversations`, lists of {from, value} with human / gpt / system, told apart by the
  messages' keys): rendered with the chat template, and with `response_only_loss` only the tokens of every
  assistant turn are scored (`encode_chat`: the conversation is rendered prefix by prefix, and the text each
  assistant message adds is marked, then mapped onto the tokens of the whole rendering).
With `packing`, several sequences share each row of max_length tokens, each attending only to itself
(peftkit/packing.py). Scored by the mean token loss and its exponential, perplexity (lower is better).
`peftkit predict` generates: a run with a chat template answers a user message, or a whole conversation given
as a JSON list of messages.
"""

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from peftkit import assets, generation, packing
from peftkit.data import ROW
from peftkit.errors import UserError
from peftkit.sections import Section
from peftkit.tasks.common import LabelKind

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from peft import PeftModel
    from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.utils import ModelOutput

    from peftkit.sections import GenerateSection

# text, or prompt + response, or messages (OpenAI-style) / conversations (ShareGPT): checked in preprocess
COLUMNS = {"text": False, "prompt": False, "response": False, "messages": False, "conversations": False}
CHAT_ROLES = ("messages", "conversations")  # chat data: OpenAI-style messages, ShareGPT conversations
TEXT_ROLES = ("text", "prompt", "response", *CHAT_ROLES)
LABEL_ROLE = None
LABELS_PER_TOKEN = False
SPLIT_BY = None
METRICS = ("perplexity", "loss")
PEFT_TASK_TYPE = "CAUSAL_LM"
AUTO_CLASS = "AutoModelForCausalLM"  # the transformers class with this task's head
PIPELINE_TAG = "text-generation"  # the Hub's name for the task
HEAD_MODULES = ()  # the language-model head is the (often tied) embedding: it stays frozen
IGNORE = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}

log = logging.getLogger("peftkit")


class Config(Section):
    type: Literal["causal_lm"]
    max_length: int = Field(256, gt=1, description="Tokens per sequence (longer ones are truncated).")
    packing: bool = Field(
        False,
        description="Put several sequences in each row of max_length tokens, each restarting its positions and "
        "attending only to itself: no step is spent on padding. Plain text is cut into full rows (a text cut in "
        "two continues as a new sequence); conversations and prompt/response pairs stay whole.",
    )
    response_only_loss: bool = Field(
        True,
        description="Prompt/response and chat data: train on the answers only (the response; every assistant "
        "turn of a conversation), not on the prompt, the user's or the system's messages.",
    )
    chat_template: str = Field(
        "auto",
        min_length=1,
        description="How prompts and conversations are rendered. auto: the tokenizer's chat template (chat data "
        "needs one; prompt/response pairs without one are joined as prompt\\nresponse); never: no template "
        "(prompt/response only); or a Jinja chat template, given inline or as a file (a path or "
        "pkg://PACKAGE/PATH), for a tokenizer that lacks one. A given template is saved with the adapter's "
        "tokenizer.",
    )
    max_new_tokens: int = Field(64, gt=0, description="`peftkit predict`: tokens to generate per prompt.")


def load_model(
    path: str, labels: list[str] | None, tokenizer: "PreTrainedTokenizerBase", **kwargs: Any
) -> "PreTrainedModel":
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
    if getattr(AutoConfig.from_pretrained(path, **common), "is_decoder", None) is False:
        # BERT-family configs (BERT, RoBERTa, ELECTRA; GPT-NeoX's too) carry is_decoder, False by default, and
        # their LM-head model then attends to later tokens as well (transformers only warns): trained as a causal
        # LM it would learn to copy the next token and report a perplexity near 1. is_decoder=True makes the
        # attention causal, transformers' own way (its BertLMHeadModel and GPTNeoXForCausalLM docs).
        kwargs["is_decoder"] = True
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def preprocess(splits: "DatasetDict", tokenizer: "PreTrainedTokenizerBase", config: Config) -> "DatasetDict":
    columns = next(iter(splits.values())).column_names  # the same in every split (data.load)
    template = chat_template(tokenizer, config)
    chats = [c for c in CHAT_ROLES if c in columns]
    if len(chats) == 2:
        raise UserError(
            "data: the source has both a 'messages' and a 'conversations' column; keep one, or name the one to "
            "train on with data.columns.messages"
        )
    if chats:
        if template is None:
            raise UserError(_no_template(tokenizer, config))
        encode = lambda b: _chats(b, tokenizer, config, chats[0])  # noqa: E731
    elif "prompt" in columns and "response" in columns:
        encode = lambda b: _pairs(b, tokenizer, config)  # noqa: E731
    elif "text" in columns:
        encode = lambda b: _texts(b, tokenizer, config)  # noqa: E731
    else:
        raise UserError(
            "data.columns: causal_lm reads a `text` column (plain text), `prompt` and `response` columns, or a "
            "`messages` column (conversations: lists of {role, content}; ShareGPT's `conversations` too); map "
            f"them with data.columns (the source has: {', '.join(c for c in columns if c != ROW)})"
        )
    return splits.map(encode, batched=True, remove_columns=columns, desc="tokenize")


def chat_template(tokenizer: "PreTrainedTokenizerBase", config: Config) -> str | None:
    """The chat template prompts and conversations are rendered with (None: none). A template the recipe gives
    (inline, or a file) is set on the tokenizer, so the adapter's saved tokenizer carries it and `peftkit predict`
    renders as training did."""
    given = config.chat_template
    if given == "never":
        return None
    if given == "auto":
        return tokenizer.chat_template
    if "{{" in given or "{%" in given:
        text = given
    else:
        path = assets.package_path(given) if given.startswith("pkg://") else Path(given).expanduser()
        if not path.is_file():
            raise UserError(
                f"task.chat_template: '{given}' is neither auto, never, a Jinja template (with {{{{ }}}} or "
                "{% %}) nor a file; give the template inline or the path of a file holding it"
            )
        text = path.read_text(encoding="utf-8")
    tokenizer.chat_template = text
    return text


def _no_template(tokenizer: "PreTrainedTokenizerBase", config: Config) -> str:
    why = (
        "task.chat_template is never"
        if config.chat_template == "never"
        else f"the tokenizer of {tokenizer.name_or_path} has no chat template"
    )
    return (
        f"task.chat_template: {why}, and chat data (a messages column) is rendered with one; set "
        "task.chat_template to a Jinja chat template or a file holding one (e.g. the chat_template.jinja of the "
        "model's instruct variant)"
    )


def _texts(batch: dict[str, list], tokenizer: "PreTrainedTokenizerBase", config: Config) -> dict:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] + eos for t in batch["text"]]
    if config.packing:  # packed within this map batch (1,000 texts), cut into full rows
        return packing.pack(ids, ids, config.max_length, chunk=True)
    return _rows([seq[: config.max_length] for seq in ids], [seq[: config.max_length] for seq in ids])


def _pairs(batch: dict[str, list], tokenizer: "PreTrainedTokenizerBase", config: Config) -> dict:
    use_template = chat_template(tokenizer, config) is not None
    input_ids, labels = [], []
    for prompt, response in zip(batch["prompt"], batch["response"]):
        prompt_ids, full = prompt_and_full(tokenizer, prompt, response, use_template)
        full = full[: config.max_length]
        masked = min(len(prompt_ids), len(full)) if config.response_only_loss else 0
        input_ids.append(full)
        labels.append([IGNORE] * masked + full[masked:])
    if config.packing:
        return packing.pack(input_ids, labels, config.max_length, chunk=False)
    return _rows(input_ids, labels)


def answer_prompts(
    rows: "Dataset", tokenizer: "PreTrainedTokenizerBase", config: Config, limit: int
) -> list[tuple[list[int], str]]:
    """(prompt token ids, reference answer) for the first `limit` answers of a split, as training renders them:
    each assistant turn of a conversation (the conversation before it, with the generation prompt), or each
    prompt/response pair. Empty for plain text, which has no answers (eval.generate then says so)."""
    columns = rows.column_names
    chats = [c for c in CHAT_ROLES if c in columns]
    found: list[tuple[list[int], str]] = []
    if chats:
        numbers = rows[ROW] if ROW in columns else range(1, len(rows) + 1)
        for row, value in zip(numbers, rows[chats[0]]):
            for history, reference in assistant_turns(conversation(value, row)):
                prompt = render(tokenizer, history, True, row)
                found.append((list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), reference))
                if len(found) == limit:
                    return found
    elif "prompt" in columns and "response" in columns:
        use_template = chat_template(tokenizer, config) is not None
        for prompt, response in zip(rows["prompt"][:limit], rows["response"][:limit]):
            found.append((prompt_and_full(tokenizer, prompt, None, use_template)[0], response))
    return found


def _rows(input_ids: list[list[int]], labels: list[list[int]]) -> dict:
    return {"input_ids": input_ids, "attention_mask": [[1] * len(s) for s in input_ids], "labels": labels}


def _chats(batch: dict[str, list], tokenizer: "PreTrainedTokenizerBase", config: Config, column: str) -> dict:
    input_ids, labels, unscored, shifted = [], [], [], []
    rows = batch[ROW] if ROW in batch else range(1, len(batch[column]) + 1)
    for row, value in zip(rows, batch[column]):
        ids, answer, aligned = encode_chat(tokenizer, conversation(value, row), row)
        ids, answer = ids[: config.max_length], answer[: config.max_length]
        if config.response_only_loss and not any(answer[1:]):  # (the first token is never predicted)
            unscored.append(row)
            continue
        shifted += [] if aligned else [row]
        input_ids.append(ids)
        labels.append([t if a or not config.response_only_loss else IGNORE for t, a in zip(ids, answer)])
    if unscored:
        log.warning(
            "data: left out %d conversation(s) with no assistant token within task.max_length %d (source rows "
            "%s); raise task.max_length to keep them",
            len(unscored),
            config.max_length,
            _listed(unscored),
        )
    if shifted:
        log.warning(
            "data: in %d conversation(s) (source rows %s) an assistant turn's first token merges with the end of "
            "its prompt, so the tokens trained on differ from what generation sees after that prompt alone; "
            "a template that ends its generation prompt with a separator (a newline, a special token) avoids it",
            len(shifted),
            _listed(shifted),
        )
    if config.packing:
        return packing.pack(input_ids, labels, config.max_length, chunk=False)
    return _rows(input_ids, labels)


def _listed(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:5])) + (" ..." if len(rows) > 5 else "")


def conversation(value: Any, row: int | str, answered: bool = True) -> list[dict[str, str]]:
    """One row's conversation as [{role, content}] with roles system / user / assistant, from OpenAI-style
    messages ({role, content}) or ShareGPT's ({from, value}: human, gpt, system), told apart by their keys.
    `answered`: it must hold an assistant message (training data; a prompt to generate from need not)."""
    where = f"data: source row {row}"
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: the conversation is empty (no messages); remove the row or fill it")
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, Mapping):
            raise UserError(f"{where}, message {number}: not a {{role, content}} object: {str(message)[:80]!r}")
        if message.get("role") is not None:
            raw, content, roles = message["role"], message.get("content"), {r: r for r in ROLES}
        elif message.get("from") is not None:
            raw, content, roles = message["from"], message.get("value"), SHAREGPT_ROLES
        else:
            keys = ", ".join(k for k, v in message.items() if v is not None) or "none"
            raise UserError(
                f"{where}, message {number}: no role; messages are {{role, content}} (OpenAI-style) or "
                f"{{from, value}} (ShareGPT); this one has keys: {keys}"
            )
        if raw not in roles:
            raise UserError(
                f"{where}, message {number}: unknown role '{raw}'; conversations hold system, user and assistant "
                "messages (ShareGPT: system, human, gpt). Rename or remove the others"
            )
        if not isinstance(content, str):
            what = "missing" if content is None else "not text"
            raise UserError(f"{where}, message {number} ({raw}): its content is {what}; give each message its text")
        messages.append({"role": roles[raw], "content": content})
    if answered and not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f"{where}: the conversation has no assistant message, so nothing in it would be trained on; add the "
            "assistant's answer or remove the row"
        )
    return messages


def assistant_turns(messages: list[dict[str, str]]) -> list[tuple[list[dict[str, str]], str]]:
    """(the conversation before an assistant message, that message's text), for each assistant message: the
    prompts a model answers in this conversation, and the references to compare its answers with."""
    return [(messages[:i], m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]


def render(
    tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], generation_prompt: bool, row: int | str
) -> str:
    """The conversation as the chat template writes it (`generation_prompt`: followed by the start of the
    assistant's turn, where a model begins to answer)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's TemplateError, raise_exception() in the template, a missing key
        raise UserError(
            f"data: source row {row}: the chat template cannot render this conversation ({type(err).__name__}: "
            f"{err}); fix the conversation, or give a template that accepts it in task.chat_template"
        ) from None


def encode_chat(
    tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], row: int | str
) -> tuple[list[int], list[bool], bool]:
    """(token ids of the rendered conversation, which of them belong to an assistant turn, whether each assistant
    turn starts on a token boundary).

    Incremental rendering: the text an assistant message adds runs from the end of the conversation before it
    rendered with the generation prompt (`<|im_start|>assistant\\n`) to the end of the conversation through it
    (its content and end-of-turn marker, which teaches the model to stop). Both renderings must be prefixes of the
    whole conversation's. The whole text is tokenized once (what the model trains on) and a token is an
    assistant token when it starts inside such a span (fast tokenizers' offsets; a slow tokenizer's pieces are
    tokenized apart, span by span). transformers' `return_assistant_tokens_mask` would need `{% generation %}`
    markers in the template, which few templates have."""
    full = render(tokenizer, messages, False, row)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(tokenizer, messages[:i], True, row), render(tokenizer, messages[: i + 1], False, row)
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(
                f"data: source row {row}: the chat template renders the conversation before its assistant message "
                f"{len(spans) + 1} differently from the start of the whole conversation (it rewrites earlier turns "
                "depending on later ones, e.g. drops past reasoning), so the assistant's tokens cannot be told "
                "apart; give a template whose renderings of a conversation's beginnings are prefixes of the whole "
                "in task.chat_template"
            )
        spans.append((len(before), len(through)))
    if tokenizer.is_fast:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        answer = [any(s <= start < e for s, e in spans) for start, _ in encoded["offset_mapping"]]
    else:
        cuts = [0, *(c for span in spans for c in span), len(full)]
        ids, answer = [], []
        for k, (start, end) in enumerate(zip(cuts, cuts[1:])):
            piece = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
            ids += piece
            answer += [k % 2 == 1] * len(piece)
    aligned = True
    for start, _ in spans:
        prompt = tokenizer(full[:start], add_special_tokens=False)["input_ids"]
        aligned = aligned and ids[: len(prompt)] == list(prompt)
    return ids, answer, aligned


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


def collator(tokenizer: "PreTrainedTokenizerBase") -> "Callable[[list[dict]], Mapping[str, Any]]":
    """Pads a batch: rows of packed sequences (they carry position_ids) as packing.collate does, others with
    transformers' seq2seq collator (labels padded with -100, not pad ids)."""
    from transformers import DataCollatorForSeq2Seq

    padded = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)

    def collate(features: list[dict]) -> Mapping[str, Any]:
        if "position_ids" in features[0]:
            return packing.collate(features, tokenizer.pad_token_id, left=tokenizer.padding_side == "left")
        return padded(features)

    return collate


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
    model: "PreTrainedModel | PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: list[str],
    config: Config,
    options: "GenerateSection | None" = None,
) -> list[dict]:
    """A continuation of each prompt, generated in batches (greedy unless `options` sample; max_new_tokens from
    `options`, else task.max_new_tokens). With a chat template (the run's, saved with its tokenizer) a text is
    the user's message, or a whole conversation so far as a JSON list of messages ({role, content} or ShareGPT's
    {from, value}), and the model writes the assistant's next turn."""
    from peftkit.sections import GenerateSection

    template = None if config.chat_template == "never" else tokenizer.chat_template
    prompts = []
    for number, text in enumerate(texts, 1):
        history = _history(text, number) if template is not None else None
        if history is not None:
            prompt = render(tokenizer, history, True, f"{number} of the input")
            prompts.append(list(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        else:
            prompts.append(prompt_and_full(tokenizer, text, None, template is not None)[0])
    options = options or GenerateSection(max_new_tokens=config.max_new_tokens)
    answers = generation.generate(model, tokenizer, prompts, options)
    return [{"prompt": text, "generated": answer} for text, answer in zip(texts, answers)]


def _history(text: str, number: int) -> list[dict[str, str]] | None:
    """A conversation given as a JSON list of messages, or None for a plain user message."""
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # text that merely starts with a bracket
    return conversation(value, f"{number} of the input", answered=False)
