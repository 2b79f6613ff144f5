"""The one training loop, on accelerate: AdamW, warmup + decay, gradient accumulation, clipping, mixed
precision, evaluation each epoch, the best trainable weights (by eval.metric_for_best) kept in memory, and
train.recover's rollbacks (recovery.py).

The same loop runs on one CPU, one GPU, or several processes started by `accelerate launch` / torchrun.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import batches, checkpoint, devices, evaluation, lr_search, measure, progress, recovery, sharding
from peftkit.errors import UserError
from peftkit.methods.base import Method, load_trainable, optional, trainable_tensors
from peftkit.run_folder import LR_SEARCH
from peftkit.tasks.common import Task
from peftkit.tracking import Tracking
from peftkit.training_state import Optimization, TrainingState

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from datasets import Dataset

    from peftkit.recipe import Recipe, TrainSection

log = logging.getLogger("peftkit")


@dataclass
class Job:
    """What fit() is given: fixed for the whole run."""

    model: torch.nn.Module  # already wrapped by its method
    splits: Mapping[str, Dataset]  # encoded: "train", and "validation" when there is one to score each epoch
    collate: Callable
    task: Task  # eval_outputs, compute_metrics
    recipe: Recipe
    accelerator: Accelerator
    labels: list[str] | None  # the task's label names (None for tasks without: causal_lm)
    method: Method | None = None  # the method's module, for its optional hooks (MethodHooks)
    run_dir: Path | None = None  # where checkpoints go (train.checkpoint_every, and every epoch end); None: nowhere
    tracking: Tracking = field(default_factory=Tracking)  # where the numbers go besides train.log (default nowhere)
    timeline: measure.MemoryTimeline | None = None  # where the loop marks its evaluations (default: not kept)


@dataclass(frozen=True)
class MethodHooks:
    """The optional hooks of a method (methods/base.py OPTIONAL) that the loop calls: `after_optimizer_step` runs
    after each optimizer step, before gradients are cleared (AdaLoRA); `restore_best_epoch` False ends with the
    last epoch's trainable weights instead of the best validation epoch's; `training_state` goes into
    checkpoints and `load_training_state` puts it back."""

    after_optimizer_step: Callable | None = None
    restore_best_epoch: bool = True
    training_state: Callable | None = None
    load_training_state: Callable | None = None

    @classmethod
    def of(cls, method: Method | None) -> MethodHooks:
        if method is None:
            return cls()
        names = ("after_optimizer_step", "RESTORE_BEST_EPOCH", "training_state", "load_training_state")
        return cls(*(optional(method, name) for name in names))


def fit(job: Job, resume: Path | None = None) -> dict:
    """Train `job.model` in place; returns the history of evaluations, the kept one, the steps and the throughput.
    `resume`: a checkpoint to continue from, so that the result is the one the uninterrupted run would have given
    (bit for bit in one process; with several, the checkpoint holds the main process's random state, which all of
    them resume with, so dropout masks differ from the uninterrupted run's)."""
    loop = _Loop(job)
    searched = loop.choose_lr(resumed=resume is not None)
    state = loop.resume(resume) if resume is not None else TrainingState(processes=job.accelerator.num_processes)
    loop.remember(state)  # train.recover's first good state: the start, or the checkpoint resumed from
    log.info("training: %d epoch(s), %d optimizer steps, %d per epoch", loop.epochs, loop.total, loop.steps_per_epoch)
    with progress.bar(job.accelerator) as shown:
        report = progress.Report(shown, job.tracking, loop.total, state.step)
        while state.epoch <= loop.epochs and state.step < loop.total and not state.stopped:
            try:
                loop.train_epoch(state, report)
                loop.end_epoch(state, report)
            except _RolledBack:  # raised from deep in an epoch: `state` is the last good one again, train on from it
                report.rewind(state.step)
    kept = loop.keep_best(state)
    rates = loop.meter.rates(job.accelerator)
    search = None
    if searched is not None:  # its cost, beside the training's (the meter pauses while it runs)
        search = {**searched.summary(), "share": round(searched.seconds / (searched.seconds + rates["seconds"]), 3)}
        log.info(
            "the learning-rate search took %.1f s, %.0f%% of the time spent training",
            searched.seconds,
            100 * search["share"],
        )
    return {
        "history": state.history,
        "best_epoch": state.best_epoch if kept else None,  # the evaluation whose weights the model ends with
        "best_step": state.best_step if kept else None,  # (None: the last weights)
        "stopped_early": state.stopped,
        "steps": state.step,
        # the peak rate trained with: the recipe's, or the one train.lr auto chose, halved by each rollback
        "lr": loop.now(state).lr,
        **({"recoveries": state.recoveries} if loop.recover is not None else {}),
        **({"lr_search": search} if search is not None else {}),
        **rates,
        "processes": job.accelerator.num_processes,
    }


def kept_scores(result: dict, split: str) -> dict | None:
    """The metrics of `split` from fit's own evaluation of the weights the model ends with (the best
    evaluation's, or the last one), or None where those weights were never scored during training."""
    history = result["history"]
    kept = result["best_step"] or (history[-1]["step"] if history else None)
    if result["best_step"] is None and history and history[-1]["step"] != result["steps"]:
        return None  # the last weights were never scored during training
    return next((entry.get(split) for entry in reversed(history) if entry["step"] == kept), None)


class _RolledBack(Exception):
    """train.recover put the run back to its last good state: the epoch under way ends here (fit goes on)."""


class _Loop:
    """One run's training, wired once: the prepared model, optimizer, scheduler and loaders, the schedule, the
    throughput meter. Its methods advance a TrainingState, which they are given; they keep none of their own but
    train.recover's last good state (`good`, in memory only)."""

    def __init__(self, job: Job) -> None:
        import torch

        cfg, accelerator = job.recipe.train, job.accelerator
        self.job, self.cfg, self.hooks = job, cfg, MethodHooks.of(job.method)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the shuffle's: checkpoints hold its state
        train_loader = batches.make_loader(
            job.splits["train"],
            job.collate,
            cfg.batch_size,
            True,
            cfg.group_by_length,
            cfg.seed,
            generator=self.generator,
        )
        val_loader = (
            batches.make_loader(
                job.splits["validation"], job.collate, job.recipe.eval.batch_size, False, True, cfg.seed
            )
            if "validation" in job.splits
            else None
        )
        self.sharded = sharding.is_sharded(job.model)  # run.py sharded it as it loaded it (strategy fsdp)
        if self.sharded:  # the optimizer holds the sharded parameters
            optimizer = _optimizer(job.model, cfg)
            self.model = job.model  # not prepared: accelerate would wrap it in DDP
            optimizer, self.train_loader = accelerator.prepare(optimizer, train_loader)
        else:
            optimizer = _optimizer(job.model, cfg)
            self.model, optimizer, self.train_loader = accelerator.prepare(job.model, optimizer, train_loader)
        self.val_loader = accelerator.prepare(val_loader) if val_loader is not None else None

        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.total = batches.total_steps(len(job.splits["train"]), cfg, accelerator.num_processes)
        self.epochs = math.ceil(self.total / self.steps_per_epoch)
        self.optimization = Optimization(optimizer, None, accelerator.scaler)
        if cfg.lr != "auto":
            self._schedule(cfg.lr)
        # parameter names without DDP's "module." prefix (a sharded model keeps its own names)
        self.inner = accelerator.unwrap_model(self.model)
        self.meter, self.losses = measure.Throughput(), _Losses(accelerator)
        self.every = job.recipe.eval.every_steps  # None: evaluate at epoch ends
        self.recover, self.good = cfg.recover, None  # train.recover (None: off) and its last good snapshot
        self.spent_said = False  # whether the log has said that train.recover has no rollback left
        self.on_its_way = False  # the last evaluation collapsed while the loss still fell (recovery.still_learning)
        self.loss = job.task.loss(job.recipe.task, job.splits["train"], job.labels)  # None: the model's own
        stopping = cfg.early_stopping
        if (self.every or stopping) and self.val_loader is None:
            raise UserError(
                f"{'eval.every_steps' if self.every else 'train.early_stopping'} evaluates on a validation split, "
                f"and the data has none ({', '.join(job.splits)}); cut one with data.splits (e.g. {{train: 0.8, "
                "validation: 0.1, test: 0.1}) or remove the setting"
            )

    def _schedule(self, lr: float) -> None:
        """The learning-rate schedule to a peak of `lr` (train.scheduler, after train.warmup_ratio's warm-up)."""
        from transformers import get_scheduler

        cfg, optimizer = self.cfg, self.optimization.optimizer
        for group in optimizer.param_groups:  # the schedule starts from these (torch keeps a set initial_lr)
            group["lr"] = group["initial_lr"] = lr
        name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)
        scheduler = get_scheduler(name, optimizer, int(cfg.warmup_ratio * self.total), self.total)
        self.optimization.scheduler = self.job.accelerator.prepare(scheduler)
        self.cfg = cfg.model_copy(update={"lr": lr})  # messages and the result name the rate trained with

    def choose_lr(self, resumed: bool) -> lr_search.LrSearch | None:
        """train.lr auto: the rate found by the range test (lr_search.py), or, resuming, the one the interrupted run
        found (its run folder keeps it); then the schedule. None for a rate the recipe gives."""
        if self.cfg.lr != "auto":
            return None
        run_dir = self.job.run_dir
        found = lr_search.load(run_dir) if resumed and run_dir is not None else None
        if found is not None:
            log.info("learning rate: %.3g, as the interrupted run's search chose it (%s)", found.lr, LR_SEARCH)
        else:
            if self.job.timeline is not None:
                self.job.timeline.mark("learning-rate search")
            found = self._search_lr()
            if self.job.timeline is not None:
                self.job.timeline.mark("training")
            if run_dir is not None and self.job.accelerator.is_main_process:
                lr_search.save(found, run_dir)
            log.info(
                "learning rate: %.3g, the %s rule's pick over %d search steps (%s; %.1f s)",
                found.lr,
                found.rule,
                len(found.lrs),
                found.stopped,
                found.seconds,
            )
        self._schedule(found.lr)
        return found

    def _search_lr(self) -> lr_search.LrSearch:
        """The range test on this run's model, optimizer and training split; then everything it changed is put back
        (trainable weights, optimizer and fp16 scaler states, random states), so the run trains as it would with
        the chosen rate in its recipe."""
        from accelerate.utils import send_to_device

        accelerator, optimizer, cfg = self.job.accelerator, self.optimization.optimizer, self.cfg
        weights, rng = trainable_tensors(self.inner), checkpoint.rng_now()
        scaler = self.optimization.scaler.state_dict() if self.optimization.scaler is not None else None
        # its own loader and shuffle, not prepared: the run's loader and accelerate's record of it stay untouched
        # (with several processes each searches on the same batches; the gradients they average are alike)
        loader = batches.make_loader(
            self.job.splits["train"], self.job.collate, cfg.batch_size, True, cfg.group_by_length, cfg.seed
        )
        stream = (send_to_device(batch, accelerator.device) for batch in lr_search.cycle(loader))
        self.model.train()

        def step(lr: float) -> float:
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = []
            while True:  # one optimizer step: train.grad_accum batches
                with accelerator.accumulate(self.model):
                    losses.append(self._learn(next(stream)).detach().float())
                    optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    break
            return accelerator.reduce(sum(losses) / len(losses), "mean").item()

        with self.meter.paused():
            found = lr_search.search(step, self.cfg.lr_search)
        load_trainable(self.inner, weights, "the weights before the learning-rate search")
        optimizer.state.clear()  # AdamW starts afresh, as it would have without the search
        if scaler is not None:
            self.optimization.scaler.load_state_dict(scaler)
        checkpoint.restore_rng(rng)
        return found

    def resume(self, folder: Path) -> TrainingState:
        """The state of the checkpoint in `folder`, its weights and optimizer states put in place."""
        accelerator = self.job.accelerator
        state = checkpoint.load(folder, self.inner, self.optimization)
        if state.processes != accelerator.num_processes:  # its batch positions and schedule were planned for theirs
            raise UserError(
                f"--resume: {folder} was written by a run in {state.processes} process(es), this one has "
                f"{accelerator.num_processes}; resume with --processes {state.processes}, or pass "
                "--overwrite to start over"
            )
        if state.method_state is not None:
            self.hooks.load_training_state(self.inner, state.method_state)
            state.method_state = None
        self.generator.set_state(state.data_generator)
        log.info("resumed from %s: step %d of %d, epoch %d", folder.name, state.step, self.total, state.epoch)
        return state

    def train_epoch(self, state: TrainingState, report: progress.Report) -> None:
        """Train on state.epoch's batches from state.batches on (0, or where the interrupted run stopped), until the
        epoch or the run's steps end; checkpoints every train.checkpoint_every steps."""
        if state.rng is not None and state.batches == 0:  # resuming at an epoch boundary
            checkpoint.restore_rng(state.rng)
            state.rng = None
        state.data_generator = self.generator.get_state()  # before this epoch's shuffle draws from it
        self.model.train()
        self.losses.reset()
        for index, batch in enumerate(self.train_loader):
            if index < state.batches:  # resuming mid-epoch: these batches were trained on before the interruption
                continue
            if state.rng is not None:  # ... and the random state is the one the interrupted run had here
                checkpoint.restore_rng(state.rng)
                state.rng = None
            state.batches = index + 1
            if not self.train_batch(state, batch):  # accumulating gradients: no optimizer step yet
                continue
            if state.first_loss is None:  # the untrained model's: what train.recover measures a spike against
                first = self.losses.mean()  # (one host sync, once: step 1's batches alone so far)
                state.first_loss = first if math.isfinite(first) else None
            if state.step % self.cfg.log_every == 0 or state.step == self.total:
                loss = self.losses.mean()  # the only host sync: once per log interval
                if self.recover is not None:
                    state.logged_losses.append(loss)  # what recovery.still_learning reads at the next evaluation
                    wrong = recovery.loss_went_wrong(loss, state.first_loss, self.recover)
                    if wrong is not None:
                        self.roll_back(state, f"step {state.step}: {wrong}")
                precision = devices.precision_of(self.job.accelerator)
                _check_finite(loss, state.step, self.job.run_dir, self.now(state), precision)
                report.step(
                    state.step,
                    loss,
                    self.optimization.scheduler.get_last_lr()[0],
                    self.meter.rates(self.job.accelerator),
                )
                self.losses.reset()
            report.advance()
            if state.step >= self.total:
                break
            evaluated = bool(self.every) and state.step % self.every == 0
            if evaluated:
                self.evaluate(state, report)
                if state.stopped:
                    break
                self.remember(state)
            every = self.cfg.checkpoint_every
            if self.job.run_dir is not None and (evaluated or (every and state.step % every == 0)):
                self.save(state)  # after an evaluation too: a resumed run does not score it again

    def train_batch(self, state: TrainingState, batch: dict) -> bool:
        """One forward and backward pass; returns whether it ended with an optimizer step (counted in state.step)."""
        accelerator, model = self.job.accelerator, self.model
        optimizer, scheduler = self.optimization.optimizer, self.optimization.scheduler
        with accelerator.accumulate(model):
            loss = self._learn(batch)
            if accelerator.sync_gradients:
                scheduler.step()
                if self.hooks.after_optimizer_step is not None:
                    self.hooks.after_optimizer_step(self.inner, state.step + 1)
            optimizer.zero_grad(set_to_none=True)
        self.losses.add(loss)
        self.meter.update(batch)
        if accelerator.sync_gradients:
            state.step += 1
        return accelerator.sync_gradients

    def _learn(self, batch: dict) -> torch.Tensor:
        """Forward and backward on `batch`, then (at the end of an accumulation) clipping and the optimizer's step;
        the batch's loss. Inside accelerator.accumulate; the caller steps the schedule and clears the gradients."""
        accelerator, model, cfg = self.job.accelerator, self.model, self.cfg
        if self.loss is None:
            loss = model(**batches.model_inputs(batch)).loss
        else:  # the task section's loss (class weights, label smoothing): the model is given no labels
            inputs = batches.model_inputs(batch)
            targets = inputs.pop("labels")
            loss = self.loss(model(**inputs).logits, targets)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimization.optimizer.step()
        return loss

    def end_epoch(self, state: TrainingState, report: progress.Report) -> None:
        """Evaluate at the epoch's end (or, with eval.every_steps, after the last step), then move to the next
        epoch and checkpoint its start, unless the run is over."""
        last = state.step >= self.total or state.stopped
        # with eval.every_steps, the final weights are scored as they would be at an epoch's end
        final = last and not state.stopped and (not state.history or state.history[-1]["step"] != state.step)
        if self.every is None or final:
            self.evaluate(state, report)
        state.epoch, state.batches = state.epoch + 1, 0
        state.data_generator = self.generator.get_state()
        if not last and not state.stopped:
            if self.every is None:
                self.remember(state)  # evaluated and healthy: the next epoch starts from a good state
            if self.job.run_dir is not None:
                self.save(state)

    def evaluate(self, state: TrainingState, report: progress.Report) -> None:
        """Score the weights as they are now on validation (when there is one), keep them if they are the best
        so far, and stop the run if train.early_stopping says so; one entry of the history."""
        recipe, entry = self.job.recipe, {"epoch": state.epoch, "step": state.step}
        if self.val_loader is not None:
            timeline = self.job.timeline
            with self.meter.paused():  # throughput is the training's own
                if timeline is not None:
                    timeline.mark(f"validation, step {state.step}")
                metrics = evaluation.evaluate(
                    self.model, self.val_loader, self.job.task, self.job.labels, self.job.accelerator, recipe.task
                )
                if timeline is not None:
                    timeline.mark("training")
            entry["validation"] = metrics
            where = f"epoch {state.epoch}" if self.every is None else f"step {state.step}"
            collapsed = recovery.collapse(metrics) if self.recover is not None else None
            learning = recovery.still_learning(state.logged_losses) if collapsed is not None else None
            self.on_its_way = learning is not None  # not rolled back, and not a good state to come back to
            # a collapse that is rolled back is said once, by the rollback; one on its way, by the line below
            said = collapsed is not None and (self.on_its_way or self.can_roll_back(state))
            report.evaluation(where, state.step, metrics, self.now(state), warn_collapse=not said)
            if self.on_its_way:
                log.info("%s: %s, but %s: judged again at the next evaluation", where, collapsed, learning)
            elif collapsed is not None:
                self.roll_back(state, f"{where}: {collapsed}")
            self.judge(state, metrics)
        state.logged_losses = []
        state.history.append(entry)

    def judge(self, state: TrainingState, metrics: dict) -> None:
        """The best evaluation so far (its weights kept unless the method ends on its last ones), and early
        stopping's count of evaluations that did not improve on it by more than min_delta."""
        name, stopping = self.job.recipe.eval.metric_for_best, self.cfg.early_stopping
        score = (-1 if name in evaluation.LOWER_IS_BETTER else 1) * metrics[name]
        margin = stopping.min_delta if stopping else 0.0
        state.stale = 0 if score > state.best_score + margin else state.stale + 1
        if score > state.best_score:
            state.best_score, state.best_epoch, state.best_step = score, state.epoch, state.step
            if self.hooks.restore_best_epoch:
                state.best_state = trainable_tensors(self.inner)
        if stopping and state.stale >= stopping.patience:
            state.stopped = True
            log.info(
                "early stopping at step %d of %d: %d evaluation(s) in a row without an improvement of validation "
                "%s by more than %g (best %.4f, at step %d)",
                state.step,
                self.total,
                state.stale,
                name,
                stopping.min_delta,
                abs(state.best_score),
                state.best_step,
            )

    def save(self, state: TrainingState) -> None:
        """A checkpoint of `state`, with the random states and the method's training state as they are now. Only
        ever of a healthy run: the losses since the last log, and the weights, are checked first."""
        import torch

        accelerator = self.job.accelerator
        with self.meter.paused():
            params = [p for p in self.model.parameters() if p.requires_grad]
            # each process checks its own weights (its shards under FSDP); any process's non-finite one counts
            finite = torch.stack([_local(p.detach()).isfinite().all() for p in params]).all().float()
            finite = accelerator.reduce(finite, "sum").item() == accelerator.num_processes
            if not finite and self.recover is not None:
                self.roll_back(state, f"step {state.step}: the trained weights are no longer finite")
            _check_finite(
                self.losses.mean() if finite else math.nan,
                state.step,
                self.job.run_dir,
                self.now(state),
                devices.precision_of(accelerator),
            )
            # every process takes them (under FSDP gathering is a collective); the main process saves them
            weights = trainable_tensors(self.inner)
            optimizer_state = sharding.optimizer_state(self.inner, self.optimization.optimizer)
            if accelerator.is_main_process:  # the weights are whole in every process (gathered, or DDP's copies)
                taken = self.hooks.training_state(self.inner) if self.hooks.training_state is not None else None
                now = replace(state, rng=checkpoint.rng_now(), method_state=taken)
                checkpoint.save(
                    self.job.run_dir, self.cfg.keep_checkpoints, weights, optimizer_state, self.optimization, now
                )
            accelerator.wait_for_everyone()

    def remember(self, state: TrainingState) -> None:
        """train.recover: keep `state` and what goes with it (taken now) as the one to come back to (not one whose
        evaluation collapsed on the model's way: the state before it stays the one)."""
        if self.recover is None or self.on_its_way:
            return
        with self.meter.paused():
            taken = self.hooks.training_state(self.inner) if self.hooks.training_state is not None else None
            now = replace(
                state,
                rng=checkpoint.rng_now(),
                method_state=copy.deepcopy(taken),
                # at the run's start no epoch has begun: its shuffle starts from the generator as it is
                data_generator=state.data_generator if state.data_generator is not None else self.generator.get_state(),
            )
            self.good = recovery.take(now, self.inner, self.optimization)

    def now(self, state: TrainingState) -> TrainSection:
        """The train section with the peak rate the run trains at now (halved by each rollback): for messages."""
        return self.cfg.model_copy(update={"lr": self.cfg.lr * 0.5 ** len(state.recoveries)})

    def can_roll_back(self, state: TrainingState) -> bool:
        """Whether train.recover is on and has a rollback left."""
        return self.recover is not None and self.good is not None and len(state.recoveries) < self.recover.times

    def roll_back(self, state: TrainingState, why: str) -> None:
        """Put the run back to its last good state with the learning rate halved (raising _RolledBack to end the
        epoch under way), or, its rollbacks used up, say so and return: the run goes on as it is."""
        cfg, done = self.recover, len(state.recoveries)
        if not self.can_roll_back(state):
            if not self.spent_said:  # once: a run that keeps going wrong would say it at every log step
                log.warning(
                    "%s; train.recover has made its %d rollback(s) (train.recover.times): training on", why, done
                )
                self.spent_said = True
            return
        back_to = self.good.state.step
        lr = self.now(state).lr / 2
        state.recoveries = [*state.recoveries, {"at_step": state.step, "why": why, "back_to_step": back_to, "lr": lr}]
        recovery.put_back(self.good, self.inner, self.optimization, state)
        self.generator.set_state(state.data_generator)
        if state.method_state is not None:
            self.hooks.load_training_state(self.inner, copy.deepcopy(state.method_state))
            state.method_state = None
        self.losses.reset()
        log.warning(
            "%s. train.recover: back to step %d, the last good state, with the learning rate halved to %.3g; "
            "rollback %d of at most %d",
            why,
            back_to,
            lr,
            done + 1,
            cfg.times,
        )
        raise _RolledBack

    def keep_best(self, state: TrainingState) -> bool:
        """End on the best evaluation's trainable weights, where they were kept; returns whether they were."""
        if state.best_state is None:
            return False
        where = f"step {state.best_step}" if self.every else f"epoch {state.best_epoch}"
        load_trainable(self.inner, state.best_state, f"the adapter of {where}")
        log.info("kept the adapter of %s (best validation %s)", where, self.job.recipe.eval.metric_for_best)
        return True


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a sharded model's parameter); any other tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _optimizer(model: torch.nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    import torch

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)  # biases and norms take no weight decay
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr_search.min_lr if cfg.lr == "auto" else cfg.lr,  # auto: set once the search has chosen (_Loop)
    )


