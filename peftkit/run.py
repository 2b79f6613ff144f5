"""`peftkit run`, top to bottom: the pipeline as phases, each a function with a typed result.

    run(recipe) -> _session: the accelerator, the run folder, its log and trackers
                -> prepare: data (splits, labels) -> base model (+ 8/4-bit) -> method -> encoded splits
                -> score_before -> train_model (train.fit) -> score_after -> export_adapter -> report

`run` returns the RunReport that the CLI prints and metrics.json is written from. Started by torchrun /
`accelerate launch` (or `peftkit run --processes N`), every process runs every phase, each on its share of every
batch of batches; only the main process writes, and only it returns a report.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import (
    atomic,
    batches,
    checkpoint,
    data,
    devices,
    estimate,
    evaluation,
    export,
    generation,
    loading,
    measure,
    sharding,
    tracking,
    train,
)
from peftkit.errors import UserError, is_out_of_memory, out_of_memory
from peftkit.methods import METHODS
from peftkit.methods.base import trainable_tensors
from peftkit.recipe import Recipe
from peftkit.run_folder import ADAPTER, LOG, MEMORY, MEMORY_PLOT, METRICS, RECIPE
from peftkit.sharing import hub
from peftkit.tasks import TASKS, causal_lm

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

    from peftkit.methods.base import Method
    from peftkit.tasks.common import Task

log = logging.getLogger("peftkit")

Prompts = dict[str, list[tuple[list[int], str]]]  # eval.generate: per split, (prompt ids, reference answer)


@dataclass
class Session:
    """What every phase works in: the recipe with its task and method, the accelerator, the run folder (its
    `.partial` while running), the trackers and the memory timeline."""

    recipe: Recipe
    task: Task
    method: Method
    accelerator: Accelerator
    run_dir: Path
    resume_from: Path | None  # the checkpoint a resumed run continues from
    tracked: tracking.Tracking
    timeline: measure.MemoryTimeline

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Prepared:
    """`prepare`'s result: the data encoded and the model adapted, ready to train."""

    labels: list[str] | None  # the task's label names (None for causal LM)
    encoded: DatasetDict
    collate: Callable
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module  # sharded in place where train.distributed.strategy is fsdp
    prompts: Prompts  # eval.generate's (empty when it is off)
    counts: dict  # parameter counts and training FLOPs per token (measure.py)
    memory: dict  # what loading took (measure.py)


@dataclass
class Scores:
    """One scoring of the model: each eval split's metrics, and eval.generate's answers, scored."""

    splits: dict[str, dict]
    generated: dict


@dataclass
class Trained:
    """`train_model`'s result: train.fit's (history, the kept evaluation, steps, rate, throughput), and memory
    with training's peaks added."""

    result: dict
    memory: dict


@dataclass
class RunReport:
    """A finished run: its folder and what its metrics.json holds."""

    output: Path
    metrics: dict


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> RunReport | None:
    """Train, score and export; the run folder appears complete or not at all (`<folder>.partial` while running).
    `resume`: continue an interrupted run from the newest checkpoint in its `.partial` folder. Every process of a
    distributed run calls this; the main one returns the report, the others None."""
    with _session(recipe, overwrite, resume) as session:
        prepared = prepare(session)
        before = score_before(session, prepared)
        trained = train_model(session, prepared)
        after = score_after(session, prepared, trained)
        warnings = _collapse_warnings(session.recipe, after, trained)
        # a sharded model's trained tensors, gathered whole: a collective, so by every process
        gathered = trainable_tensors(prepared.model) if sharding.is_sharded(prepared.model) else None
        if not session.main:
            return None
        adapter = export_adapter(session, prepared, gathered)
        return report(session, prepared, before, trained, after, warnings, adapter)


