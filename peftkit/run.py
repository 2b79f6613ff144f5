"""`peftkit run`, top to bottom: the whole pipeline in one reading.

    recipe -> data (splits, labels) -> base model (+ 8/4-bit) -> method -> train -> evaluate -> export
"""

import contextlib
import json
import logging
from pathlib import Path

from peftkit import assets, atomic, bench, data, export, train
from peftkit.errors import UserError, is_out_of_memory, out_of_memory
from peftkit.methods import METHODS, base
from peftkit.methods.base import Context
from peftkit.recipe import Recipe, load_recipe
from peftkit.tasks import TASKS

log = logging.getLogger("peftkit")


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Train and export; the run folder appears complete or not at all (`<folder>.partial` while running).
    `resume`: continue an interrupted run from the newest checkpoint in its `.partial` folder.

    Started by torchrun / `accelerate launch` (or `peftkit run --processes N`), every process runs this, each on
    its share of every batch of batches; only the main process writes (and returns the folder; the others
    return None)."""
    from accelerate.utils import set_seed

    from peftkit import checkpoint

    task, method = TASKS[recipe.task.type], METHODS[recipe.method.name]
    accelerator = train.make_accelerator(recipe.train.precision, recipe.train.grad_accum)
    set_seed(recipe.train.seed)
    main = accelerator.is_main_process
    with _run_folder(recipe, accelerator, overwrite, resume) as run_dir:
        handler = _log_to_file(run_dir / "train.log") if main else logging.NullHandler()
        try:
            resume_from = _resume_point(run_dir, recipe) if resume else None
            if main and resume_from is None:  # a resumed run's is the same (checked), and other processes read it
                atomic.write_text(run_dir / "recipe.yaml", recipe.to_yaml())
            log.info("run %s -> %s (precision %s, device %s%s)", recipe.name, recipe.output_dir,
                     train.precision_of(accelerator), accelerator.device,
                     f", {accelerator.num_processes} processes" if accelerator.num_processes > 1 else "")  # fmt: skip
            splits, labels = data.load(recipe.data, task)
            missing = [s for s in recipe.eval.splits if s not in splits]
            if missing:
                raise UserError(f"eval.splits: no {', '.join(missing)} split (the data has {', '.join(splits)})")

            start = None
            if recipe.model.adapter:  # continue from a published adapter: checked before minutes of loading
                from peftkit import hub

                with accelerator.main_process_first():  # one download, which the other processes then find
                    start = hub.starting_adapter(recipe, labels)
            tokenizer, model = load_base(recipe, task, labels, accelerator.device, train.precision_of(accelerator))
            if recipe.train.gradient_checkpointing:
                # Non-reentrant: the reentrant variant drops gradients when the checkpointed block's inputs do
                # not require grad, which is the case with a frozen (e.g. quantised) base.
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            steps = train.total_steps(len(splits["train"]), recipe.train, accelerator.num_processes)
            context = method_context(recipe, task, model, steps)
            model = method.apply(model, recipe.method, context)
            base.trainable_in_fp32(model)  # a bf16 base (model.dtype) left the copied task head in bf16
            if start is not None:
                hub.load_start(model, start, recipe.model.adapter)
            tokenizer.padding_side = getattr(model, "peftkit_padding_side", tokenizer.padding_side)  # base.py
            counts = {**bench.parameter_counts(model), "flops_per_token": bench.training_flops_per_token(model)}
            memory = {"model_mib": bench.model_mib(model), "load_peak": bench.peak_memory(accelerator.device),
                      "after_load": bench.memory_now(accelerator.device)}  # fmt: skip
            bench.reset_peak_memory(accelerator.device)
            log.info("trainable parameters: %s of %s (%.3f%%)", f"{counts['trainable_params']:,}",
                     f"{counts['total_params']:,}", 100 * counts["trainable_share"])  # fmt: skip

            encoded = task.preprocess(splits, tokenizer, recipe.task)
            _check_encoded(encoded, recipe)
            collate = task.collator(tokenizer)
            before = {}
            if recipe.eval.before_training and resume_from is None:
                model.to(accelerator.device)
                for split in recipe.eval.splits:
                    with accelerator.autocast():  # the model is not prepared yet: a half-precision base needs it
                        before[split] = train.evaluate(model, _eval_loader(encoded[split], collate, recipe,
                                                       accelerator), task, labels, accelerator, recipe.task)  # fmt: skip
                    log.info("before training, %s: %s", split, train.short(before[split]))
            job = train.Job(model, encoded, collate, task, recipe, accelerator, labels, method, run_dir=run_dir)
            result = train.fit(job, resume=resume_from)
            memory["train_peak"] = bench.peak_memory(accelerator.device)  # training and its validation passes

            final = {}
            for split in recipe.eval.splits:
                final[split] = _scored_in_training(result, split)
                if final[split] is None:
                    loader = _eval_loader(encoded[split], collate, recipe, accelerator)
                    final[split] = train.evaluate(model, loader, task, labels, accelerator, recipe.task)
                log.info("%s: %s", split, train.short(final[split]))

            if not main:
                return None
            adapter_dir = run_dir / "adapter"
            export.save_adapter(accelerator.unwrap_model(model), tokenizer, adapter_dir, recipe, labels)
            metrics = {
                **final,
                **({"before_training": before} if before else {}),
                **counts,
                "adapter_bytes": export.adapter_bytes(adapter_dir),
                "train": result,
                "precision": train.precision_of(accelerator),
                "device": str(accelerator.device),
                "memory": memory,
            }
            atomic.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
            checkpoint.remove(run_dir)  # finished: the adapter is what remains
        except BaseException as err:
            log.debug("run failed: %s: %s", type(err).__name__, err)  # debug: the log file only; the CLI prints it
            if is_out_of_memory(err):
                raise out_of_memory(accelerator.device, _memory_knobs(recipe)) from err
            raise
        finally:
            logging.getLogger("peftkit").removeHandler(handler)
            handler.close()
    return recipe.output_dir


@contextlib.contextmanager
def _run_folder(recipe: Recipe, accelerator, overwrite: bool, resume: bool):
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
    from peftkit import checkpoint

    found = checkpoint.latest(run_dir)
    if found is None:
        log.info("--resume: %s has no checkpoint yet; starting from the beginning", run_dir)
        return None
    saved = run_dir / "recipe.yaml"
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


def _differences(old, new, path: str = "") -> list[str]:
    """'key: old -> new' for every dotted key whose value differs ('(none)' where a side lacks it: e.g. a recipe
    written by an older peftkit, before a key existed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(old.keys() | new.keys(), key=str)
                for line in _differences(old.get(key, "(none)"), new.get(key, "(none)"), f"{path}{key}.")]  # fmt: skip
    return [] if old == new else [f"{path.rstrip('.')}: {old} -> {new}"]


