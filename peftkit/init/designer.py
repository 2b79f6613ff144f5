"""`peftkit init`: design a commented recipe from a data file and a model.

    read the data (init/profile.py, through data.py's readers) -> column roles and task -> label set and counts
    -> the model's config, built on the meta device (no weights): size, layers, positions
    -> tokenize a sample: length distribution -> max_length
    -> method, precision, batch, learning rate for the model's size and this machine
    -> a Design: the recipe as a mapping, with a comment on every decision
    -> YAML text, checked with load_recipe, written atomically (init/recipe_text.py)

The recipe sets only what was decided from the data, the model or the hardware; everything else is left to the
schema's defaults (recipe.py), which the comments name where they matter.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftkit import assets, devices
from peftkit.data import blank
from peftkit.errors import UserError
from peftkit.init.profile import assign_roles, label_set, problem_type, profile, read_data
from peftkit.init.recipe_text import Design
from peftkit.methods import METHODS, targets
from peftkit.sections import SplitSection, TrainSection
from peftkit.tasks import TASKS, causal_lm

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

    from peftkit.init.profile import Column
    from peftkit.tasks.common import Task

log = logging.getLogger("peftkit")

SAMPLE_ROWS = 2000  # rows tokenized to measure lengths: enough for a stable 99th percentile, a few seconds
PERCENTILE = 99  # max_length covers this share of the sampled rows (1 in 100 is truncated)
IMBALANCE = 5  # largest / smallest class count from which macro-F1, not accuracy, picks the kept epoch
BIG_MODEL = 1e9  # parameters from which the base is quantised to 4 bits (QLoRA) on a GPU
TARGET_STEPS = 600  # optimizer steps the epoch count aims at (e.g. recipes/sentiment-lora.yaml: 2 x ~350)


# --- model ----------------------------------------------------------------------------------------------------


@dataclass
class ModelFacts:
    ref: str  # what from_pretrained loads (resolved)
    model_type: str
    params: int
    max_positions: int | None
    layers: list[str]  # adaptable layer names (last dotted component), head and output layer excluded
    tokenizer: PreTrainedTokenizerBase
    architectures: list[str] = field(default_factory=list)  # what the checkpoint was saved as (config.json)


def inspect_model(name: str, task: str, labels: list | None) -> ModelFacts:
    """The model's config, tokenizer and layers, without loading its weights: the model is built on the meta
    device (accelerate's init_empty_weights), so a 7B model costs no memory here."""
    import transformers
    from accelerate import init_empty_weights

    ref = assets.resolve_model(name)
    try:
        config = transformers.AutoConfig.from_pretrained(ref)
        tokenizer = transformers.AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as err:  # OSError: not found / offline; ValueError: not a valid repo id
        raise assets.hub_error("model.name", name, err) from None
    if labels:
        config.num_labels = len(labels)  # the head's size (it does not change which layers exist)
    try:
        with init_empty_weights():
            model = getattr(transformers, TASKS[task].AUTO_CLASS).from_config(config)
    except ValueError as err:
        raise UserError(
            f"--model {name}: a {config.model_type} model has no {task} head in transformers ({err})"
        ) from None
    model.tie_weights()  # init_empty_weights leaves tied embeddings apart: they would count twice
    layers = targets.all_linear(model, list(TASKS[task].HEAD_MODULES))  # lm_head, the output layer: not adapted
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None and getattr(tokenizer, "model_max_length", 0) < 1e6:
        positions = tokenizer.model_max_length
    return ModelFacts(
        ref,
        config.model_type,
        sum(p.numel() for p in model.parameters()),
        positions,
        layers,
        tokenizer,
        list(getattr(config, "architectures", None) or []),
    )


def choose_targets(task: str, facts: ModelFacts) -> tuple[list[str], str]:
    """Every linear layer, attention and feed-forward, for every task: what a run picks when target_modules is
    omitted (methods/lora.py), written out so the recipe shows it."""
    if not facts.layers:
        raise UserError(f"--model: no linear layers found in this {facts.model_type} model for LoRA to adapt")
    return facts.layers, "every linear layer (attention and feed-forward): LoRA's default (the QLoRA paper's finding)"


# --- lengths --------------------------------------------------------------------------------------------------


def token_lengths(task: str, roles: dict[str, str], split: Dataset, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens per example, as the task's preprocessing counts them before truncation, for a seeded sample."""
    indices = sorted(random.Random(0).sample(range(len(split)), min(SAMPLE_ROWS, len(split))))
    rows = split.select(indices)

    def column(role: str) -> list[str] | None:
        return [str(v) for v in rows[roles[role]] if v is not None] if role in roles else None

    if task == "token_classification":
        encoded = tokenizer([list(map(str, t)) for t in rows[roles["tokens"]] if t], is_split_into_words=True)
    elif task == "question_answering":
        encoded = tokenizer(column("question"), column("context"))
    elif task == "classification":
        pairs = [
            (str(a), None if b is None else str(b))
            for a, b in zip(
                rows[roles["text"]], rows[roles["text_pair"]] if "text_pair" in roles else [None] * len(rows)
            )
            if not blank(a)
        ]
        texts, second = [a for a, _ in pairs], [b or "" for _, b in pairs]
        encoded = tokenizer(texts, second if "text_pair" in roles else None)
    elif chat := _conversations(roles):
        if tokenizer.chat_template is None:
            raise UserError(
                "the data holds conversations, and this model's tokenizer has no chat template to render them; "
                "choose an instruct / chat model (--model), or write the recipe's task.chat_template by hand"
            )
        return [
            len(causal_lm.encode_chat(tokenizer, causal_lm.conversation(v, i), i)[0])
            for i, v in enumerate(rows[chat], 1)
        ]
    elif "prompt" in roles:
        template = tokenizer.chat_template is not None  # causal_lm's chat_template: auto
        return [
            len(causal_lm.prompt_and_full(tokenizer, str(p), str(r), template)[1])
            for p, r in zip(rows[roles["prompt"]], rows[roles["response"]])
            if not blank(p)
        ]
    else:
        eos = int(tokenizer.eos_token_id is not None)  # causal_lm appends end-of-sequence to every text
        return [len(ids) + eos for ids in tokenizer([t for t in column("text") if t.strip()])["input_ids"]]
    return [len(ids) for ids in encoded["input_ids"]]


def _conversations(roles: dict[str, str]) -> str | None:
    """The column of conversations, when the roles have one (causal_lm's messages or conversations)."""
    return next((roles[role] for role in causal_lm.CHAT_ROLES if role in roles), None)


def choose_max_length(lengths: list[int], cap: int | None, floor: int) -> dict:
    """The PERCENTILE-th percentile of the lengths, rounded up to a multiple of 8 (tensor-core friendly), at
    least `floor`, at most the model's positions."""
    import numpy as np

    ordered = np.sort(np.array(lengths))
    high = int(math.ceil(np.percentile(ordered, PERCENTILE)))
    value = max(floor, 8 * math.ceil(high / 8))
    if cap:
        value = min(value, cap)
    return {
        "value": value,
        "median": int(np.median(ordered)),
        "p95": int(math.ceil(np.percentile(ordered, 95))),
        "high": high,
        "max": int(ordered[-1]),
        "mean": float(ordered.mean()),
        "sampled": len(ordered),
        "cut": int((ordered > value).sum()),
        "capped": bool(cap and high > cap),
    }


# --- the design -----------------------------------------------------------------------------------------------


def design(
    source: str, model: str, task: str | None = None, columns: dict[str, str] | None = None, encoding: str | None = None
) -> Design:
    """Every decision of the recipe, from the data, the model and this machine."""
    d = Design()
    splits, fmt = read_data(source, encoding)
    first = splits["train"] if "train" in splits else next(iter(splits.values()))
    sample = first.select(sorted(random.Random(0).sample(range(len(first)), min(len(first), 5000))))
    cols = profile(sample)
    inferred = task is None
    task, roles, why = assign_roles(cols, lambda name: sample[name], task, dict(columns or {}))
    problem = problem_type(cols[roles["label"]]) if task == "classification" else "single_label"
    d.summary.append(
        f"task {task}{'' if problem == 'single_label' else f' ({problem})'} "
        f"({'from the data' if inferred else 'given'}); columns: " + ", ".join(f"{r}={c}" for r, c in roles.items())
    )
    d.set("task", "type", task)
    if problem != "single_label":
        what = {"multi_label": "a list of labels per row: a sigmoid each", "regression": "numbers: one output, MSE"}
        d.set("task", "problem_type", problem, what[problem])
    labels = _data_section(d, source, splits, fmt, encoding, TASKS[task], cols, roles, why, problem)
    facts = inspect_model(model, task, labels)
    positions = f", {facts.max_positions:,} positions" if facts.max_positions else ""
    d.set("model", "name", model, f"{facts.model_type}, {_count(facts.params)} parameters{positions}")
    d.summary.append(f"model {model}: {facts.model_type}, {_count(facts.params)} parameters")
    if task == "causal_lm" and facts.architectures and not any(_generates(a) for a in facts.architectures):
        d.warnings.append(
            f"{model} was saved as {', '.join(facts.architectures)}, not a text generator: as a causal LM its "
            "attention is made causal and it learns next-token prediction almost from scratch; a decoder "
            "(GPT-2, Llama, SmolLM2, ...) is the usual choice (--model), or give --task for another task"
        )
    m, packing = _task_section(d, task, roles, first, facts)
    _method(d, task, facts)
    _train_section(d, task, facts, m, packing, len(first), "validation" in splits)
    _generation(d, roles, first, facts.tokenizer)
    try:
        _memory(d, task, facts, labels, min(m["max"], m["value"]) if not packing else m["value"])
    except Exception as err:  # noqa: BLE001 - a comment the recipe can do without; said, not fatal
        log.info("memory estimate left out of the recipe: %s: %s", type(err).__name__, err)
    return d


def _generates(architecture: str) -> bool:
    """A checkpoint class that predicts the next token (LlamaForCausalLM, GPT2LMHeadModel, ...)."""
    return architecture.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))