@contextlib.contextmanager
def _session(recipe: Recipe, overwrite: bool, resume: bool) -> Iterator[Session]:
    """The accelerator, the run folder with its log file and trackers, and the memory timeline, for the phases
    to run in; a failure is recorded as such by the trackers, and running out of memory says what to lower."""
    from accelerate.utils import set_seed

    tracking.check_installed(recipe.train.report_to)  # a missing mlflow / wandb: said now, not after the training
    if devices.launched_fsdp():  # `accelerate launch` with an FSDP config: peftkit's own sharding (sharding.py)
        recipe.train.distributed.strategy = "fsdp"
    accelerator = devices.make_accelerator(
        recipe.train.precision, recipe.train.grad_accum, log_with=tracking.accelerate_trackers(recipe.train.report_to)
    )
    set_seed(recipe.train.seed)
    main = accelerator.is_main_process
    with _run_folder(recipe, accelerator, overwrite, resume) as run_dir:
        handler = _log_to_file(run_dir / LOG) if main else logging.NullHandler()
        tracked = tracking.Tracking()  # nowhere, until started in the folder
        timeline = measure.MemoryTimeline(accelerator.device).start()  # each process its own; the main one saves it
        timeline.mark("data")
        try:
            resume_from = _resume_point(run_dir, recipe) if resume else None
            if main and resume_from is None:  # a resumed run's is the same (checked), and other processes read it
                atomic.write_text(run_dir / RECIPE, recipe.to_yaml())
            log.info(
                "run %s -> %s (precision %s, device %s%s)",
                recipe.name,
                recipe.output_dir,
                devices.precision_of(accelerator),
                accelerator.device,
                f", {accelerator.num_processes} processes" if accelerator.num_processes > 1 else "",
            )
            tracked = tracking.start(recipe, accelerator, run_dir, resumed=resume_from is not None)
            task, method = TASKS[recipe.task.type], METHODS[recipe.method.name]
            yield Session(recipe, task, method, accelerator, run_dir, resume_from, tracked, timeline)
        except BaseException as err:
            log.debug("run failed: %s: %s", type(err).__name__, err)  # debug: the log file only; the CLI prints it
            tracked.close(err)
            if is_out_of_memory(err):
                raise out_of_memory(accelerator.device, _memory_knobs(recipe)) from err
            raise
        finally:
            timeline.stop()
            tracked.close()  # (a run that raised was closed as failed above)
            logging.getLogger("peftkit").removeHandler(handler)
            handler.close()


def prepare(session: Session) -> Prepared:
    """The data loaded, split and encoded; the base model loaded (8/4-bit where asked) and adapted by the method,
    from a published adapter where model.adapter names one, sharded where asked; what that cost."""
    recipe, task, accelerator, main = session.recipe, session.task, session.accelerator, session.main
    if main and accelerator.device.type == "cuda":
        _warn_if_too_big(recipe, accelerator.num_processes)
    splits, labels = data.load(recipe.data, task, kind=task.label_kind(recipe.task))
    missing = [s for s in recipe.eval.splits if s not in splits]
    if missing:
        raise UserError(f"eval.splits: no {', '.join(missing)} split (the data has {', '.join(splits)})")

    start = None
    if recipe.model.adapter:  # continue from a published adapter: checked before minutes of loading
        with accelerator.main_process_first():  # one download, which the other processes then find
            start = hub.starting_adapter(recipe, labels)
    steps = batches.total_steps(len(splits["train"]), recipe.train, accelerator.num_processes)
    sharded = sharding.applies(recipe, accelerator.num_processes)
    if sharded:
        sharding.refuse_unsupported(recipe, session.method)
    session.timeline.mark("model")
    tokenizer, model = loading.adapted_model(  # sharded: the main process's weights only (sharding.shard)
        recipe, task, labels, accelerator.device, devices.precision_of(accelerator), steps, sharded and not main
    )
    if start is not None and (main or not sharded):
        hub.load_start(model, start, recipe.model.adapter)
    counts = {**measure.parameter_counts(model), "flops_per_token": measure.training_flops_per_token(model)}
    model_mib = measure.model_mib(model)
    if sharded:
        sharding.shard(model, accelerator)  # in place
    memory = {
        "model_mib": model_mib,
        "load_peak": measure.peak_memory(accelerator.device),
        "after_load": measure.memory_now(accelerator.device),
    }
    measure.reset_peak_memory(accelerator.device)
    log.info(
        "trainable parameters: %s of %s (%.3f%%)",
        f"{counts['trainable_params']:,}",
        f"{counts['total_params']:,}",
        100 * counts["trainable_share"],
    )

    encoded = task.preprocess(splits, tokenizer, recipe.task)
    _check_encoded(encoded, recipe)
    prompts = _answer_prompts(splits, tokenizer, recipe)  # eval.generate's, checked before training
    if prompts and sharded:
        raise UserError(
            "eval.generate with train.distributed.strategy fsdp: answers are generated on the main process "
            "alone, and a sharded model needs every process for each forward; use strategy ddp, or generate "
            "after the run with `peftkit predict RUN --file PROMPTS`"
        )
    return Prepared(labels, encoded, task.collator(tokenizer), tokenizer, model, prompts, counts, memory)


