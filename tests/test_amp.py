"""mixprec.GradScaler and prepare: torch.amp's loop and its guarantees (skipped steps
change nothing, the scale follows torch's, a checkpoint resumes bitwise in a fresh
process), LR schedulers and clipping on the user's optimizer, and misuse."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec

RECIPES = ["fp32", "fp16", "bf16", "fp8", "fp8-hybrid"]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=generator)
    teacher = torch.randn(16, 4, generator=generator)
    return x, (x @ teacher).argmax(1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _train(recipe: str, steps: int) -> float:
    x, y = _data()
    model = mixprec.convert(_model(), recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    scaler = mixprec.GradScaler(recipe)
    for step in range(steps):
        rows = slice((step * 32) % 256, (step * 32) % 256 + 32)
        scaler.scale(F.cross_entropy(model(x[rows]).float(), y[rows])).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x).float(), y).item()


def test_every_recipe_reaches_fp32_loss_in_the_user_loop() -> None:
    fp32 = _train("fp32", 100)
    assert fp32 < 0.15  # it learned
    for recipe in RECIPES[1:]:
        loss = _train(recipe, 100)
        assert abs(loss - fp32) < 0.05, (recipe, loss, fp32)


@pytest.mark.parametrize("recipe", ["fp16", "fp8"])
def test_a_skipped_step_changes_nothing(recipe: str) -> None:
    x, y = _data()
    model = mixprec.convert(_model(), recipe)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = mixprec.GradScaler(recipe)
    for factor in (1.0, float("nan")):
        params = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(optimizer.state_dict())
        scaler.scale(F.cross_entropy(model(x[:32]).float(), y[:32]) * factor).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.last_step_skipped
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(params, model.parameters()))
    after = optimizer.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(after["state"][key][name], tensor), name
    fmt = mixprec.get_recipe(recipe).master_fmt
    assert all(torch.equal(mixprec.quantize(p.detach(), fmt), p) for p in model.parameters())  # on the grid


def test_scale_sequence_and_skips_match_torch_grad_scaler() -> None:
    """torch's own harness style: a control run under torch.amp.GradScaler and a scaled
    run under ours, an Inf injected at known steps, and a state_dict round trip mid-run."""
    overflow_steps = {1, 4, 5}
    torch.manual_seed(0)
    control = nn.Linear(4, 1)
    control_opt = torch.optim.SGD(control.parameters(), lr=0.1)
    theirs_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    torch.manual_seed(0)
    model = mixprec.convert(nn.Sequential(nn.Linear(4, 1)), "fp16")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recipe = mixprec.get_recipe("fp16").replace(loss_scale=mixprec.DynamicScaling(growth_interval=3))
    scaler = mixprec.GradScaler(recipe)
    x = torch.randn(8, 4) * 0.01
    ours, theirs = [], []
    for step in range(10):
        factor = float("inf") if step in overflow_steps else 1.0
        scaler.scale(model(x).float().pow(2).mean() * factor).backward()
        before = model[0].weight.detach().clone()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        ours.append((scaler.get_scale(), not torch.equal(before, model[0].weight)))
        if step == 6:  # a round trip mid-run
            saved = scaler.state_dict()
            scaler = mixprec.GradScaler(recipe)
            scaler.load_state_dict(saved)
        control_opt.zero_grad()
        theirs_scaler.scale(control(x).pow(2).mean() * factor).backward()
        before = control.weight.detach().clone()
        theirs_scaler.step(control_opt)
        theirs_scaler.update()
        theirs.append((theirs_scaler.get_scale(), not torch.equal(before, control.weight)))
    assert ours == theirs
    assert scaler.loss_scaler.state.skipped == len(overflow_steps)


@pytest.mark.parametrize("recipe", ["fp16", "fp8", "fp8-hybrid"])
def test_checkpoint_resumes_bitwise_in_a_fresh_process(tmp_path, recipe: str) -> None:
    def run(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "tests.checkpoint_run", recipe, *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr

    run("0", "4", "--save", str(tmp_path / "half.pt"))
    run("4", "8", "--load", str(tmp_path / "half.pt"), "--save", str(tmp_path / "resumed.pt"))
    run("0", "8", "--save", str(tmp_path / "straight.pt"))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    assert resumed["model"].keys() == straight["model"].keys()
    for key, value in straight["model"].items():  # weights, amax histories, generator: all bitwise
        assert torch.equal(resumed["model"][key], value), key
    assert resumed["scaler"]["loss_scaler"] == straight["scaler"]["loss_scaler"]
    assert straight["scaler"]["loss_scaler"]["state"]["skipped"] == 1


def test_prepare_returns_a_real_optimizer_for_schedulers_and_clipping() -> None:
    x, y = _data()
    model = _model()
    model, optimizer = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16")
    assert isinstance(optimizer, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    optimizer.backward(F.cross_entropy(model(x[:32]).float(), y[:32]))
    optimizer.unscale_()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert float(norm) < 1e3  # the true gradients' norm, not the scaled one (x 65536)
    assert optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 0.1
    state = optimizer.state_dict()
    other = _model()
    _, again = mixprec.prepare(other, torch.optim.SGD(other.parameters(), lr=0.1), "fp16")
    again.load_state_dict(state)
    assert again.loss_scale == optimizer.loss_scale


def test_misuse_gets_torch_errors_and_changes_nothing() -> None:
    model = mixprec.convert(_model(), "fp16")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler("fp16")
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.update()
    scaler.scale(model(torch.randn(2, 16)).float().sum()).backward()
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(optimizer)
    scaler.update()
    before = scaler.state_dict()
    with pytest.raises(ValueError, match="recipe 'fp16'.*runs 'bf16'"):
        mixprec.GradScaler("bf16").load_state_dict(before)
    with pytest.raises(ValueError, match="unknown recipe"):
        mixprec.GradScaler("fp7")
    plain = _model()
    _, wrapped = mixprec.prepare(plain, torch.optim.SGD(plain.parameters(), lr=0.1), "fp16")
    with pytest.raises(ValueError, match="call optimizer.backward"):
        wrapped.step()
    with pytest.raises(ValueError, match="already prepared"):
        mixprec.prepare(_model(), wrapped, "fp16")
    with pytest.raises(ValueError, match="none of this model's parameters"):
        mixprec.prepare(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), "fp16")


def test_fp16_masters_take_an_fp32_update_rounded_onto_the_fp16_grid() -> None:
    model = mixprec.convert(_model(), "fp8")
    assert all(torch.equal(p.half().float(), p) for p in model.parameters())  # paper 2's FP16 masters
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = mixprec.GradScaler("fp8")
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(F.cross_entropy(model(x[:32]).float(), y[:32])).backward()
    scaler.unscale_(optimizer)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # clipping sees FP32 gradients
    scaler.step(optimizer)
    scaler.update()
    after = list(model.parameters())
    assert all(torch.equal(p.half().float(), p) for p in after)  # rounded back onto the FP16 grid
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for k, v in s.items() if k != "step")
