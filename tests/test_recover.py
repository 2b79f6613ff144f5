"""train.recover: a run that goes wrong goes back to its last good state with half the learning rate, replays from
there exactly, and says so in its log, metrics.json and model card; its rollbacks are bounded and survive a resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from peftkit import recovery
from peftkit.sections import RecoverSection, TrainSection
from peftkit.sharing import card

from .conftest import peftkit_here


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_the_schema_takes_a_switch_or_a_section():
    assert TrainSection().recover is None  # off unless asked for (the shipped recipes ask)
    assert TrainSection(recover=True).recover == RecoverSection() == TrainSection(recover="true").recover
    assert TrainSection(recover=False).recover is None and TrainSection(recover={"times": 4}).recover.times == 4
    for bad in ({"times": 0}, {"spike": 1.0}, {"tries": 2}, "maybe"):
        with pytest.raises(ValueError):
            TrainSection(recover=bad)


def test_what_calls_for_a_rollback():
    cfg = RecoverSection(spike=2.0)
    assert recovery.loss_went_wrong(1.3, 0.7, cfg) is None  # worse, but not twice the untrained model's
    assert "spiked to 1.5" in recovery.loss_went_wrong(1.5, 0.7, cfg)
    assert "became nan" in recovery.loss_went_wrong(math.nan, 0.7, cfg)
    assert "became inf" in recovery.loss_went_wrong(math.inf, None, cfg)
    assert recovery.collapse({"accuracy": 0.8}) is None
    collapsed = {"collapsed_to": "pos", "collapsed_over": "20 rows", "collapsed_share": 0.5}
    assert "predicts 'pos' for all 20 rows" in recovery.collapse(collapsed)


def test_a_one_class_validation_while_the_loss_still_falls_is_a_model_on_its_way():
    assert recovery.still_learning([3.0, 2.0, 1.0, 0.5, 0.3, 0.3]) == (
        "the training loss is still falling (2 -> 0.367 over the 6 logged since)"
    )
    assert recovery.still_learning([0.69, 0.68, 0.69, 0.69, 0.70, 0.69]) is None  # at chance: collapsed
    assert recovery.still_learning([0.53, 0.60, 0.69, 0.69]) is None  # climbing back: collapsed
    assert recovery.still_learning([3.0, 0.3, 0.2]) is None  # too few to tell: as a collapse


def test_a_collapse_while_the_loss_falls_is_judged_again_at_the_next_evaluation(recover_recipe, tmp_path, monkeypatch):
    """Not rolled back, and not a state to come back to: the next collapse, with the loss no longer falling, goes
    back to the start."""
    path = recover_recipe()
    collapse_at(monkeypatch, {1, 2})
    verdicts = iter(["the training loss is still falling (made so by the test)", None])
    monkeypatch.setattr(recovery, "still_learning", lambda losses: next(verdicts))
    out = tmp_path / "run"
    result = peftkit_here("run", path, f"export.output_dir={out}")
    assert result.returncode == 0, result.stderr
    (event,) = metrics(out)["train"]["recoveries"]
    assert (event["at_step"], event["back_to_step"], event["lr"]) == (20, 0, 2.5e-3)
    log = (out / "train.log").read_text()
    assert "but the training loss is still falling (made so by the test): judged again at the next evaluation" in log


def test_scaling_the_rate_scales_the_whole_schedule():
    from transformers import get_scheduler

    from peftkit.training_state import Optimization

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, 2, 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    before = scheduler.get_last_lr()[0]
    recovery.scale_lr(Optimization(optimizer, scheduler), 0.5)
    assert scheduler.get_last_lr()[0] == optimizer.param_groups[0]["lr"] == before / 2
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3 * 5 / 8)  # step 5 of 10 after 2 of warmup


@pytest.fixture
def recover_recipe(recipe_file):
    def write(**train):
        settings = {"epochs": 2, "batch_size": 16, "lr": 5e-3, "recover": True, "report_to": [], **train}
        # dropout: the random states must be put back too
        return recipe_file(train=settings, method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1})

    return write


def collapse_at(monkeypatch, evaluations: set[int]) -> None:
    """Make the given evaluations (counted from 1) the collapsed ones, as a model that answers one class would
    give, and only those: the tiny model's own early evaluations may predict one class."""
    seen = []

    def collapse(metrics: dict) -> str | None:
        seen.append(metrics)
        return "validation predicts 'pos' for everything (made so by the test)" if len(seen) in evaluations else None

    monkeypatch.setattr(recovery, "collapse", collapse)


