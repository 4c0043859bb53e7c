"""The learning-rate schedules of the ``scheduler`` config group, stepped as Lightning steps them."""

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from busiseg.models.scheduler import one_cycle, warmup_cosine
from tests.conftest import REPO


def _lrs(make_scheduler, total_steps, lr=1e-3, optimizer_cls=torch.optim.AdamW):
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = optimizer_cls(params, lr=lr)
    scheduler = make_scheduler(optimizer, total_steps)
    lrs, betas = [], []
    for _ in range(total_steps):  # one optimizer step, then one scheduler step, as Lightning does
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0].get("betas", (None,))[0])
        optimizer.step()
        scheduler.step()
    return lrs, betas


def test_warmup_cosine_rises_then_decays_to_the_floor():
    lrs, _ = _lrs(lambda o, n: warmup_cosine(o, n, warmup_fraction=0.1, min_lr_ratio=0.01), 100)
    peak = max(range(100), key=lrs.__getitem__)
    assert 8 <= peak <= 11 and lrs[peak] == pytest.approx(1e-3, rel=0.02)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_one_cycle_shape_and_momentum():
    lrs, betas = _lrs(lambda o, n: one_cycle(o, n), 200)
    assert lrs[0] == pytest.approx(1e-3 / 25)
    peak = max(range(200), key=lrs.__getitem__)
    assert abs(peak - 0.3 * 200) <= 1 and lrs[peak] == pytest.approx(1e-3, rel=1e-3)
    assert lrs[-1] < 1e-3 / 25 / 100  # annealed far below the start
    # Adam's beta1 moves against the learning rate: high at the ends, low at the peak
    assert betas[0] == pytest.approx(0.95) and betas[peak] == pytest.approx(0.85, abs=1e-3)


def test_one_cycle_peaks_at_each_groups_own_lr():
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}], momentum=0.9)
    scheduler = one_cycle(optimizer, 10, pct_start=0.5)
    for _ in range(4):  # the peak is step pct_start * total - 1
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.01])


@pytest.mark.parametrize("kwargs, key", [({"pct_start": 0.0}, "pct_start"), ({"pct_start": 1.0}, "pct_start"),
                                         ({"div_factor": 0.0}, "div_factor")])
def test_one_cycle_bad_values_named(kwargs, key):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match=key):
        one_cycle(optimizer, 10, **kwargs)


def test_one_cycle_config_builds_the_schedule():
    cfg = OmegaConf.load(REPO / "conf" / "scheduler" / "one_cycle.yaml")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    scheduler = instantiate(cfg)(optimizer=optimizer, total_steps=50)
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / cfg.div_factor)
    assert math.isclose(scheduler.total_steps, 50)


def _schedule(make, steps):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched, seen = make(opt, steps), []
    for _ in range(steps):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("steps", [6, 76, 600])
def test_one_cycle_is_torchs_one_cycle_for_the_second_stages(steps):
    # the crop, refine and scan stages train with it at a 20 % warm-up: the same schedule as torch's own, value for
    # value, so runs trained before they shared it are reproduced
    ours = _schedule(lambda o, n: one_cycle(o, n, pct_start=0.2), steps)
    torchs = _schedule(lambda o, n: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=n,
                                                                         pct_start=0.2), steps)
    assert ours == torchs


def test_one_cycle_with_a_one_step_warm_up_runs():
    # torch divides by zero when pct_start x total_steps is exactly 1 (a stage of 1 epoch of 5 batches at 0.2)
    with pytest.raises(ZeroDivisionError):
        _schedule(lambda o, n: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=n, pct_start=0.2), 5)
    lrs = [lr for lr, _ in _schedule(lambda o, n: one_cycle(o, n, pct_start=0.2), 5)]
    assert lrs[0] == pytest.approx(1e-3 / 25) and max(lrs) <= 1e-3 and lrs[-1] < lrs[1]
