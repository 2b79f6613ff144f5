"""The one training loop, on accelerate: AdamW, warmup + decay, gradient accumulation, clipping, mixed
precision, evaluation each epoch, and the best trainable weights (by eval.metric_for_best) kept in memory.

The same loop runs on one CPU, one GPU, or several processes started by `accelerate launch` / torchrun.
"""

import logging
import math
from pathlib import Path

from peftkit import bench, cpu_kind
from peftkit.errors import UserError

log = logging.getLogger("peftkit")

LOWER_IS_BETTER = {"loss", "perplexity"}


def resolve_precision(choice: str, device) -> str:
    """'auto' -> bf16 where the hardware computes it natively, else fp32. On a CPU without AMX or AVX512-BF16,
    bf16 matmuls are emulated and hundreds of times slower than fp32 (measured: benchmarks/RESULTS.md); which
    kind of CPU this is, cpu_kind.py says (PEFTKIT_CPU_BF16 overrides it)."""
    import torch

    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_kind.cpu_bf16_native() else "fp32"
    return "fp32"


def precision_of(accelerator) -> str:
    """bf16 / fp16 / fp32 (accelerate calls full precision "no")."""
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def make_accelerator(precision_choice: str, grad_accum: int, cpu: bool = False):
    import torch
    from accelerate import Accelerator

    device = torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")
    precision = resolve_precision(precision_choice, device)
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]
    # The scheduler is stepped once per optimizer step, whatever the number of processes (accelerate's default
    # steps it once per process, for schedules planned in single-process steps); fit() plans in per-process steps.
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=grad_accum, cpu=device.type == "cpu",
                              step_scheduler_with_optimizer=False)  # fmt: skip
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        # Saving the adapter, the best epoch's weights and checkpoints happens on the main process from its own
        # copy: right under DDP, wrong under sharding (FSDP's full state dict and ZeRO's optimizer partitions
        # need every process). Refused rather than saved wrong until that is written and tested.
        raise UserError(f"accelerate config: {accelerator.distributed_type.name} is not supported by peftkit yet "
                        "(the adapter is saved from the main process's weights, which sharding splits); use data "
                        "parallelism (DDP: `peftkit run RECIPE --processes N`, or `accelerate launch --multi_gpu`), "
                        "and an 8/4-bit base when the model does not fit on one GPU")  # fmt: skip
    return accelerator


def make_loader(dataset, collate, batch_size: int, shuffle: bool, group_by_length: bool, seed: int, generator=None):
    """Batches padded to their own longest example; grouping similar lengths keeps that padding small.
    `generator`: the shuffle's random source, for a caller that keeps it (fit checkpoints its state); by default a
    new one seeded with `seed`."""
    import torch
    from torch.utils.data import DataLoader

    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    lengths = [len(ids) for ids in dataset["input_ids"]] if group_by_length else None
    if shuffle and group_by_length:
        # transformers' sampler: shuffle, then sort within mega-batches of 50 batches, so each batch holds
        # similar lengths while the order stays random.
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    if group_by_length:  # evaluation: order does not matter, so sort outright
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)


def total_steps(train_rows: int, cfg, processes: int = 1) -> int:
    """Optimizer steps of a run: what the scheduler, and AdaLoRA's rank budget, plan over. With several
    processes each takes its own train.batch_size per step, so an epoch has `processes` times fewer steps."""
    batches = math.ceil(train_rows / (cfg.batch_size * processes))
    return cfg.max_steps or cfg.epochs * math.ceil(batches / cfg.grad_accum)