def score_before(session: Session, prepared: Prepared) -> Scores:
    """The untrained model's scores (eval.before_training) and generated answers (eval.generate), the baseline
    the trained one is read against; none for a resumed run, whose model is no longer the untrained one."""
    recipe, accelerator, model = session.recipe, session.accelerator, prepared.model
    scores = Scores({}, {})
    if session.resume_from is not None:
        return scores
    if recipe.eval.before_training:
        session.timeline.mark("scored before training")
        model.to(accelerator.device)
        for split in recipe.eval.splits:
            with accelerator.autocast():  # the model is not prepared yet: a half-precision base needs it
                scores.splits[split] = _score(session, prepared, split)
            log.info("before training, %s: %s", split, evaluation.short(scores.splits[split]))
    if prepared.prompts:
        model.to(accelerator.device)
        with accelerator.autocast():
            scores.generated = _generate(
                model, prepared.tokenizer, prepared.prompts, recipe, session.main, "before training"
            )
    return scores


def train_model(session: Session, prepared: Prepared) -> Trained:
    """train.fit on the training split (the one loop), and the memory peaks it reached."""
    accelerator = session.accelerator
    job = train.Job(
        prepared.model,
        prepared.encoded,
        prepared.collate,
        session.task,
        session.recipe,
        accelerator,
        prepared.labels,
        session.method,
        session.run_dir,
        session.tracked,
        session.timeline,
    )
    session.timeline.mark("training")
    result = train.fit(job, resume=session.resume_from)
    memory = {**prepared.memory, "train_peak": measure.peak_memory(accelerator.device)}  # with its validation passes
    if accelerator.num_processes > 1:  # each process's own peaks (the ones above: the main process's)
        from accelerate.utils import gather_object

        mine = {
            "process": accelerator.process_index,
            "load_peak": memory["load_peak"],
            "train_peak": memory["train_peak"],
        }
        memory["per_process"] = gather_object([mine])
    return Trained(result, memory)


def score_after(session: Session, prepared: Prepared, trained: Trained) -> Scores:
    """The trained model's scores on every eval split (taken from training's own evaluation of the kept weights
    where it made one, so that pass is not run twice) and its generated answers."""
    recipe, accelerator = session.recipe, session.accelerator
    session.timeline.mark("final scores")
    scores = Scores({}, {})
    for split in recipe.eval.splits:
        scores.splits[split] = train.kept_scores(trained.result, split)
        if scores.splits[split] is None:
            scores.splits[split] = _score(session, prepared, split)
        log.info("%s: %s", split, evaluation.short(scores.splits[split]))
    if prepared.prompts:
        with accelerator.autocast():
            model = accelerator.unwrap_model(prepared.model)
            scores.generated = _generate(model, prepared.tokenizer, prepared.prompts, recipe, session.main)
    session.tracked.final(trained.result["steps"], scores.splits)
    return scores


def export_adapter(session: Session, prepared: Prepared, gathered: dict | None) -> Path:
    """The trained adapter (and head) saved in the run folder in its method's format (export.py)."""
    session.timeline.mark("export")
    adapter = session.run_dir / ADAPTER
    model = session.accelerator.unwrap_model(prepared.model)
    export.save_adapter(model, prepared.tokenizer, adapter, session.recipe, prepared.labels, gathered)
    return adapter


