"""Where a run's numbers go besides train.log: train.report_to's destinations, each inside the run folder.

    tensorboard/  TensorBoard scalars, written by torch's SummaryWriter (skipped, with a line in the log, when the
                  tensorboard package is missing: it is the default, and optional)
    mlruns/       an MLflow file store: `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/NAME/mlruns`
    wandb/        a Weights & Biases run in offline mode: `wandb sync runs/NAME/wandb/offline-run-*` uploads it

MLflow and W&B go through accelerate's trackers: the Accelerator is built with them (`log_with`, which only its
constructor takes: devices.make_accelerator), they start once the run folder exists (`start`: init_trackers, with the
resolved recipe as MLflow params / W&B config), `Tracking.log` hands each step's numbers to them (accelerator.log),
and `Tracking.close` ends them (each tracker's finish(): accelerator.end_training() would also tear down the
process group that the final evaluation still uses). A missing package is a UserError before anything is loaded
(`check_installed`): accelerate itself would drop the tracker with a debug line.

TensorBoard stays peftkit's own writer: accelerate's would write to <run>/<project name>/ and add an hparams run
beside the scalars, and the model card reads the scalars from <run>/tensorboard (sharing/card.py).

Only the main process reports; the others get a Tracking that reports nowhere.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.errors import UserError
from peftkit.run_folder import MLRUNS, TENSORBOARD, WANDB

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter

    from peftkit.recipe import Recipe

log = logging.getLogger("peftkit")

TRACKERS = ("mlflow", "wandb")  # the report_to destinations that go through accelerate's trackers


def accelerate_trackers(report_to: Sequence[str]) -> list[str]:
    """The destinations of `report_to` that accelerate logs to: what the Accelerator is built with (`log_with`)."""
    return [name for name in report_to if name in TRACKERS]


def check_installed(report_to: Sequence[str]) -> None:
    """A tracker whose package is missing, said before the run loads anything, with the command that installs it."""
    missing = [name for name in accelerate_trackers(report_to) if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"train.report_to lists {' and '.join(missing)}, whose package is not installed: "
            + ", ".join(f"pip install 'peftkit[{name}]'" for name in missing)
            + f" (or take {' and '.join(missing)} out of train.report_to)"
        )


class Tracking:
    """One run's open destinations: TensorBoard's writer, and the accelerator whose trackers were started. The
    default reports nowhere (another process than the main one, a run without a folder, report_to: [])."""

    def __init__(self, writer: SummaryWriter | None = None, accelerator: Accelerator | None = None) -> None:
        self.writer, self.accelerator, self.closed = writer, accelerator, False

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """The numbers among `values` (not the collapse check's class name, not per-class dicts), at `step`."""
        numbers = {tag: value for tag, value in values.items() if isinstance(value, (int, float))}
        if self.writer is not None:
            for tag, value in numbers.items():
                self.writer.add_scalar(tag, value, step)
        if self.accelerator is not None and numbers:
            self.accelerator.log(numbers, step=step)

    def final(self, step: int, metrics: Mapping[str, Mapping[str, Any]]) -> None:
        """The kept adapter's metrics on each of eval.splits, as final/SPLIT/METRIC at the run's last step (apart
        from validation/*, the curve of the evaluations during training)."""
        self.log(
            step,
            {f"final/{split}/{name}": value for split, values in metrics.items() for name, value in values.items()},
        )

    def close(self, error: BaseException | None = None) -> None:
        """End every destination, once: a run that raised `error` is marked so (MLflow: FAILED, or KILLED for an
        interrupt; W&B: exit code 1)."""
        if self.closed:
            return
        self.closed = True
        if self.writer is not None:
            self.writer.close()
        if self.accelerator is None:
            return
        for tracker in self.accelerator.trackers:
            if error is not None and tracker.name == "mlflow":
                import mlflow

                mlflow.end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            elif error is not None and tracker.name == "wandb":
                tracker.tracker.finish(exit_code=1)
            else:
                tracker.finish()
        self.accelerator.trackers.clear()


def start(recipe: Recipe, accelerator: Accelerator, run_dir: Path, resumed: bool = False) -> Tracking:
    """Open train.report_to's destinations in `run_dir` (on the main process). `resumed`: the run continues an
    interrupted one from its checkpoint, so MLflow continues that run, and W&B its run id (a second offline folder
    that `wandb sync` uploads into the same run)."""
    report_to = recipe.train.report_to
    if not accelerator.is_main_process:
        return Tracking()
    wanted = accelerate_trackers(report_to)
    _check_accelerate_has(accelerator, wanted)
    tracking = Tracking(_tensorboard_writer(run_dir) if TENSORBOARD in report_to else None, accelerator)
    if not wanted:
        return tracking
    run_dir = Path(run_dir).absolute()
    try:
        kwargs = {}
        if "mlflow" in wanted:
            kwargs["mlflow"] = _mlflow_kwargs(recipe, run_dir, resumed)
        if "wandb" in wanted:
            kwargs["wandb"] = _wandb_kwargs(recipe, run_dir, resumed)
        accelerator.init_trackers(recipe.name, config=params(recipe), init_kwargs=kwargs)
        final = recipe.output_dir  # where the run folder will be once finished (it is <final>.partial now)
        if "mlflow" in wanted:
            run_id = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
            log.info(
                "MLflow: experiment %s, run %s; view it with: MLFLOW_ALLOW_FILE_STORE=true mlflow ui "
                "--backend-store-uri %s",
                recipe.name,
                run_id,
                final / MLRUNS,
            )
        if "wandb" in wanted:
            offline = Path(accelerator.get_tracker("wandb", unwrap=True).settings.sync_dir).relative_to(run_dir)
            log.info("W&B: offline run %s; upload it with: wandb sync %s", offline.name, final / offline)
    except BaseException as err:
        tracking.close(err)
        raise
    return tracking


def params(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as flat dotted keys ({'train.lr': 0.0005, ...}), lists as JSON text: MLflow's params
    and W&B's config."""

    def flat(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(inner, f"{prefix}{key}.")
        else:
            yield prefix.removesuffix("."), json.dumps(value) if isinstance(value, list) else value

    return dict(flat(recipe.model_dump(mode="json"), ""))


def run_name(recipe: Recipe) -> str:
    """The MLflow / W&B run's name: the run folder's (the recipe's name, unless export.output_dir says otherwise:
    a sweep's runs share the recipe's name, each in its own folder)."""
    return recipe.output_dir.name


def _check_accelerate_has(accelerator: Accelerator, wanted: list[str]) -> None:
    """accelerate drops a tracker it finds no package for, or cannot use, with only a debug line."""
    have = {str(tracker) for tracker in accelerator.log_with}
    missing = [name for name in wanted if name not in have]
    if missing:
        import accelerate

        raise UserError(
            f"train.report_to: accelerate {accelerate.__version__} cannot log to {' and '.join(missing)} here "
            f"(the Accelerator was built without it, or accelerate finds no usable package); "
            + ", ".join(f"pip install 'peftkit[{name}]'" for name in missing)
        )


def _mlflow_kwargs(recipe: Recipe, run_dir: Path, resumed: bool) -> dict:
    """A file store in <run>/mlruns (not MLFLOW_TRACKING_URI: the run's numbers stay in its folder). MLflow >= 3.13
    keeps file stores in maintenance mode and refuses to open one unless MLFLOW_ALLOW_FILE_STORE is set; unset, it
    is set here, for this process."""
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (run_dir / MLRUNS).as_uri()
    mlflow.set_tracking_uri(store)
    kwargs = {"run_name": run_name(recipe)}
    if resumed:
        kwargs["run_id"] = _last_mlflow_run(store, recipe.name)
    return kwargs


def _last_mlflow_run(store: str, experiment: str) -> str | None:
    """The run an interrupted run left in its store, to continue (None: it had none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _wandb_kwargs(recipe: Recipe, run_dir: Path, resumed: bool) -> dict:
    """Offline, whatever WANDB_MODE says (no login, nothing leaves the machine), in <run>/wandb; quiet (peftkit
    logs where the run is) and without capturing the console (train.log has it)."""
    import wandb

    kwargs = {
        "name": run_name(recipe),
        "dir": str(run_dir),
        "mode": "offline",
        "settings": wandb.Settings(silent=True, console="off"),
    }
    earlier = sorted((run_dir / WANDB).glob("offline-run-*")) if resumed else []
    if earlier:  # offline-run-<time>-<id>
        kwargs.update(id=earlier[-1].name.rpartition("-")[2], resume="allow")
    return kwargs


def _tensorboard_writer(run_dir: Path) -> SummaryWriter | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        log.info(
            "TensorBoard scalars skipped: the tensorboard package is not installed "
            "(pip install 'peftkit[tensorboard]', or take tensorboard out of train.report_to)"
        )
        return None
    return SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD))