def fit(model, splits, collate, task, recipe, accelerator, labels, method=None, run_dir: Path | None = None,
        resume: Path | None = None) -> dict:
    """Train `model` (already wrapped by its method) in place; returns the history and throughput.
    `method`: the method's module, for its optional hooks (methods/__init__.py): `after_optimizer_step` runs after
    each optimizer step, before gradients are cleared (AdaLoRA); RESTORE_BEST_EPOCH False ends with the last
    epoch's trainable weights instead of the best validation epoch's; `training_state` goes into checkpoints.
    `run_dir`: where checkpoints go (train.checkpoint_every, and every epoch end); `resume`: a checkpoint to
    continue from, so that the result is the one the uninterrupted run would have given (bit for bit in one
    process; with several, the checkpoint holds the main process's random state, which all of them resume
    with, so dropout masks differ from the uninterrupted run's)."""
    import torch
    from transformers import get_scheduler

    from peftkit import checkpoint
    from peftkit.methods.base import load_trainable, trainable_tensors

    cfg = recipe.train
    after_step = getattr(method, "after_optimizer_step", None)
    restore_best = getattr(method, "RESTORE_BEST_EPOCH", True)
    state_of = getattr(method, "training_state", None)
    generator = torch.Generator().manual_seed(cfg.seed)  # the shuffle's: checkpoints hold its state
    train_loader = make_loader(splits["train"], collate, cfg.batch_size, True, cfg.group_by_length, cfg.seed,
                               generator=generator)  # fmt: skip
    val_loader = (
        make_loader(splits["validation"], collate, recipe.eval.batch_size, False, True, cfg.seed)
        if "validation" in splits
        else None
    )
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)  # biases and norms take no weight decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total = total_steps(len(splits["train"]), cfg, accelerator.num_processes)
    epochs = math.ceil(total / steps_per_epoch)
    scheduler_name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)
    scheduler = get_scheduler(scheduler_name, optimizer, int(cfg.warmup_ratio * total), total)
    scheduler = accelerator.prepare(scheduler)

    best_name = recipe.eval.metric_for_best
    sign = -1 if best_name in LOWER_IS_BETTER else 1
    best_score, best_state, best_epoch = -math.inf, None, None
    history, meter, step, first_epoch, skip, rng = [], bench.Throughput(), 0, 1, 0, None
    inner = accelerator.unwrap_model(model)  # parameter names without DDP's "module." prefix
    if resume is not None:
        done = checkpoint.load(resume, inner, optimizer, scheduler, accelerator.scaler)
        theirs = done.get("processes", 1)
        if theirs != accelerator.num_processes:  # its batch positions and schedule were planned for theirs
            raise UserError(f"--resume: {resume} was written by a run in {theirs} process(es), this one has "
                            f"{accelerator.num_processes}; resume with --processes {theirs}, or pass --overwrite "
                            "to start over")  # fmt: skip
        if done["method_state"] is not None:
            method.load_training_state(inner, done["method_state"])
        step, first_epoch, skip, history = done["step"], done["epoch"], done["batches"], done["history"]
        best_score, best_epoch, best_state = done["best_score"], done["best_epoch"], done["best_state"]
        generator.set_state(done["rng"]["data_generator"])
        rng = done["rng"]
        log.info("resumed from %s: step %d of %d, epoch %d", resume.name, step, total, first_epoch)
    log.info("training: %d epoch(s), %d optimizer steps, %d per epoch", epochs, total, steps_per_epoch)

    def save_checkpoint(epoch: int, batches: int, epoch_generator_state) -> None:
        # a checkpoint is only ever written of a healthy run: the losses since the last log, and the weights
        params = [p for p in model.parameters() if p.requires_grad]
        finite = torch.stack([p.detach().isfinite().all() for p in params]).all().item()
        _check_finite(mean_loss(running, seen) if finite else math.nan, step, run_dir, cfg, precision_of(accelerator))
        progress = {"step": step, "epoch": epoch, "batches": batches, "history": history,
                    "best_score": best_score, "best_epoch": best_epoch, "processes": accelerator.num_processes}  # fmt: skip
        if accelerator.is_main_process:  # the weights are the same in every process (gradients are averaged)
            method_state = state_of(inner) if state_of is not None else None
            checkpoint.save(run_dir, cfg.keep_checkpoints, inner, optimizer, scheduler, accelerator.scaler,
                            epoch_generator_state, progress, best_state, method_state)  # fmt: skip
        accelerator.wait_for_everyone()

    def mean_loss(running, seen: int) -> float:
        # the mean over every process (one all-reduce), so that each process takes the same NaN decision
        return accelerator.reduce(running, "mean").item() / seen if seen else 0.0

    scalars = _scalar_writer(run_dir, cfg.tensorboard and accelerator.is_main_process)
    with _progress(accelerator) as progress, scalars:
        bar = progress.add_task("train", total=total, completed=step, loss=float("nan"), rate="")
        for epoch in range(first_epoch, epochs + 1):
            if step >= total:
                break
            if rng is not None and skip == 0:  # resuming at an epoch boundary
                checkpoint.restore_rng(rng)
                rng = None
            epoch_generator_state = generator.get_state()  # before this epoch's shuffle draws from it
            model.train()
            running, seen = torch.zeros((), device=accelerator.device), 0
            for index, batch in enumerate(train_loader):
                if index < skip:  # resuming mid-epoch: these batches were trained on before the interruption
                    continue
                if rng is not None:  # ... and the random state is the one the interrupted run had here
                    checkpoint.restore_rng(rng)
                    rng = None
                with accelerator.accumulate(model):
                    loss = model(**model_inputs(batch)).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                        if after_step is not None:
                            after_step(inner, step + 1)
                    optimizer.zero_grad(set_to_none=True)
                running += loss.detach()
                seen += 1
                meter.update(batch)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if step % cfg.log_every == 0 or step == total:
                    loss_now = mean_loss(running, seen)  # the only host sync: once per log interval
                    _check_finite(loss_now, step, run_dir, cfg, precision_of(accelerator))
                    rates = meter.rates(accelerator)
                    rate = f"{rates['samples_per_s']:.3g} samples/s, {rates['tokens_per_s']:.4g} tok/s"
                    progress.update(bar, loss=loss_now, rate=rate)
                    log.debug("step %d  loss %.4f  lr %.2e  %s", step, loss_now, scheduler.get_last_lr()[0], rate)
                    scalars.add(step, {"train/loss": loss_now, "train/lr": scheduler.get_last_lr()[0],
                                       "train/samples_per_s": rates["samples_per_s"],
                                       "train/tokens_per_s": rates["tokens_per_s"]})  # fmt: skip
                    running, seen = torch.zeros((), device=accelerator.device), 0
                progress.update(bar, advance=1)
                if step >= total:
                    break
                if run_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    with meter.paused():
                        save_checkpoint(epoch, index + 1, epoch_generator_state)
            skip = 0
            entry = {"epoch": epoch, "step": step}
            if val_loader is not None:
                with meter.paused():  # throughput is the training's own
                    entry["validation"] = evaluate(model, val_loader, task, labels, accelerator, recipe.task)
                score = sign * entry["validation"][best_name]
                if score > best_score and restore_best:
                    best_score, best_epoch = score, epoch
                    best_state = trainable_tensors(inner)
                log.info("epoch %d: %s", epoch, short(entry["validation"]))
                scalars.add(step, {f"validation/{k}": v for k, v in entry["validation"].items()})
            history.append(entry)
            if run_dir is not None and step < total:
                with meter.paused():
                    save_checkpoint(epoch + 1, 0, generator.get_state())

    if best_state is not None:
        load_trainable(inner, best_state, f"the adapter of epoch {best_epoch}")
        log.info("kept the adapter of epoch %d (best validation %s)", best_epoch, best_name)
    rates = meter.rates(accelerator)
    return {"history": history, "best_epoch": best_epoch, "steps": step, **rates, "processes": accelerator.num_processes}


