"""`peftkit run`, top to bottom: the whole pipeline in one reading.

recipe -> data (splits, labels) -> base model (+ 8/4-bit) -> method -> train -> evaluate -> export
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import atomic, checkpoint, data, estimate, export, generation, loading, measure, sharding, tracking, train
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

log = logging.getLogger("peftkit")


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Train and export; the run folder appears complete or not at all (`<folder>.partial` while running).
    `resume`: continue an interrupted run from the newest checkpoint in its `.partial` folder.

    Started by torchrun / `accelerate launch` (or `peftkit run --processes N`), every process runs this, each on
    its share of every batch of batches; only the main process writes (and returns the folder; the others
    return None)."""
    from accelerate.utils import set_seed

    task, method = TASKS[recipe.task.type], METHODS[recipe.method.name]
    tracking.check_installed(recipe.train.report_to)  # a missing mlflow / wandb: said now, not after the training
    if train.launched_fsdp():  # `accelerate launch` with an FSDP config: peftkit's own sharding (sharding.py)
        recipe.train.distributed.strategy = "fsdp"
    accelerator = train.make_accelerator(
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
                train.precision_of(accelerator),
                accelerator.device,
                f", {accelerator.num_processes} processes" if accelerator.num_processes > 1 else "",
            )
            tracked = tracking.start(recipe, accelerator, run_dir, resumed=resume_from is not None)
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
            steps = train.total_steps(len(splits["train"]), recipe.train, accelerator.num_processes)
            sharded = sharding.applies(recipe, accelerator.num_processes)
            if sharded:
                sharding.refuse_unsupported(recipe, method)
            timeline.mark("model")
            tokenizer, model = loading.adapted_model(  # sharded: the main process's weights only (sharding.shard)
                recipe, task, labels, accelerator.device, train.precision_of(accelerator), steps, sharded and not main
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
            generated = {}
            collate = task.collator(tokenizer)
            before = {}
            if recipe.eval.before_training and resume_from is None:
                timeline.mark("scored before training")
                model.to(accelerator.device)
                for split in recipe.eval.splits:
                    with accelerator.autocast():  # the model is not prepared yet: a half-precision base needs it
                        before[split] = train.evaluate(
                            model,
                            train.eval_loader(encoded[split], collate, recipe, accelerator),
                            task,
                            labels,
                            accelerator,
                            recipe.task,
                        )
                    log.info("before training, %s: %s", split, train.short(before[split]))
            if prompts and resume_from is None:
                model.to(accelerator.device)
                with accelerator.autocast():
                    generated["before_training"] = _generate(model, tokenizer, prompts, recipe, main, "before training")
            job = train.Job(
                model, encoded, collate, task, recipe, accelerator, labels, method, run_dir, tracked, timeline
            )
            timeline.mark("training")
            result = train.fit(job, resume=resume_from)
            memory["train_peak"] = measure.peak_memory(accelerator.device)  # training and its validation passes
            if accelerator.num_processes > 1:  # each process's own peaks (the ones above: the main process's)
                from accelerate.utils import gather_object

                memory["per_process"] = gather_object(
                    [
                        {
                            "process": accelerator.process_index,
                            "load_peak": memory["load_peak"],
                            "train_peak": memory["train_peak"],
                        }
                    ]
                )

            timeline.mark("final scores")
            final = {}
            for split in recipe.eval.splits:
                final[split] = _scored_in_training(result, split)
                if final[split] is None:
                    loader = train.eval_loader(encoded[split], collate, recipe, accelerator)
                    final[split] = train.evaluate(model, loader, task, labels, accelerator, recipe.task)
                log.info("%s: %s", split, train.short(final[split]))
            if prompts:
                with accelerator.autocast():
                    generated.update(_generate(accelerator.unwrap_model(model), tokenizer, prompts, recipe, main))
            tracked.final(result["steps"], final)
            # a model that answers one class whatever the input learned nothing: said last, loudly (the CLI: red)
            trained = recipe.train.model_copy(update={"lr": result["lr"]})  # train.lr auto: the rate it chose
            warnings = [
                f"{split}: {train.collapse_message(final[split], trained)}"
                for split in recipe.eval.splits
                if "collapsed_to" in final[split]
            ]
            for warning in warnings:
                log.warning("%s", warning)

            # a sharded model's trained tensors, gathered whole: a collective, so by every process
            gathered = trainable_tensors(model) if sharding.is_sharded(model) else None
            if not main:
                return None
            timeline.mark("export")
            adapter_dir = run_dir / ADAPTER
            export.save_adapter(accelerator.unwrap_model(model), tokenizer, adapter_dir, recipe, labels, gathered)
            metrics = {
                **final,
                **({"before_training": before} if before else {}),
                **({"generation": generated} if generated else {}),
                **counts,
                "adapter_bytes": export.adapter_bytes(adapter_dir),
                "train": result,
                "precision": train.precision_of(accelerator),
                "device": str(accelerator.device),
                "memory": memory,
                **({"warnings": warnings} if warnings else {}),
            }
            timeline.stop()
            timeline.save(run_dir / MEMORY, run_dir / MEMORY_PLOT)
            atomic.write_text(run_dir / METRICS, json.dumps(metrics, indent=2))
            checkpoint.remove(run_dir)  # finished: the adapter is what remains
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
    return recipe.output_dir


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


def _scored_in_training(result: dict, split: str) -> dict | None:
    """The metrics of `split` from the evaluation during training of the weights the model ends with (the best
    evaluation's, or the last one), so that pass is not run twice."""
    history = result["history"]
    kept = result["best_step"] or (history[-1]["step"] if history else None)
    if result["best_step"] is None and history and history[-1]["step"] != result["steps"]:
        return None  # the last weights were never scored during training
    return next((entry.get(split) for entry in reversed(history) if entry["step"] == kept), None)


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("peftkit")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return handler