def _memory_knobs(recipe: Recipe) -> str:
    """What lowers peak memory, with this recipe's current values."""
    cfg = recipe.train
    knobs = [f"lower train.batch_size ({cfg.batch_size}; raise train.grad_accum to keep the effective batch of "
             f"{cfg.batch_size * cfg.grad_accum})", f"lower task.max_length ({recipe.task.max_length})"]  # fmt: skip
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


def _check_encoded(encoded, recipe: Recipe) -> None:
    """Nothing to learn from, or less than one batch: said before any time is spent."""
    for name, split in encoded.items():
        if len(split) == 0:
            raise UserError(f"data: the {name} split has no examples left after the {recipe.task.type} task's "
                            "preprocessing (see the log for the rows it left out)")  # fmt: skip
    rows, batch = len(encoded["train"]), recipe.train.batch_size
    if rows < batch:
        log.warning("data: train has %d example(s), fewer than train.batch_size %d: each step trains on all of them",
                    rows, batch)  # fmt: skip


def _scored_in_training(result: dict, split: str) -> dict | None:
    """The metrics of `split` from the epoch-end pass over the weights the model ends with (the best epoch's, or
    the last one's), so that pass is not run twice."""
    history = result["history"]
    kept = result["best_epoch"] or (history[-1]["epoch"] if history else None)
    return next((entry.get(split) for entry in history if entry["epoch"] == kept), None)


def _eval_loader(split, collate, recipe: Recipe, accelerator):
    return accelerator.prepare(train.make_loader(split, collate, recipe.eval.batch_size, False, True, recipe.train.seed))


def method_context(recipe: Recipe, task, model, total_steps: int = 1000) -> Context:
    return Context(
        head_modules=[name for name in task.HEAD_MODULES if hasattr(model, name)],
        peft_task_type=task.PEFT_TASK_TYPE,
        total_steps=total_steps,
        model_path=getattr(model, "name_or_path", None),  # where the base was loaded from
    )


def load_base(recipe: Recipe, task, labels, device, precision: str = "no", dequantize: bool = False,
              inference: bool = False):
    """(tokenizer, model) for the recipe's base model, quantised if the recipe asks, head freshly initialised.
    `dequantize`: load the quantised weights, then turn them back into full-precision layers (for merging).
    `inference`: the model will only predict, so a 4-bit base may take bitsandbytes' inference-only CPU
    layout (quant.cpu_layout); False (the default) for training and for whatever must compute as training did."""
    from transformers import AutoTokenizer

    from peftkit import quant  # light: bitsandbytes is imported only when a recipe quantises

    ref = assets.resolve_model(recipe.model.name)
    common = {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: code from %s will run on this machine", recipe.model.name)
    attn = recipe.model.attn_implementation
    if attn == "auto":
        # Measured (benchmarks/RESULTS.md): under bf16 autocast on CPU, SDPA's flash-attention backward is ~2.5x
        # slower than eager attention; in fp32 on CPU and on GPUs SDPA is as fast or faster.
        attn = "eager" if device.type == "cpu" and precision == "bf16" else "sdpa"
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **common)
        if tokenizer.pad_token is None:  # GPT-2 / Llama tokenizers have none; padding reuses end-of-sequence
            tokenizer.pad_token = tokenizer.eos_token
        kwargs = {**common, "attn_implementation": attn, "dtype": base_dtype(recipe, precision)}
        if recipe.quantization:
            kwargs.update(quant.load_kwargs(recipe.quantization, list(task.HEAD_MODULES), device, precision))
        model = task.load_model(ref, labels, tokenizer, **kwargs)
    except OSError as err:
        raise assets.hub_error("model.name", recipe.model.name, err) from None
    if recipe.quantization:
        model = quant.dequantize(model) if dequantize else quant.prepare(model, inference)
    return tokenizer, model


