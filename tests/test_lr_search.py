"""train.lr auto: the range test's pieces on known curves, and a run that searches trains exactly as the same run
with the chosen rate written in its recipe."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from peftkit import lr_search
from peftkit.sections import LrSearchSection, TrainSection

from .conftest import peftkit


def curve(lr: float) -> float:
    """A typical range-test loss: flat at small rates, falling from ~1e-4, lowest near 1e-2, running away after."""
    x = math.log10(lr)
    return 1.0 - 0.5 / (1 + math.exp(-3 * (x + 3.5))) + (0.0 if x < -2 else 4 * (x + 2) ** 2)


def test_rates_rise_exponentially_from_min_to_max():
    rates = lr_search.rates(1e-6, 1.0, 7)
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(rates, rates[1:]))


def test_smoothing_is_debiased():
    assert lr_search.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # not pulled towards 0
    smoothed = lr_search.smooth([1.0] * 50 + [10.0])
    assert 1.0 < smoothed[-1] < 1.5  # one outlier moves the average a little


def test_each_rule_picks_a_rate_where_the_loss_falls_before_it_runs_away():
    rates = lr_search.rates(1e-6, 1.0, 120)
    smoothed = [curve(lr) for lr in rates]
    picks = {rule: lr_search.suggest(rates, smoothed, rule) for rule in ("valley", "steepest", "minimum", "edge")}
    lowest = rates[min(range(len(rates)), key=smoothed.__getitem__)]
    for rule, lr in picks.items():
        assert 1e-5 < lr < lowest, rule  # below the lowest loss: never on the edge where it turns
        assert curve(lr) < curve(1e-6), rule  # where training already helps
    assert picks["steepest"] == pytest.approx(10**-3.5, rel=0.15)  # the curve's steepest point
    assert picks["minimum"] == pytest.approx(lowest / 10)
    turned = picks["edge"] * lr_search.EDGE_MARGIN  # where the loss has climbed EDGE_RISE past its lowest
    assert turned > lowest and 1 + lr_search.EDGE_RISE < curve(turned) / min(smoothed) < 1 + 2 * lr_search.EDGE_RISE


def test_edge_reads_the_turn_through_noise_that_moves_the_other_rules(monkeypatch):
    """A LoRA classifier's curve (as on the shipped recipes): flat with noise until it turns at 2e-2, with a bump
    on the way (one tweets seed had one) that lifts the smoothed loss ~7%. The edge rule reads the turn on every
    seed; valley reads the noise; a 5% rise would have read the bump."""
    import random

    rates = lr_search.rates(1e-6, 1.0, 100)
    curves = []
    for seed in range(5):
        noise = random.Random(seed)
        losses = [
            0.69 + 0.004 * noise.gauss(0, 1) + (0.7 if 7e-3 < lr < 1e-2 else 0.0) + 5 * max(0.0, math.log10(lr / 2e-2))
            for lr in rates
        ]
        curves.append(lr_search.smooth(losses))
    edge = [lr_search.suggest(rates, smoothed, "edge") * lr_search.EDGE_MARGIN for smoothed in curves]
    assert all(2e-2 < turn < 2e-2 * 3 for turn in edge), edge
    valley = [lr_search.suggest(rates, smoothed, "valley") for smoothed in curves]
    assert max(valley) / min(valley) > 3  # what the edge rule is for
    monkeypatch.setattr(lr_search, "EDGE_RISE", 0.05)
    assert all(lr_search.suggest(rates, smoothed, "edge") * lr_search.EDGE_MARGIN < 1.2e-2 for smoothed in curves)


def test_search_stops_once_the_loss_runs_away_or_is_not_finite():
    cfg = LrSearchSection(steps=200, min_lr=1e-6, max_lr=10.0)
    ticks = iter(range(1000))
    found = lr_search.search(curve, cfg, clock=lambda: float(next(ticks)))
    assert len(found.lrs) < 200 and "ran away" in found.stopped
    assert found.lrs[-1] < 1.0 and found.lr < 1e-2
    assert len(found.losses) == len(found.lrs) == len(found.smoothed)

    def blows_up(lr: float) -> float:
        return math.nan if lr > 1e-3 else curve(lr)

    found = lr_search.search(blows_up, cfg)
    assert "not finite" in found.stopped and max(found.lrs) <= 1e-3 and found.lr < 1e-3

    with pytest.raises(ValueError, match="learned nothing"):
        lr_search.search(lambda lr: math.inf, cfg)


def test_the_schema_takes_auto_or_a_positive_rate():
    assert TrainSection(lr="auto").lr == "auto" and TrainSection(lr="2e-3").lr == 2e-3
    for bad in (0, -1e-3, "fast"):
        with pytest.raises(ValueError):
            TrainSection(lr=bad)
    with pytest.raises(ValueError, match="max_lr"):
        LrSearchSection(min_lr=1e-2, max_lr=1e-3)


def test_a_run_with_lr_auto_trains_as_the_run_told_the_chosen_rate(recipe_file, tmp_path):
    """The search runs on a copy of nothing: it trains the real model, then puts back its weights, the optimizer and
    the random states, so the adapter equals the one a recipe with that rate written in gives, bit for bit."""
    path = recipe_file(
        train={"epochs": 1, "batch_size": 16, "lr": "auto", "lr_search": {"steps": 30}, "report_to": []},
        method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the random state must be put back
    )
    auto = tmp_path / "auto"
    result = peftkit("run", path, f"export.output_dir={auto}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((auto / "metrics.json").read_text())
    found = json.loads((auto / "lr_search.json").read_text())
    assert (auto / "lr_search.png").is_file()
    chosen = metrics["train"]["lr"]
    assert chosen == found["lr"] == metrics["train"]["lr_search"]["lr"]
    search = metrics["train"]["lr_search"]
    assert search["rule"] == LrSearchSection().rule and 1 < search["steps"] <= 30 and 0 < search["share"] < 1
    assert f"learning rate: {chosen:.3g}" in (auto / "train.log").read_text()

    told = tmp_path / "told"
    result = peftkit("run", path, f"export.output_dir={told}", f"train.lr={chosen!r}")
    assert result.returncode == 0, result.stderr
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (auto, told))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        not (told / "lr_search.json").exists()
        and "lr_search" not in json.loads((told / "metrics.json").read_text())["train"]
    )