class _Scalars:
    """TensorBoard scalars in <run>/tensorboard, or nothing (turned off, no run folder, package missing)."""

    def __init__(self, writer=None):
        self.writer = writer

    def add(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(tag, value, step)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalar_writer(run_dir: Path | None, wanted: bool) -> _Scalars:
    if not wanted or run_dir is None:
        return _Scalars()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        log.info("TensorBoard scalars skipped: the tensorboard package is not installed "
                 "(pip install 'peftkit[tensorboard]', or set train.tensorboard: false)")  # fmt: skip
        return _Scalars()
    return _Scalars(SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard")))


def evaluate(model, loader, task, labels, accelerator, config) -> dict:
    """The task's metrics over a whole split (`config`: the recipe's task section); predictions gathered from
    every process exactly once."""
    import torch

    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for batch in loader:
            preds, refs = task.eval_outputs(model(**model_inputs(batch)), batch)
            # per-position outputs: the processes' batches differ in length; padded positions are never scored
            preds, refs = (accelerator.pad_across_processes(t, dim=t.ndim - 1, pad_index=-100) if t.ndim > 1 else t
                           for t in (preds, refs))  # fmt: skip
            preds, refs = accelerator.gather_for_metrics((preds, refs))
            predictions.extend(preds.cpu().tolist())
            references.extend(refs.cpu().tolist())
    model.train()
    # rows: how many encoded rows were scored (QA: windows) — the split's size, whatever the process count
    return {**task.compute_metrics(predictions, references, labels, config, loader.dataset), "rows": len(predictions)}


def model_inputs(batch) -> dict:
    """The batch without the task's bookkeeping columns (meta_*: e.g. which QA window a row is)."""
    return {k: v for k, v in batch.items() if not k.startswith("meta_")}


def _check_finite(loss: float, step: int, run_dir: Path | None, cfg, precision: str) -> None:
    """Stop a diverged run, naming the likely causes and the last good checkpoint (the run folder is kept)."""
    if math.isfinite(loss):
        return
    from peftkit import checkpoint

    causes = [f"a learning rate too high for this method (train.lr {cfg.lr:g}: try 3-10x lower, or a longer "
              f"train.warmup_ratio than {cfg.warmup_ratio:g})"]  # fmt: skip
    if precision == "fp16":
        causes.append("fp16 overflow (train.precision: bf16 or fp32)")
    if not cfg.max_grad_norm:
        causes.append("no gradient clipping (set train.max_grad_norm, e.g. 1.0)")
    causes.append("extreme values in the data")
    kept = checkpoint.latest(run_dir) if run_dir is not None else None
    where = (f"the last good checkpoint, {kept}, is kept (its weights are finite)" if kept is not None
             else "no checkpoint was written before it")  # fmt: skip
    raise UserError(
        f"the training loss (or the trained weights) became {loss} at step {step}; the run stopped and {where}. "
        f"Likely causes: {'; '.join(causes)}."
    )


def short(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _progress(accelerator):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
    )