class _Losses:
    """The training loss summed since the last log, kept where it is computed: read only when logged or
    checkpointed."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.reset()

    def reset(self) -> None:
        import torch

        self.running, self.seen = torch.zeros((), device=self.accelerator.device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.running += loss.detach()
        self.seen += 1

    def mean(self) -> float:
        # the mean over every process (one all-reduce), so that each process takes the same NaN decision
        return self.accelerator.reduce(self.running, "mean").item() / self.seen if self.seen else 0.0


def _check_finite(loss: float, step: int, run_dir: Path | None, cfg: TrainSection, precision: str) -> None:
    """Stop a diverged run, naming the likely causes and the last good checkpoint (the run folder is kept)."""
    if math.isfinite(loss):
        return

    causes = [
        f"a learning rate too high for this method (train.lr {cfg.lr:g}: try 3-10x lower, or a longer "
        f"train.warmup_ratio than {cfg.warmup_ratio:g})"
    ]
    if precision == "fp16":
        causes.append("fp16 overflow (train.precision: bf16 or fp32)")
    if not cfg.max_grad_norm:
        causes.append("no gradient clipping (set train.max_grad_norm, e.g. 1.0)")
    causes.append("extreme values in the data")
    kept = checkpoint.latest(run_dir) if run_dir is not None else None
    where = (
        f"the last good checkpoint, {kept}, is kept (its weights are finite)"
        if kept is not None
        else "no checkpoint was written before it"
    )
    raise UserError(
        f"the training loss (or the trained weights) became {loss} at step {step}; the run stopped and {where}. "
        f"Likely causes: {'; '.join(causes)}."
    )