def report(
    session: Session,
    prepared: Prepared,
    before: Scores,
    trained: Trained,
    after: Scores,
    warnings: list[str],
    adapter: Path,
) -> RunReport:
    """Everything the run measured, written as metrics.json (and the memory timeline beside it); the checkpoints
    removed, the adapter being what remains."""
    generated = {**({"before_training": before.generated} if before.generated else {}), **after.generated}
    metrics = {
        **after.splits,
        **({"before_training": before.splits} if before.splits else {}),
        **({"generation": generated} if generated else {}),
        **prepared.counts,
        "adapter_bytes": export.adapter_bytes(adapter),
        "train": trained.result,
        "precision": devices.precision_of(session.accelerator),
        "device": str(session.accelerator.device),
        "memory": trained.memory,
        **({"warnings": warnings} if warnings else {}),
    }
    session.timeline.stop()
    session.timeline.save(session.run_dir / MEMORY, session.run_dir / MEMORY_PLOT)
    atomic.write_text(session.run_dir / METRICS, json.dumps(metrics, indent=2))
    checkpoint.remove(session.run_dir)  # finished: the adapter is what remains
    return RunReport(session.recipe.output_dir, metrics)


def _score(session: Session, prepared: Prepared, split: str) -> dict:
    """The task's metrics of the model as it is now on one encoded split."""
    recipe, accelerator = session.recipe, session.accelerator
    loader = batches.eval_loader(prepared.encoded[split], prepared.collate, recipe, accelerator)
    return evaluation.evaluate(prepared.model, loader, session.task, prepared.labels, accelerator, recipe.task)


def _collapse_warnings(recipe: Recipe, after: Scores, trained: Trained) -> list[str]:
    """A model that answers one class whatever the input learned nothing: said last, loudly (the CLI: red)."""
    rate = recipe.train.model_copy(update={"lr": trained.result["lr"]})  # train.lr auto: the rate it chose
    warnings = [
        f"{split}: {evaluation.collapse_message(scores, rate)}"
        for split, scores in after.splits.items()
        if "collapsed_to" in scores
    ]
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def _answer_prompts(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, recipe: Recipe
) -> dict[str, list[tuple[list[int], str]]]:
    """eval.generate: each evaluated split's first prompts with their reference answers (none when it is off)."""
    if recipe.eval.generate is None:
        return {}
    prompts = {}
    for split in recipe.eval.splits:
        prompts[split] = causal_lm.answer_prompts(splits[split], tokenizer, recipe.task, recipe.eval.generate.samples)
        if not prompts[split]:
            raise UserError(
                f"eval.generate: the {split} split has no answers to compare generated ones with (plain text); "
                "give prompt/response or chat (messages) data, or remove eval.generate"
            )
    return prompts


def _generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: dict[str, list[tuple[list[int], str]]],
    recipe: Recipe,
    main: bool,
    when: str = "",
) -> dict:
    """Each split's answers, generated and scored (generation.py), with a few examples; on the main process (the
    others go on to wait for it at the next synchronisation)."""
    if not main:
        return {}
    scores = {}
    for split, pairs in prompts.items():
        answers = generation.generate(model, tokenizer, [ids for ids, _ in pairs], recipe.eval.generate)
        references = [reference for _, reference in pairs]
        scores[split] = {
            **generation.score(answers, references),
            "examples": [{"reference": r, "generated": a} for r, a in zip(references[:3], answers[:3])],
        }
        log.info(
            "%s%s, generated: exact match %.1f  F1 %.1f  ROUGE-L %.1f (%d answers)",
            f"{when}, " if when else "",
            split,
            scores[split]["exact_match"],
            scores[split]["f1"],
            scores[split]["rouge_l"],
            scores[split]["answers"],
        )
    return scores