def _memory(d: Design, task: str, facts: ModelFacts, labels: list | None, length: int) -> None:
    """`peftkit estimate`'s figure for the designed recipe, as a comment atop train: the model built on the meta
    device from the config inspect_model read, adapted as the run will adapt it."""
    import torch
    import transformers

    from peftkit import estimate, loading
    from peftkit.recipe import validate

    recipe = validate({"name": "init", **d.spec})
    device_type, precision = hardware()
    device = torch.device(device_type)
    model = estimate.meta_model(
        transformers.AutoConfig.from_pretrained(facts.ref),
        TASKS[task].AUTO_CLASS,
        labels,
        facts.tokenizer,
        loading.attention(recipe, device, precision),
        loading.base_dtype(recipe, precision),
    )
    _, model = loading.adapt(model, facts.tokenizer, recipe, TASKS[task], device, 1000)
    found = estimate.from_model(model, recipe, device, precision, length, "", estimate.runtime_mib(device))
    parts = ", ".join(f"{name} {mib:,.0f}" for name, mib in found.parts.items())
    line = f"memory: about {found.total_mib:,.0f} MiB at the peak ({parts} MiB; `peftkit estimate` splits it)"
    d.explain("train", line)
    d.summary.append(f"{line}: {found.verdict} here")


def _data_section(
    d: Design,
    source: str,
    splits: DatasetDict,
    fmt: str | None,
    encoding: str | None,
    module: Task,
    cols: dict[str, Column],
    roles: dict[str, str],
    why: dict[str, str],
    problem: str,
) -> list | None:
    """data: source, format, columns, the label set with its counts, what to drop. Returns the labels (for
    regression, the label column's name: the one output's)."""
    total = sum(len(s) for s in splits.values())
    layout = f" in splits {', '.join(splits)}" if len(splits) > 1 else ", one split: validation and test cut from it"
    d.set("data", "source", source, before=(f"{total:,} rows{layout} (data.splits)",))
    if fmt:
        d.set("data", "format", fmt, "token and tag per line, a blank line between sentences")
    if encoding:  # given on the command line (the schema's default otherwise)
        d.set("data", "encoding", encoding)
    found = [f"{role}: '{col}' ({why.get(role, 'by its name')})" for role, col in roles.items()]
    unused = [cols[c].describe() for c in cols if c not in roles.values()]
    found += [f"not used: {', '.join(unused)}"] if unused else []
    mapped = {role: col for role, col in roles.items() if col != role}
    if mapped:
        d.set("data", "columns", mapped, before=found)
    else:
        d.explain("data", *found)
    labels = None
    if problem == "regression":
        missing = sum(1 for split in splits.values() for v in split[roles["label"]] if v is None)
        if missing:
            d.set("data", "unknown_labels", "drop", f"{missing:,} row(s) have no number")
        d.explain("data", "regression: no data.labels (the label column holds numbers)")
        labels = [roles["label"]]
    elif module.LABEL_ROLE:
        listed = module.LABELS_PER_TOKEN or problem == "multi_label"  # a list of labels per row
        labels, counts, missing = label_set(splits, roles[module.LABEL_ROLE], listed)
        if len(labels) < 2:
            raise UserError(
                f"the label column '{roles[module.LABEL_ROLE]}' has {len(labels)} distinct value(s); "
                "at least 2 are needed (--label-column picks another column)"
            )
        seen = sum(len(split) for split in splits.values()) if problem == "multi_label" else sum(counts.values())
        shares = ", ".join(f"{v} {counts[v]:,} ({100 * counts[v] / seen:.1f}%)" for v in labels)
        unit = "tokens" if module.LABELS_PER_TOKEN else "rows"
        d.set(
            "data",
            "labels",
            [v if isinstance(v, int) and not isinstance(v, bool) else str(v) for v in labels],
            before=(
                f"{unit} per label: {shares}",
                "id order; to leave a class out, remove it here and set unknown_labels: drop",
            ),
        )
        if missing:
            d.set("data", "unknown_labels", "drop", f"{missing:,} row(s) have no label")
        ratio = max(counts.values()) / min(counts.values())
        if problem == "multi_label":
            _multi_label(d, splits, roles["label"], seen, ratio)
        elif not module.LABELS_PER_TOKEN and ratio >= IMBALANCE:
            rare = min(labels, key=lambda v: counts[v])
            d.warnings.append(
                f"the classes are unbalanced: '{rare}' has {counts[rare]:,} rows, {ratio:.0f}x fewer "
                "than the largest; macro-F1 picks the kept epoch"
            )
            d.set(
                "eval",
                "metric_for_best",
                "macro_f1",
                f"unbalanced classes ({ratio:.0f}:1): accuracy would reward ignoring '{rare}'",
            )
        d.summary.append(
            f"{len(labels)} labels: "
            + ", ".join(f"{v} ({counts[v]:,})" for v in labels[:12])
            + (" ..." if len(labels) > 12 else "")
        )
    text_roles = [r for r in module.TEXT_ROLES if r in roles]
    empty = sum(1 for s in splits.values() for r in text_roles for v in s[roles[r]] if blank(v))
    if empty:
        d.set("data", "empty_texts", "drop", f"{empty:,} row(s) have an empty text")
    return labels