def base_dtype(recipe: Recipe, precision: str):
    """fp32, or bf16 for a frozen base the method leaves untouched in a bf16 run (model.dtype auto). Under autocast
    every matmul runs in bf16 anyway, so an fp32 base only doubles the base's memory, and is cast again at every
    use (autocast caches its casts of trainable weights only). Not fp16: its range is too small for the residual
    stream of models pretrained in bf16, which fp16 autocast keeps in fp32. A quantised base keeps fp32 for the
    layers that are not quantised, as peft's k-bit preparation wants them."""
    import torch

    method = METHODS[recipe.method.name]
    if (recipe.model.dtype == "fp32" or precision != "bf16" or recipe.quantization
            or getattr(method, "rewrites_base", lambda config: False)(recipe.method)):  # fmt: skip
        return torch.float32
    return torch.bfloat16


def finished_adapter(run_dir: Path) -> tuple[Path, Recipe, dict]:
    """(adapter folder, recipe, peftkit.json: task, method, format, base model, labels) of a finished run or a
    pushed adapter repo; a clear error for anything else."""
    from peftkit.hub import adapter_folder

    run_dir = Path(run_dir)
    adapter_dir = adapter_folder(run_dir)  # adapter/ in a run folder; the root of a pushed or pulled repo
    if adapter_dir is None:
        hint = " (an unfinished run: it has .partial in its name)" if run_dir.name.endswith(".partial") else ""
        raise UserError(f"{run_dir} is not a finished peftkit run folder (adapter/peftkit.json and recipe.yaml) "
                        f"or a pushed adapter repo (peftkit.json and recipe.yaml){hint}")  # fmt: skip
    info = json.loads((adapter_dir / "peftkit.json").read_text(encoding="utf-8"))
    return adapter_dir, load_recipe(run_dir / "recipe.yaml"), info


def load_trained(run_dir: Path, device=None, dequantize: bool = False, recipe: Recipe | None = None,
                 inference: bool = True):
    """(recipe, task, tokenizer, model with its adapter, labels) of a finished run, ready for inference.
    `dequantize`: a quantised base is turned back into full precision first; `recipe` replaces the run's own
    (e.g. without its quantization section, for the adapter on the original full-precision base); `inference`
    False: computing exactly as training did (load_base)."""
    import torch
    from transformers import AutoTokenizer

    adapter_dir, own_recipe, info = finished_adapter(run_dir)
    recipe = recipe or own_recipe
    task, labels = TASKS[recipe.task.type], info["labels"]
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    _, model = load_base(recipe, task, labels, device, dequantize=dequantize, inference=inference)
    model = base.load(model, adapter_dir, method_context(recipe, task, model))
    return recipe, task, tokenizer, model.to(device).eval(), labels


def evaluate_run(run_dir: Path, splits: list[str] | None = None) -> dict:
    """{split: metrics} of a finished run's adapter on its recipe's data (`splits`: default eval.splits), computed
    as in training (no inference-only 4-bit layout), so that they compare with the run's own metrics.json."""
    recipe, task, tokenizer, model, labels = load_trained(run_dir, inference=False)
    data_splits, _ = data.load(recipe.data, task)
    splits = splits or recipe.eval.splits
    if not splits:  # eval.splits: [] scores nothing
        return {}
    missing = [s for s in splits if s not in data_splits]
    if missing:
        raise UserError(f"--split {', '.join(missing)}: the data has only {', '.join(data_splits)}")
    from datasets import DatasetDict

    encoded = task.preprocess(DatasetDict({s: data_splits[s] for s in splits}), tokenizer, recipe.task)  # scored only
    accelerator = train.make_accelerator(recipe.train.precision, 1)
    model = accelerator.prepare(model)
    return {split: train.evaluate(model, _eval_loader(encoded[split], task.collator(tokenizer), recipe, accelerator),
                                  task, labels, accelerator, recipe.task) for split in splits}  # fmt: skip


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("peftkit")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return handler