@contextlib.contextmanager
def _run_folder(recipe: Recipe, accelerator: Accelerator, overwrite: bool, resume: bool) -> Iterator[Path]:
    """atomic.building, for one process or several: every process checks the folder (so a refusal comes from
    all of them at once), then the main process alone creates it, and renames (or removes) it once every
    process is done with it. The others log only errors: the main process logs the same things."""
    atomic.check(recipe.output_dir, overwrite, keep_failed=True, resume=resume)
    accelerator.wait_for_everyone()  # before the folder is created or replaced
    if accelerator.is_main_process:
        with atomic.building(recipe.output_dir, overwrite, keep_failed=True, resume=resume) as run_dir:
            yield run_dir
            accelerator.wait_for_everyone()
        return
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield atomic.partial_of(recipe.output_dir)
        accelerator.wait_for_everyone()
    finally:
        log.setLevel(level)


def _resume_point(run_dir: Path, recipe: Recipe) -> Path | None:
    """The checkpoint to continue from; the recipe must be the interrupted run's, or the result would be neither
    run's."""
    found = checkpoint.intact(run_dir)
    if found is None:
        log.info("--resume: %s has no checkpoint yet; starting from the beginning", run_dir)
        return None
    saved = run_dir / RECIPE
    before, now = (saved.read_text(encoding="utf-8") if saved.is_file() else None), recipe.to_yaml()
    if before is not None and before != now:
        import yaml

        changed = _differences(yaml.safe_load(before), yaml.safe_load(now))
        raise UserError(
            f"--resume: the recipe differs from the one the interrupted run in {run_dir} used ({saved}): "
            f"{'; '.join(changed[:6]) or 'its text'}; resume with the same recipe and overrides, or pass --overwrite "
            "to start over"
        )
    return found


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """'key: old -> new' for every dotted key whose value differs ('(none)' where a side lacks it: e.g. a recipe
    written by an older peftkit, before a key existed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in sorted(old.keys() | new.keys(), key=str)
            for line in _differences(old.get(key, "(none)"), new.get(key, "(none)"), f"{path}{key}.")
        ]
    return [] if old == new else [f"{path.rstrip('.')}: {old} -> {new}"]


def _warn_if_too_big(recipe: Recipe, processes: int) -> None:
    """One warning line before a GPU run whose estimated peak exceeds the free device memory; never blocks (an
    estimate that fails is only logged)."""
    try:
        line = estimate.warning(recipe, processes, device="cuda")
    except Exception as err:  # noqa: BLE001 - a forecast must not stop the run it forecasts
        log.debug("memory estimate failed: %s: %s", type(err).__name__, err)
        return
    if line:
        log.warning("%s", line)


def _memory_knobs(recipe: Recipe) -> str:
    """What lowers peak memory, with this recipe's current values."""
    cfg = recipe.train
    knobs = [
        f"lower train.batch_size ({cfg.batch_size}; raise train.grad_accum to keep the effective batch of "
        f"{cfg.batch_size * cfg.grad_accum})",
        f"lower task.max_length ({recipe.task.max_length})",
    ]
    if not cfg.gradient_checkpointing:
        knobs.append("set train.gradient_checkpointing: true")
    if recipe.quantization is None and recipe.method.name != "full":
        knobs.append("load the frozen base in 8 or 4 bits (quantization.bits)")
    if cfg.precision in ("auto", "fp32"):
        knobs.append("train.precision: bf16 where the machine supports it")
    if recipe.method.name == "full":
        knobs.append("a parameter-efficient method instead of full fine-tuning (method.name: lora)")
    knobs.append(f"lower eval.batch_size ({recipe.eval.batch_size}) if it ran out while evaluating")
    return "; ".join(knobs)


def _check_encoded(encoded: DatasetDict, recipe: Recipe) -> None:
    """Nothing to learn from, or less than one batch: said before any time is spent."""
    for name, split in encoded.items():
        if len(split) == 0:
            raise UserError(
                f"data: the {name} split has no examples left after the {recipe.task.type} task's "
                "preprocessing (see the log for the rows it left out)"
            )
    rows, batch = len(encoded["train"]), recipe.train.batch_size
    if rows < batch:
        log.warning(
            "data: train has %d example(s), fewer than train.batch_size %d: each step trains on all of them",
            rows,
            batch,
        )


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("peftkit")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return handler