def _multi_label(d: Design, splits: DatasetDict, column: str, rows: int, ratio: float) -> None:
    """Multi-label's loss and rate. Measured on recipes/entity-types.yaml (benchmarks/RESULTS.md): with labels
    this rare the model first predicts no label for every row; class weights (BCE's pos_weight) make it learn,
    and at lr 1e-3 with them one seed of three collapsed, at 5e-4 with a longer warm-up none did."""
    none = sum(1 for split in splits.values() for v in split[column] if v is not None and len(v) == 0)
    d.explain("data", f"{none:,} of {rows:,} rows ({100 * none / rows:.1f}%) have no label (an empty list)")
    if ratio >= IMBALANCE or none / rows >= 0.5:
        d.set("task", "class_weights", "balanced", "pos_weight = negatives / positives per label: rare labels count")


def _task_section(d: Design, task: str, roles: dict[str, str], split: Dataset, facts: ModelFacts) -> tuple[dict, bool]:
    """task: max_length from the data's length distribution (and, by task, packing / windows)."""
    lengths = token_lengths(task, roles, split, facts.tokenizer)
    if not lengths:
        raise UserError("every sampled row has an empty text; check the columns (--text-column)")
    floor = 64 if task == "question_answering" else 8  # QA windows hold the question and some context
    m = choose_max_length(lengths, facts.max_positions, min(floor, facts.max_positions or floor))
    what = {"token_classification": "sub-words per sentence", "question_answering": "tokens per question + context"}
    distribution = (
        f"{what.get(task, 'tokens per example')} ({m['sampled']:,} sampled rows, this model's tokenizer): "
        f"median {m['median']}, p95 {m['p95']}, p{PERCENTILE} {m['high']}, max {m['max']}"
    )
    basis = (
        f"the model's {facts.max_positions} positions (p{PERCENTILE} is {m['high']})"
        if m["capped"]
        else f"p{PERCENTILE} rounded up to a multiple of 8"
    )
    share = f"{m['cut']:,} of {m['sampled']:,} sampled rows ({100 * m['cut'] / m['sampled']:.1f}%)"
    chats = _conversations(roles) is not None
    packing = task == "causal_lm" and ("text" in roles or chats) and m["median"] <= m["value"] / 2
    if packing and not chats:
        cut = "no text is cut: packed texts run on into the next block"
    elif task == "question_answering":
        cut = f"{share} span several windows"
    else:
        cut = f"truncates {share}"
    d.set("task", "max_length", m["value"], f"{basis}; {cut}", before=(distribution,))
    d.summary.append(f"max_length {m['value']}: {basis}; {cut} ({distribution})")
    if packing:
        what = (
            "conversations (median {} tokens): several per row, whole, no attention across them"
            if chats
            else ("texts (median {} tokens): join them into full blocks")
        )
        d.set("task", "packing", True, "short " + what.format(m["median"]))
    if task == "question_answering":
        d.set("task", "doc_stride", max(8, m["value"] // 3 // 8 * 8), "overlap of consecutive windows: max_length / 3")
        unanswerable = sum(1 for a in split[roles["answers"]] if not (a or {}).get("text"))
        if unanswerable:
            d.set("task", "unanswerable", True, f"{unanswerable:,} question(s) have no answer (SQuAD 2.0 style)")
    return m, packing


def _train_section(
    d: Design, task: str, facts: ModelFacts, m: dict, packing: bool, rows: int, has_validation: bool
) -> None:
    """train: a batch that fits the model's size and max_length, a rate for LoRA at that size, epochs that give
    about TARGET_STEPS optimizer steps."""
    small = facts.params < 3e8
    budget = 8192 if small else 4096 if facts.params < 3e9 else 2048  # tokens per forward pass
    if task == "causal_lm":  # fp32 logits over the whole vocabulary at every position dominate the memory
        budget = min(budget, 2048)
    batch = max(1, min(32, 2 ** int(math.log2(max(1, budget // m["value"])))))
    accum = max(1, 16 // batch)
    d.set("train", "batch_size", batch, f"about {budget:,} tokens per forward pass at max_length {m['value']}")
    if accum > 1:
        d.set("train", "grad_accum", accum, f"an effective batch of {batch * accum}")
    lr = 1e-3 if small else 3e-4 if facts.params < 3e9 else 2e-4
    weighted = d.spec["task"].get("problem_type") == "multi_label" and "class_weights" in d.spec["task"]
    if weighted:  # measured on recipes/entity-types.yaml (benchmarks/RESULTS.md)
        d.set("train", "lr", lr / 2, "multi-label with class weights: 1e-3 collapsed a seed of a small model's run")
        d.set("train", "warmup_ratio", 0.1, "a longer warm-up for the weighted loss")
    elif task in ("classification", "token_classification"):  # where the range test was measured (RESULTS.md)
        d.set(
            "train",
            "lr",
            "auto",
            "no rate is known for this model and data: a short range test before training picks one (train.lr_search; "
            f"the run logs it). A number here, e.g. {lr:g}, fixes it",
        )
    else:
        d.set("train", "lr", lr, "LoRA takes a higher rate than full fine-tuning; lower for larger models")
    d.set("train", "recover", True, "a collapse or loss spike goes back to the last good state at half the rate")
    train_rows = rows * (1 if has_validation else SplitSection().train)
    examples = train_rows * m["mean"] / m["value"] if packing else train_rows
    per_epoch = max(1, math.ceil(examples / (batch * accum)))
    most = 3 if task == "causal_lm" else 10  # more passes over the same text overfit a language model
    epochs = max(1, min(most, round(TARGET_STEPS / per_epoch)))
    d.set(
        "train",
        "epochs",
        epochs,
        f"{per_epoch:,} steps per epoch, {epochs * per_epoch:,} in all (aiming at about "
        f"{TARGET_STEPS}" + (f"; at most {most} epochs)" if epochs == most else ")"),
    )
    defaults = TrainSection()
    d.explain(
        "train",
        ("" if weighted else f"warmup_ratio {defaults.warmup_ratio}, ")
        + f"scheduler {defaults.scheduler}, max_grad_norm "
        f"{defaults.max_grad_norm} and seed {defaults.seed} are the schema defaults; train.max_steps caps a "
        "quick trial run",
    )


def _generation(d: Design, roles: dict[str, str], split: Dataset, tokenizer: PreTrainedTokenizerBase) -> None:
    """Data with answers (conversations, prompt/response pairs): the run also writes answers before and after
    training and scores them (eval.generate), room for the longest answers but the rarest."""
    rows = split.select(range(min(len(split), SAMPLE_ROWS)))
    if chat := _conversations(roles):
        answers = [
            answer
            for i, value in enumerate(rows[chat], 1)
            for _, answer in causal_lm.assistant_turns(causal_lm.conversation(value, i))
        ]
    elif "response" in roles:
        answers = [str(v) for v in rows[roles["response"]] if not blank(v)]
    else:
        return
    lengths = [len(ids) + 1 for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]]  # + end of turn
    m = choose_max_length(lengths, None, 8)
    d.set("eval", "before_training", True, "the untouched model's answers and perplexity too: what training changed")
    d.set(
        "eval",
        "generate",
        {"samples": 24, "max_new_tokens": m["value"]},
        f"answers written (greedy) and scored: exact match, token F1, ROUGE-L. Answer tokens: median {m['median']}, "
        f"p{PERCENTILE} {m['high']}, max {m['max']}",
    )


def hardware() -> tuple[str, str]:
    """(device type, the precision `train.precision: auto` resolves to there): what the run will train on."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device.type, devices.resolve_precision("auto", device)


def _method(d: Design, task: str, facts: ModelFacts) -> None:
    device, precision = hardware()
    cuda = device == "cuda"
    big = facts.params > BIG_MODEL
    targets, reason = choose_targets(task, facts)
    if big and cuda:
        why = f"QLoRA: {_count(facts.params)} parameters on a GPU; the frozen base in 4 bits, LoRA in {precision}"
    elif big:
        why = (
            f"{_count(facts.params)} parameters, but no GPU: a full-precision base, since bitsandbytes' CPU "
            "kernels are slower than fp32 (benchmarks/RESULTS.md)"
        )
        d.warnings.append(f"a {_count(facts.params)}-parameter model on the CPU trains slowly; consider a GPU")
    else:
        why = f"a small model ({_count(facts.params)}): LoRA on a full-precision base"
    defaults = METHODS["lora"].Config(name="lora")
    d.explain(
        "method",
        f"r {defaults.r}, alpha {defaults.alpha:g} and dropout {defaults.dropout} are the schema "
        "defaults (a higher r for harder tasks); ia3 trains fewer parameters, full is the reference",
    )
    d.set("method", "name", "lora", why)
    d.set("method", "target_modules", targets, reason, before=(f"layers this model offers: {', '.join(facts.layers)}",))
    if big and cuda:
        d.set("quantization", "bits", 4, "NF4 with double quantisation (schema defaults); needs peftkit[quant]")
        d.set("train", "gradient_checkpointing", True, "recompute activations: memory for a large model")
    d.explain("train", f"precision: auto (schema default) is {precision} on this machine ({device})")
    d.summary.append(
        f"method lora on {', '.join(targets)}"
        + (" with a 4-bit base (QLoRA)" if big and cuda else "")
        + f"; precision {precision} on {device}"
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
