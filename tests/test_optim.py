"""mixprec.optim and prepare: skipped steps change nothing, checkpoints resume bitwise
in a fresh process, the scale follows torch.amp.GradScaler, every recipe trains a small
model to FP32's loss, fp16 without loss scaling loses gradients to underflow, and misuse
gets a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.recipe import RECIPES

ALL_RECIPES = list(RECIPES)


def small_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4))


def teacher_data(count: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs labelled by a fixed random network, so there is something to learn."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(count, 1, 8, 8, generator=generator)
    teacher = torch.randn(64, 4, generator=generator)
    return x, (x.reshape(count, -1) @ teacher).argmax(1)


def train(recipe: str, steps: int, optimizer_cls=torch.optim.SGD, **opt_kwargs) -> tuple[float, mixprec.MixedPrecisionOptimizer]:
    torch.manual_seed(0)
    model = small_model()
    optimizer = optimizer_cls(model.parameters(), **(opt_kwargs or {"lr": 0.02, "momentum": 0.9}))
    model, optimizer = mixprec.prepare(model, optimizer, recipe)
    x, y = teacher_data()
    for step in range(steps):
        rows = slice((step * 32) % 256, (step * 32) % 256 + 32)
        optimizer.backward(F.cross_entropy(model(x[rows]), y[rows]))
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        model.eval()
        return F.cross_entropy(model(x), y).item(), optimizer


def test_every_recipe_reaches_fp32_loss():
    fp32_loss, _ = train("fp32", 100)
    assert fp32_loss < 0.1  # it learned
    for recipe in ALL_RECIPES[1:]:
        loss, optimizer = train(recipe, 100)
        # stated tolerance: within 0.01 nats of FP32's final training loss
        assert abs(loss - fp32_loss) < 0.01, (recipe, loss, fp32_loss)
        assert optimizer.scaler.state.step == 100


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_skipped_step_changes_nothing(optimizer_cls):
    torch.manual_seed(0)
    model = small_model()
    kwargs = {"lr": 0.01, "momentum": 0.9} if optimizer_cls is torch.optim.SGD else {"lr": 1e-3}
    model, optimizer = mixprec.prepare(model, optimizer_cls(model.parameters(), **kwargs), "fp8")
    x, y = teacher_data(32)
    for _ in range(3):
        optimizer.backward(F.cross_entropy(model(x), y))
        assert optimizer.step()
        optimizer.zero_grad()
    snapshot = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "masters": [m.detach().clone() for m, _ in optimizer.pairs],
        "state": {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                  for p, s in optimizer.optimizer.state.items()},
    }
    scale = optimizer.loss_scale
    model.eval()  # keep batch-norm statistics out of the comparison
    optimizer.backward(F.cross_entropy(model(x), y))
    next(iter(model.parameters())).grad[0].view(-1)[0] = float("nan")
    assert optimizer.step() is False and optimizer.last_step_skipped
    assert optimizer.loss_scale == scale / 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot["model"][key]), key
    for (master, _), saved in zip(optimizer.pairs, snapshot["masters"]):
        assert torch.equal(master, saved)
    for param, state in optimizer.optimizer.state.items():
        for key, value in state.items():
            before = snapshot["state"][id(param)][key]
            assert torch.equal(value, before) if torch.is_tensor(value) else value == before


@pytest.mark.parametrize("recipe", ["fp8", "fp8-hybrid", "fp16"])
def test_checkpoint_resumes_bitwise_in_a_fresh_process(tmp_path, recipe):
    def run(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "tests.checkpoint_run", recipe, *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr

    run("0", "4", "--save", str(tmp_path / "half.pt"))
    run("4", "8", "--load", str(tmp_path / "half.pt"), "--save", str(tmp_path / "resumed.pt"))
    run("0", "8", "--save", str(tmp_path / "straight.pt"))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for a, b in zip(resumed["optimizer"]["masters"], straight["optimizer"]["masters"]):
        assert torch.equal(a, b)
    assert resumed["optimizer"]["scaler"] == straight["optimizer"]["scaler"]
    assert straight["optimizer"]["scaler"]["state"]["skipped"] == 1


def test_scale_sequence_matches_grad_scaler_through_the_wrapper():
    overflow_steps = {1, 4, 5}
    torch.manual_seed(0)
    control = nn.Linear(4, 1)
    control_opt = torch.optim.SGD(control.parameters(), lr=0.1)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2000)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1))
    model, optimizer = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16")
    x = torch.randn(8, 4) * 0.01  # small enough that the scaled FP16 gradients stay finite
    ours, theirs = [], []
    for step in range(8):
        factor = float("inf") if step in overflow_steps else 1.0
        optimizer.backward(model(x).pow(2).mean() * factor)
        stepped = optimizer.step()
        optimizer.zero_grad()
        ours.append((optimizer.loss_scale, stepped))
        control_opt.zero_grad()
        grad_scaler.scale(control(x).pow(2).mean() * factor).backward()
        before = control.weight.detach().clone()
        grad_scaler.step(control_opt)
        grad_scaler.update()
        theirs.append((grad_scaler.get_scale(), not torch.equal(before, control.weight.detach())))
    assert ours == theirs


def test_fp16_without_loss_scaling_loses_gradients_that_scaling_keeps():
    """Gradients of order 1e-8 flush to zero in FP16 (its smallest subnormal is 6e-8)
    unless the loss is scaled first."""
    def grads(recipe) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1))
        model, optimizer = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0), recipe)
        optimizer.backward(model(torch.randn(64, 16)).mean() * 1e-8)
        return torch.cat([g.flatten() for g in optimizer._unscale() if g is not None])

    unscaled = grads(mixprec.get_recipe("fp16").replace(name="fp16-noscale", loss_scale=None))
    scaled = grads("fp16")
    assert (unscaled == 0).float().mean() > 0.9
    assert (scaled == 0).float().mean() < 0.1


def test_clip_grad_norm_clips_unscaled_gradients():
    torch.manual_seed(0)
    model = small_model()
    model, optimizer = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16")
    x, y = teacher_data(16)
    optimizer.backward(F.cross_entropy(model(x), y))
    norm = optimizer.clip_grad_norm_(0.01)
    assert 0.01 < norm.item() < 100  # unscaled: the loss scale 65536 is not in it
    clipped = torch.cat([g.flatten() for g in optimizer._grads if g is not None])
    assert abs(clipped.norm().item() - 0.01) < 1e-4
    with pytest.raises(ValueError, match="after clip_grad_norm_"):
        optimizer.backward(F.cross_entropy(model(x), y))
    assert optimizer.step()


def test_gan_with_two_optimizers_and_several_losses():
    torch.manual_seed(0)
    generator_net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    critic = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    generator_net, opt_g = mixprec.prepare(generator_net, torch.optim.Adam(generator_net.parameters(), 1e-3), "fp16")
    critic, opt_d = mixprec.prepare(critic, torch.optim.Adam(critic.parameters(), 1e-3), "fp8")
    real = torch.randn(32, 8) + 2
    stepped = {"g": 0, "d": 0}
    for _ in range(8):
        fake = generator_net(torch.randn(32, 4))
        opt_d.zero_grad()
        opt_d.backward(F.softplus(-critic(real)).mean())  # two losses, one step
        opt_d.backward(F.softplus(critic(fake.detach())).mean())
        stepped["d"] += opt_d.step()
        opt_g.zero_grad()
        opt_g.backward(F.softplus(-critic(fake)).mean())  # through the critic, at G's scale
        stepped["g"] += opt_g.step()
    assert stepped["g"] >= 4 and stepped["d"] >= 4
    # each scale moved only with its own optimizer's overflows
    for opt in (opt_g, opt_d):
        assert opt.loss_scale == 2.0**16 / 2**opt.scaler.state.skipped


def test_lr_scheduler_on_the_wrapped_optimizer():
    torch.manual_seed(0)
    model = small_model()
    base = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                            {"params": list(model[1:].parameters()), "lr": 0.01}])
    model, optimizer = mixprec.prepare(model, base, "bf16")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer.optimizer, step_size=1, gamma=0.5)
    x, y = teacher_data(16)
    optimizer.backward(F.cross_entropy(model(x), y))
    if optimizer.step():
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [0.05, 0.005]


def test_misuse_gets_clear_errors():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, wrapped = mixprec.prepare(model, optimizer, "fp16")
    with pytest.raises(ValueError, match="call optimizer.backward"):
        wrapped.step()
    with pytest.raises(ValueError, match="already prepared"):
        mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16")
    with pytest.raises(ValueError, match="already prepared"):
        mixprec.prepare(small_model(), wrapped, "fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown recipe"):
        mixprec.prepare(small_model(), torch.optim.SGD(small_model().parameters(), lr=0.1), "fp15")
    no_layers = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="no layer it can convert"):
        mixprec.prepare(no_layers, torch.optim.SGD(no_layers.parameters(), lr=0.1), "fp16")
    with pytest.raises(ValueError, match="scalar loss"):
        wrapped.backward(torch.ones(3))


def test_nan_loss_is_a_skipped_step():
    model = small_model()
    model, optimizer = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16")
    x, y = teacher_data(8)
    optimizer.backward(F.cross_entropy(model(x), y) * float("nan"))
    assert optimizer.step() is False


def test_fp16_without_loss_scaling_does_not_train_where_scaling_does():
    """A loss whose gradients sit below FP16's subnormals: unscaled FP16 training never
    moves the weights; with dynamic loss scaling it trains as FP32 does."""
    def final_weights(recipe):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        model, optimizer = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=1e6), recipe)
        start = [m.detach().clone() for m, _ in optimizer.pairs]
        x = torch.randn(64, 16)
        for _ in range(5):
            optimizer.backward((model(x) - 1).pow(2).mean() * 1e-9)
            optimizer.step()
            optimizer.zero_grad()
        return start, [m.detach() for m, _ in optimizer.pairs]

    noscale = mixprec.get_recipe("fp16").replace(name="fp16-noscale", loss_scale=None)
    start, end = final_weights(noscale)
    assert all(torch.equal(a, b) for a, b in zip(start, end))
    start, end = final_weights("fp16")
    assert all(not torch.equal(a, b) for a, b in zip(start, end))


@pytest.mark.parametrize("recipe", ["fp16", "fp8", "fp8-hybrid"])
def test_lstm_and_attention_models_train(recipe):
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(12, 16)
            self.lstm = nn.LSTM(16, 16, batch_first=True)
            self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 12)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h, _ = self.lstm(self.embed(tokens))
            a, _ = self.attention(h, h, h, need_weights=False, is_causal=True,
                                  attn_mask=nn.Transformer.generate_square_subsequent_mask(tokens.shape[1]))
            return self.head(h + a)

    torch.manual_seed(0)
    model = Tiny()
    model, optimizer = mixprec.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-2), recipe)
    assert {name for name, _ in optimizer.summary.converted} == {"embed", "lstm", "attention", "head"}
    tokens = torch.arange(12).repeat(8, 2)[:, :16]  # a sequence to memorise: next token = +1
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 12), tokens[:, 1:].reshape(-1))
        optimizer.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_module_filter_keeps_chosen_layers_fp32_and_they_still_train():
    torch.manual_seed(0)
    model = small_model()
    head_before = model[6].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = mixprec.prepare(model, optimizer, "fp8", module_filter_fn=lambda module, name: name != "6")
    assert type(model[6]) is nn.Linear and model[6].weight.dtype == torch.float32
    assert type(model[0]) is not nn.Conv2d and model[0].weight.dtype == torch.float16
    assert ("6", "Linear") in optimizer.summary.kept_fp32
    x, y = teacher_data(64)
    optimizer.backward(F.cross_entropy(model(x), y))
    assert optimizer.step()
    moved = model[6].weight.detach() - head_before
    assert moved.abs().max() > 0 and torch.isfinite(moved).all()
