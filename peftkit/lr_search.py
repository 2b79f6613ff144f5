"""`train.lr: auto`: a learning-rate range test before training, and the rule that picks the run's rate from it.

    the model as loading built it -> train.lr_search.steps optimizer steps on the training split, the rate raised
    exponentially from min_lr to max_lr, stopped early once the loss runs away -> the losses, smoothed -> the rule's
    rate -> the weights, optimizer, random and shuffle states put back (train.py), so the run then trains exactly
    as it would with that rate written in the recipe

The test is Smith's ("Cyclical Learning Rates for Training Neural Networks", 2017) as fastai's and Lightning's
learning-rate finders run it: exponential rates, a debiased exponential moving average of the loss (beta 0.98), a stop
at four times the lowest smoothed loss. Neither library can be called on a peftkit model (fastai needs its Learner,
Lightning its Trainer), so the few lines are here; the rules are theirs:

    edge      (the default) a 25th of the rate where the smoothed loss first climbs 10% above the lowest it has
              reached: where one step per rate starts to undo the training. A LoRA classifier's loss barely falls
              in one step per rate, so its curve is flat until it turns: the rules below then read noise, while
              the turn is plain to see. Measured on the shipped recipes (benchmarks/RESULTS.md): over seeds, that
              turn moved 1.5x at most where valley's pick moved 8x; the margin of 25 lands the sentiment and
              tweets recipes on their best rates, and the NER recipe at 0.5-0.7x of its own (1.65 F1 under).
    valley    fastai's default since 2.4: the longest stretch over which the smoothed loss keeps falling, and a
              rate a third to a half of the way along it. It keeps off the edge where the loss turns; on a flat
              curve its stretch starts in noise, and it picked 2 to 3 times under the best rate of each recipe.
    steepest  Lightning's suggestion: where the smoothed loss falls fastest against log(rate).
    minimum   fastai's older lr_min: a tenth of the rate at the lowest smoothed loss.

The curve (lr_search.png) and the numbers (lr_search.json, also in metrics.json) go into the run folder; a resumed
run reads the rate back from there instead of searching again.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import measure
from peftkit.run_folder import LR_SEARCH, LR_SEARCH_PLOT

if TYPE_CHECKING:
    from peftkit.sections import LrSearchSection

BETA = 0.98  # the loss's moving average, as fastai and Lightning smooth it
DIVERGED = 4.0  # stop once the smoothed loss is this many times its lowest (both libraries' default)
EDGE_RISE, EDGE_MARGIN = 0.10, 25  # the edge rule (suggest); measured on the shipped recipes (benchmarks/RESULTS.md)
SKIP_START, SKIP_END = 10, 5  # the first steps (Adam's early steps, an average of few losses) and the last (the
# blow-up) take no part in choosing: Lightning skips 10 and 1, fastai trims the end of its curve too


@dataclass
class LrSearch:
    """One range test: the rate of each step, its loss, the smoothed curve, what the rule chose, and its cost."""

    rule: str
    lr: float  # the rate chosen
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str  # why the test ended
    seconds: float

    def summary(self) -> dict:
        """What metrics.json and the log keep (the whole curve is in lr_search.json)."""
        return {
            "lr": self.lr,
            "rule": self.rule,
            "steps": len(self.lrs),
            "stopped": self.stopped,
            "seconds": round(self.seconds, 2),
        }


def rates(low: float, high: float, steps: int) -> list[float]:
    """`steps` rates from `low` to `high`, evenly spaced in log(rate)."""
    if steps == 1:
        return [low]
    return [low * (high / low) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """The debiased exponential moving average of `losses` (Adam's bias correction: the first values are not
    pulled towards zero)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float], rule: str) -> float:
    """The rate `rule` picks from a smoothed curve (module docstring)."""
    end = max(len(smoothed) - SKIP_END, 1)
    start = min(SKIP_START, end - 1)
    lrs, curve = lrs[start:end], smoothed[start:end]
    if rule == "minimum" or len(curve) < 3:  # too short a curve for a slope or a stretch: the minimum's rule
        return lrs[min(range(len(curve)), key=curve.__getitem__)] / 10
    if rule == "steepest":
        logs = [math.log(lr) for lr in lrs]
        slopes = [(curve[i + 1] - curve[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(curve) - 1)]
        return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    if rule == "valley":
        # fastai's valley: the longest strictly falling subsequence of the curve (O(n^2); n is a few hundred)
        longest = [1] * len(curve)
        best_end = 0
        for i in range(1, len(curve)):
            for j in range(i):
                if curve[i] < curve[j] and longest[i] < longest[j] + 1:
                    longest[i] = longest[j] + 1
            if longest[i] > longest[best_end]:
                best_end = i
        best_start = best_end - longest[best_end] + 1
        third = (best_end - best_start) / 3
        return lrs[best_start + int(third) + int(third / 2)]
    if rule == "edge":
        # the rate where the smoothed loss first climbs EDGE_RISE above the lowest it has reached: where training
        # turns unstable within one step per rate. A run trains for many steps at its peak rate, and rates well
        # under that edge already collapse a classifier, hence the wide margin (EDGE_MARGIN). A 5% rise was
        # crossed by noise: a bump on one tweets curve put the pick 3x under the other seeds'.
        lowest = curve[0]
        for lr, loss in zip(lrs, curve):
            lowest = min(lowest, loss)
            if loss > lowest * (1 + EDGE_RISE):
                return lr / EDGE_MARGIN
        return lrs[-1] / EDGE_MARGIN
    raise ValueError(f"unknown learning-rate rule {rule!r}")


def search(
    step: Callable[[float], float], cfg: LrSearchSection, clock: Callable[[], float] = time.perf_counter
) -> LrSearch:
    """Run the range test: `step(lr)` trains one optimizer step at `lr` and returns its loss (the same value in every
    process, so that every process stops and chooses alike)."""
    began = clock()
    planned = rates(cfg.min_lr, cfg.max_lr, cfg.steps)
    lrs: list[float] = []
    losses: list[float] = []
    stopped = f"ran all {cfg.steps} steps"
    for lr in planned:
        loss = step(lr)
        lrs.append(lr)
        if not math.isfinite(loss):
            stopped = f"loss not finite at lr {lr:.3g} (step {len(lrs)})"
            break
        losses.append(loss)
        curve = smooth(losses)
        if len(losses) > SKIP_START and curve[-1] > DIVERGED * min(curve):
            stopped = f"loss ran away at lr {lr:.3g} (step {len(lrs)})"
            break
    lrs = lrs[: len(losses)]
    if len(losses) < 2:
        raise ValueError(f"the learning-rate search learned nothing: {stopped}; lower train.lr_search.min_lr")
    smoothed = smooth(losses)
    chosen = suggest(lrs, smoothed, cfg.rule)
    return LrSearch(cfg.rule, chosen, lrs, losses, smoothed, stopped, clock() - began)


def cycle(loader: Iterable) -> Iterator:
    """The loader's batches, epoch after epoch, for a test longer than one epoch."""
    while True:
        yield from loader


def save(result: LrSearch, folder: Path) -> None:
    """lr_search.json, and lr_search.png where matplotlib is installed (the bench extra)."""
    (folder / LR_SEARCH).write_text(json.dumps(asdict(result), indent=1), encoding="utf-8")
    plt = measure.pyplot("learning-rate search")
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(result.lrs, result.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    axes.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=1.5, label="smoothed")
    axes.axvline(result.lr, color="tab:red", linewidth=1, label=f"{result.rule}: {result.lr:.2g}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate search")
    top = max(result.smoothed[: max(len(result.smoothed) - SKIP_END, 1)])
    axes.set_ylim(min(result.smoothed) * 0.9, top * 1.1)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / LR_SEARCH_PLOT, dpi=110)
    plt.close(figure)


def load(folder: Path) -> LrSearch | None:
    """The search a run folder holds (an interrupted run being resumed), or None."""
    path = folder / LR_SEARCH
    if not path.is_file():
        return None
    return LrSearch(**json.loads(path.read_text(encoding="utf-8")))