def test_a_collapse_at_the_first_evaluation_replays_the_run_at_half_the_rate(recover_recipe, tmp_path, monkeypatch):
    """Back to the start with the rate halved, the run is the one its recipe would have given at that rate: the
    weights, optimizer, schedule, data order and random states all come back, bit for bit."""
    path = recover_recipe()
    collapse_at(monkeypatch, {1})
    rolled = tmp_path / "rolled"
    result = peftkit_here("run", path, f"export.output_dir={rolled}")
    assert result.returncode == 0, result.stderr
    monkeypatch.undo()
    halved = tmp_path / "halved"
    result = peftkit_here("run", path, f"export.output_dir={halved}", "train.lr=2.5e-3", "train.recover=false")
    assert result.returncode == 0, result.stderr

    a, b = adapter(rolled), adapter(halved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train = metrics(rolled)["train"]
    (event,) = train["recoveries"]
    assert event["at_step"] == 10 and event["back_to_step"] == 0 and event["lr"] == train["lr"] == 2.5e-3
    assert "made so by the test" in event["why"]
    assert [entry["step"] for entry in train["history"]] == [10, 20] and train["steps"] == 20  # the replay's
    assert train["history"] == metrics(halved)["train"]["history"]
    log = (rolled / "train.log").read_text()
    assert "back to step 0, the last good state, with the learning rate halved to 0.0025; rollback 1 of at most 2" in (
        log
    )
    assert "recoveries" not in metrics(halved)["train"]
    facts = "\n".join(card._training_facts(metrics(rolled)))
    assert "learning rate 0.005" in facts
    assert "rolled back at step 10 to step 0, the learning rate halved to 0.0025" in facts


def test_a_later_collapse_goes_back_to_the_last_healthy_evaluation_and_rollbacks_are_bounded(
    recover_recipe, tmp_path, monkeypatch
):
    path = recover_recipe(recover={"times": 2})
    # evaluations at steps 4, 8, 12, 16, 20: the 3rd (step 12) collapses, and again after each rollback
    collapse_at(monkeypatch, {3, 4, 5})
    out = tmp_path / "run"
    result = peftkit_here("run", path, f"export.output_dir={out}", "eval.every_steps=4")
    assert result.returncode == 0, result.stderr
    train = metrics(out)["train"]
    assert [(e["at_step"], e["back_to_step"], e["lr"]) for e in train["recoveries"]] == [
        (12, 8, 2.5e-3),
        (12, 8, 1.25e-3),
    ]
    assert [entry["step"] for entry in train["history"]] == [4, 8, 12, 16, 20] and train["lr"] == 1.25e-3
    log = (out / "train.log").read_text()
    assert log.count("train.recover has made its 2 rollback(s) (train.recover.times): training on") == 1


def test_a_loss_spike_rolls_back_and_without_rollbacks_left_a_non_finite_loss_still_stops_the_run(
    recover_recipe, tmp_path, monkeypatch
):
    path = recover_recipe(lr=1e3, log_every=2, recover={"times": 20})  # a rate that blows the loss up at once
    collapse_at(monkeypatch, set())  # spikes alone: the tiny model's first epoch predicts one class at any rate
    out = tmp_path / "run"
    result = peftkit_here("run", path, f"export.output_dir={out}")
    assert result.returncode == 0, result.stderr  # halved until it trains: how often depends on the precision
    events = metrics(out)["train"]["recoveries"]
    assert 1 <= len(events) < 20 and "spiked" in events[0]["why"] and "untrained model's" in events[0]["why"]
    assert [e["lr"] for e in events] == [1e3 / 2**n for n in range(1, len(events) + 1)]
    assert all(e["back_to_step"] == 0 and e["at_step"] <= 10 for e in events)  # found before the first evaluation
    assert all(t.isfinite().all() for t in adapter(out).values())

    from peftkit import train

    monkeypatch.setattr(train._Losses, "mean", lambda self: math.nan)  # every logged loss: not finite
    out = tmp_path / "nan"
    result = peftkit_here("run", path, f"export.output_dir={out}", "train.lr=5e-3", "train.recover.times=1")
    assert result.returncode == 2 and "became nan" in result.stderr, result.stderr
    log = (out.with_name("nan.partial") / "train.log").read_text()
    assert "the training loss became nan. train.recover: back to step 0" in log  # once, then it stops
    assert not out.exists()  # no export of a diverged run


def test_a_resumed_run_keeps_its_rollbacks_and_halved_rate(recover_recipe, tmp_path, monkeypatch):
    """The checkpoints after a rollback hold it: a run stopped after one and resumed ends as the whole run does."""
    from peftkit import checkpoint

    path = recover_recipe(epochs=3, checkpoint_every=3)
    collapse_at(monkeypatch, {1})
    whole = tmp_path / "whole"
    assert peftkit_here("run", path, f"export.output_dir={whole}").returncode == 0

    collapse_at(monkeypatch, {1})
    save = checkpoint.save

    def save_then_stop(*args, **kwargs):
        written = save(*args, **kwargs)
        if args[-1].step >= 15:  # the state: after the rollback at step 10 and the replay past it
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    out = tmp_path / "run"
    assert peftkit_here("run", path, f"export.output_dir={out}").returncode != 0
    assert not out.exists() and out.with_name("run.partial").exists()

    monkeypatch.undo()
    collapse_at(monkeypatch, set())  # the resumed run does not see the first epoch's evaluation again
    result = peftkit_here("run", path, f"export.output_dir={out}", "--resume")
    assert result.returncode == 0, result.stderr
    a, b = adapter(out), adapter(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed, expected = metrics(out)["train"], metrics(whole)["train"]
    assert resumed["recoveries"] == expected["recoveries"] and len(resumed["recoveries"]) == 1
    assert resumed["lr"] == expected["lr"] == 2.5e-3
