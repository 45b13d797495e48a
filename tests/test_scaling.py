"""mixprec.scaling: the dynamic loss scale against torch.amp.GradScaler step for step,
hysteresis, the rising minimum of enhanced loss scaling, state round trips, and FP8
amax histories."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

from mixprec.scaling import (
    AmaxHistory,
    DynamicScaling,
    LossScaler,
    LossScaleState,
    StaticScaling,
    adjust,
    make_loss_scaler,
    min_scale_at,
)

# 1 = gradients overflow at that step
OVERFLOW_PATTERN = [0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]


def grad_scaler_sequence(pattern: list[int], growth_interval: int) -> tuple[list[float], list[bool]]:
    """Scales and skipped steps from torch.amp.GradScaler fed the same overflow pattern."""
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=growth_interval)
    scales, skipped = [], []
    for overflow in pattern:
        optimizer.zero_grad()
        scaler.scale(param.sum()).backward()
        if overflow:
            param.grad[1] = float("inf")
        before = param.detach().clone()
        scaler.step(optimizer)
        scaler.update()
        skipped.append(torch.equal(before, param.detach()))
        scales.append(scaler.get_scale())
    return scales, skipped


def test_dynamic_scale_matches_grad_scaler():
    config = DynamicScaling(init_scale=2.0**10, growth_interval=3)
    want_scales, want_skipped = grad_scaler_sequence(OVERFLOW_PATTERN, growth_interval=3)
    scaler = LossScaler(config)
    scales = []
    for overflow in OVERFLOW_PATTERN:
        scaler.update(finite=not overflow)
        scales.append(scaler.scale)
    assert scales == want_scales
    assert [entry[2] for entry in scaler.history] == want_skipped
    assert scaler.state.skipped == sum(OVERFLOW_PATTERN)


def test_hysteresis_backs_off_only_after_consecutive_overflows():
    config = DynamicScaling(init_scale=64.0, hysteresis=2, growth_interval=100)
    state = LossScaleState(64.0, hysteresis_left=2)
    state = adjust(state, False, config)
    assert state.scale == 64.0 and state.hysteresis_left == 1
    state = adjust(state, True, config)  # a clean step restores the tolerance
    assert state.hysteresis_left == 2
    state = adjust(adjust(state, False, config), False, config)
    assert state.scale == 32.0 and state.skipped == 3


def test_min_scale_schedule_raises_the_floor_and_warns_once():
    config = DynamicScaling(init_scale=16.0, growth_interval=1000, min_scale_schedule=((0, 2.0), (5, 8.0)))
    assert [min_scale_at(config, s) for s in (0, 4, 5, 100)] == [2.0, 2.0, 8.0, 8.0]
    scaler = LossScaler(config)
    with pytest.warns(RuntimeWarning, match="floor 2"):
        for _ in range(4):
            scaler.update(finite=False)
    assert scaler.scale == 2.0  # 16 -> 8 -> 4 -> 2 -> 2 (held at the floor)
    scaler.update(finite=True)  # step 5: the floor rises to 8 and lifts the scale
    assert scaler.scale == 8.0


def test_growth_that_would_overflow_keeps_the_scale():
    config = DynamicScaling(init_scale=2.0**127, growth_interval=1)
    state = adjust(LossScaleState(2.0**127), True, config)
    assert state.scale == 2.0**127 and math.isfinite(state.scale)


def test_static_scaler_counts_skips_but_keeps_its_scale():
    scaler = make_loss_scaler(128.0)
    scaler.update(False)
    scaler.update(True)
    assert scaler.scale == 128.0 and scaler.state.skipped == 1 and not scaler.dynamic


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LossScaleState)])
def test_state_dict_round_trips_every_field(field):
    config = DynamicScaling(init_scale=256.0, growth_interval=2, hysteresis=3)
    scaler = LossScaler(config)
    for finite in (True, False, True, True, False):
        scaler.update(finite)
    restored = LossScaler(config)
    restored.load_state_dict(pickle.loads(pickle.dumps(scaler.state_dict())))
    assert getattr(restored.state, field) == getattr(scaler.state, field)
    assert restored.history == scaler.history
    for finite in (True, True, False):  # and both go on identically
        scaler.update(finite)
        restored.update(finite)
    assert restored.state == scaler.state


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"init_scale": 0.0}, "init_scale"), ({"growth_factor": 1.0}, "growth_factor"),
     ({"backoff_factor": 1.5}, "backoff_factor"), ({"min_scale_schedule": ((5, 1.0), (2, 2.0))}, "rising")],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicScaling(**kwargs)


def test_bad_static_scale_and_type():
    with pytest.raises(ValueError, match="finite and > 0"):
        StaticScaling(-1.0)
    with pytest.raises(TypeError, match="DynamicScaling"):
        make_loss_scaler("big")  # type: ignore[arg-type]


def test_amax_history_takes_the_largest_recent_amax():
    history = AmaxHistory(length=3)
    assert history.scale("e4m3").item() == 1.0  # empty history
    for peak in (10.0, 300.0, 5.0, 7.0, 2.0):
        history.record(torch.tensor([peak, -peak / 2]))
    # the window holds 5, 7, 2: 300 has left it
    assert history.amax.max().item() == 7.0
    scale = history.scale("e4m3", power_of_two=False).item()
    assert math.isclose(7.0 / scale, 448.0, rel_tol=1e-6)
    copy = AmaxHistory(length=3)
    copy.load_state_dict(history.state_dict())
    assert torch.equal(copy.amax, history.amax) and copy.count.item() == 5
    with pytest.raises(ValueError, match="length"):
        AmaxHistory(length=4).load_state_dict(history.state_dict())
