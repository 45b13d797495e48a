"""mixprec.stats: exact counts on a constructed tensor, agreement with mixprec.core.quantize
(the independent reference) on random and adversarial inputs, the observer's hooks,
loss-scaled against unscaled values, the report, the loss-scale history, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mixprec
from mixprec import stats
from mixprec.core import formats
from mixprec.stats.counting import LOG2_MIN

FORMATS = ("fp16", "bf16", "e5m2", "e4m3")


def reference_counts(x: torch.Tensor, fmt: str, scale: float = 1.0) -> tuple[int, int, int]:
    """(flush, subnormal, overflow) of x * scale by rounding with mixprec.quantize."""
    f = formats.get(fmt)
    v = x.float() * scale
    q = mixprec.quantize(v, f, saturate=False)
    nonzero = v != 0
    flush = int(((q == 0) & nonzero).sum())
    overflow = int((torch.isinf(q) | (torch.isnan(q) & ~torch.isnan(v))).sum())
    subnormal = int(((q != 0) & (q.abs() < f.smallest_normal)).sum())
    return flush, subnormal, overflow


def counts_of(c: stats.TensorCounts, fmt: str, scale: float | str) -> tuple[int, int, int]:
    return tuple(c.count(fmt, kind, scale) for kind in stats.KINDS)  # type: ignore[return-value]


def nextafter(value: float, towards: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(towards)))


def test_constructed_tensor_counts_exactly() -> None:
    values = [
        0.0, 0.0, -0.0,                       # zeros, counted apart
        2.0**-25,                             # fp16: half the smallest subnormal, tie to 0 -> flush
        -nextafter(2.0**-25, 1.0),            # just above: rounds to 2^-24 -> subnormal
        2.0**-24,                             # smallest subnormal
        2.0**-14 - 2.0**-24,                  # largest subnormal
        2.0**-14 - 2.0**-25,                  # tie between largest subnormal and 2^-14: goes up -> normal
        1.0,
        65504.0,                              # largest
        nextafter(65520.0, 0.0),              # rounds to 65504
        65520.0,                              # tie past the largest: overflow
        float("inf"), float("-inf"),          # overflow
        float("nan"),                         # neither
        2.0**-26,                             # flush
    ]
    x = torch.tensor(values, dtype=torch.float32)
    c = stats.count_tensor(x, ("fp16", "e4m3"))
    assert (c.numel, c.zeros, c.infs, c.nans, c.nonzero) == (16, 3, 2, 1, 13)
    assert counts_of(c, "fp16", "seen") == (2, 3, 3)
    assert counts_of(c, "fp16", 1.0) == (2, 3, 3)
    # e4m3: flush at or below 2^-10, subnormal below 2^-6 - 2^-10, overflow above 464
    assert counts_of(c, "e4m3", "seen") == (6, 0, 5)  # the six tiny values; 65504 and up
    assert c.amax == 65520.0
    # histogram: one bin per binade, finite nonzero values only
    expected = {-26: 1, -25: 2, -24: 1, -15: 2, 0: 1, 15: 3}  # 65504 <= 65520 < 2^16
    for j, n in expected.items():
        assert c.hist[j - LOG2_MIN] == n, j
    assert c.hist.sum() == 10
    assert counts_of(c, "fp16", "seen") == reference_counts(x, "fp16")
    assert counts_of(c, "e4m3", "seen") == reference_counts(x, "e4m3")


def test_e4m3_ties_at_the_top_stay_finite() -> None:
    x = torch.tensor([448.0, 464.0, nextafter(464.0, 1e9), 2.0**-10, nextafter(2.0**-10, 1.0), -500.0])
    c = stats.count_tensor(x, ("e4m3",))
    assert counts_of(c, "e4m3", "seen") == (1, 1, 2) == reference_counts(x, "e4m3")


def adversarial(fmt: str) -> torch.Tensor:
    """Every threshold of the format, its float32 neighbours, and their negatives."""
    t = stats.thresholds(fmt)
    points = []
    for value in (t.flush_at_or_below, t.subnormal_below, t.overflow_from, formats.get(fmt).smallest_normal,
                  formats.get(fmt).smallest_subnormal, formats.get(fmt).largest):
        points += [value, nextafter(value, 0.0), nextafter(value, math.inf)]
    x = torch.tensor(points, dtype=torch.float32)
    return torch.cat([x, -x, torch.tensor([0.0, math.inf, math.nan])])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [1000, 1 << 17])  # the sorting and the bincount paths
def test_counts_agree_with_quantize(fmt: str, size: int) -> None:
    exponent = torch.randint(-150, 128, (size,))
    x = torch.ldexp(torch.rand(size) + 0.5, exponent) * torch.sign(torch.randn(size))
    x = torch.cat([x, adversarial(fmt)])
    c = stats.count_tensor(x, (fmt,), exponents=(-3, 0, 5))
    assert counts_of(c, fmt, "seen") == reference_counts(x, fmt)
    assert counts_of(c, fmt, 1.0) == reference_counts(x, fmt)
    # what-if scales; exact where x * 2^k does not leave float32's normal range
    small = x[(x.abs() > 2.0**-100) & (x.abs() < 2.0**100) | ~torch.isfinite(x)]
    cs = stats.count_tensor(small, (fmt,), exponents=(-3, 0, 5))
    for k in (-3, 5):
        assert counts_of(cs, fmt, 2.0**k) == reference_counts(small, fmt, 2.0**k)


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=200),
       st.sampled_from(FORMATS))
def test_counts_agree_with_quantize_hypothesis(values: list[float], fmt: str) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    c = stats.count_tensor(x, (fmt,))
    assert counts_of(c, fmt, "seen") == reference_counts(x, fmt)
    assert c.zeros == int((x == 0).sum()) and c.nans == int(torch.isnan(x).sum())
    assert c.hist.sum() == int((torch.isfinite(x) & (x != 0)).sum())


def test_sort_and_bincount_paths_agree() -> None:
    x = torch.randn(1 << 16) * 1e-4
    big = stats.count_tensor(x, FORMATS, exponents=tuple(range(-8, 41)))
    halves = [stats.count_tensor(part, FORMATS, exponents=tuple(range(-8, 41))) for part in x.split(20000)]
    merged = halves[0]
    for part in halves[1:]:
        merged = merged.merged(part)
    assert np.array_equal(big.hist, merged.hist) and np.array_equal(big.what_if, merged.what_if)
    assert np.array_equal(big.seen, merged.seen) and big.amax == merged.amax


@pytest.mark.parametrize("s", [0, 10, 16])
def test_scaled_values_unscale_exactly(s: int) -> None:
    u = torch.ldexp(torch.rand(5000) + 0.5, torch.randint(-40, 0, (5000,)))
    scaled = stats.count_tensor(u * 2.0**s, FORMATS, scale=2.0**s, exponents=(0, s))
    plain = stats.count_tensor(u, FORMATS, exponents=(0, s))
    assert np.array_equal(scaled.hist, plain.hist)
    assert scaled.amax == plain.amax
    for fmt in FORMATS:
        assert counts_of(scaled, fmt, 1.0) == counts_of(plain, fmt, "seen")
        assert counts_of(scaled, fmt, "seen") == counts_of(plain, fmt, 2.0**s) == reference_counts(u, fmt, 2.0**s)


def test_float16_and_bfloat16_inputs() -> None:
    x = torch.randn(3000) * 1e-3
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        c = stats.count_tensor(low, FORMATS)
        for fmt in FORMATS:
            assert counts_of(c, fmt, "seen") == reference_counts(low.float(), fmt)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_hooks_see_each_layer_and_class() -> None:
    model = Net()
    x = torch.randn(4, 6)
    outputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(module, args, output):  # type: ignore[no-untyped-def]
            outputs[name] = output.detach().clone()
            output.register_hook(lambda g: grads.__setitem__(name, g.clone()))
        return hook

    model.fc1.register_forward_hook(keep("fc1"))
    model.fc2.register_forward_hook(keep("fc2"))
    with stats.observe(model, formats=("fp16",)) as obs:
        model(x).pow(2).sum().backward()
        obs.step()
    summary = obs.summary()
    assert summary.layers == ("fc1", "fc2") and summary.layer_types == ("Linear", "Linear")
    assert {cls for _, cls in summary.counts} == set(stats.TENSOR_CLASSES)
    for name, module in (("fc1", model.fc1), ("fc2", model.fc2)):
        act = summary.get(name, "activation")
        assert act.numel == outputs[name].numel() and act.amax == outputs[name].abs().max().item()
        err = summary.get(name, "error")
        assert err.numel == grads[name].numel() and err.amax == grads[name].abs().max().item()
        weight = summary.get(name, "weight")
        assert weight.numel == module.weight.numel() + module.bias.numel()
        wgrad = summary.get(name, "weight_grad")
        amax = max(module.weight.grad.abs().max().item(), module.bias.grad.abs().max().item())
        assert wgrad.numel == weight.numel and wgrad.amax == amax
    assert summary.steps_sampled == 1
    # hooks are gone after the block
    model(x).sum().backward()
    assert obs.summary().get("fc1", "activation").samples == 1


def test_sampling_every_n_steps_and_no_grad_passes() -> None:
    model = Net()
    with stats.observe(model, every=3) as obs:
        for _ in range(7):  # steps 0, 3, 6 are sampled
            model(torch.randn(2, 6)).sum().backward()
            with torch.no_grad():
                model(torch.randn(2, 6))  # evaluation: not recorded
            obs.step()
    summary = obs.summary()
    assert summary.steps_sampled == 3
    assert summary.get("fc1", "activation").samples == 3 and summary.get("fc1", "weight").samples == 6


def test_errors_carry_the_optimizers_loss_scale() -> None:
    torch.manual_seed(0)
    model = Net()
    recipe = mixprec.get_recipe("fp16").replace(name="fp16-static", loss_scale=1024.0)
    model, optimizer = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe)
    seen: list[float] = []

    def keep(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: seen.append(g.abs().max().item()))

    model.fc2.register_forward_hook(keep)
    with stats.observe(model, loss_scale=optimizer) as obs:
        optimizer.backward(model(torch.randn(4, 6)).pow(2).mean())
        optimizer.step()
        obs.step()
    summary = obs.summary()
    assert summary.loss_scales == (1024.0,) and summary.recipe == "fp16-static"
    errors = summary.get("fc2", "error")
    assert errors.amax == seen[0] / 1024  # unscaled
    assert errors.count("fp16", "flush", 1024.0) == errors.count("fp16", "flush", "seen")


def test_report_writes_files_with_sane_content(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    with stats.observe(model, loss_scale=lambda: 1.0) as obs:
        for _ in range(2):
            (model(torch.randn(8, 6)) * 1e-8).sum().backward()  # tiny errors: fp16 flushes some
            obs.step()
    path = obs.report(tmp_path, recipe="fp16")
    text = path.read_text()
    for heading in ("Activation gradients across the model", "Does the recipe need a loss scale?",
                    "Recommended loss scale per format", "Layers ranked", "Precision advisor"):
        assert heading in text
    for name in ("errors_histogram.png", "loss_scale_sweep.png", "error_layers.png", "weight_layers.png"):
        assert (tmp_path / name).stat().st_size > 5000
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "stats.json").read_text())
    fp16 = record["loss_scale"]["fp16"]
    assert fp16["flush_unscaled"] > 0 and fp16["flush_at_scale"] < fp16["flush_unscaled"]
    assert record["verdict"]["needs_loss_scale"] is True
    summary = obs.summary()
    amax = max(summary.total("error").amax, summary.total("weight_grad").amax)
    assert 2.0 ** fp16["exponent"] * amax <= 65504 / 8 < 2.0 ** (fp16["exponent"] + 1) * amax


def test_advisor_picks_the_narrowest_format_that_fits() -> None:
    model = Net()
    with torch.no_grad():
        model.fc1.weight.fill_(0.25)
        model.fc2.weight.fill_(1e-6)  # below e4m3's and e5m2's range, inside fp16's subnormals
    with stats.observe(model, formats=FORMATS) as obs:
        model(torch.randn(2, 6)).sum().backward()
    advice = {(a.layer, a.cls): a for a in stats.advise_formats(obs.summary(), tolerance=1e-3)}
    assert advice[("fc1", "weight")].format in ("e4m3", "e5m2")
    assert advice[("fc2", "weight")].format in ("fp16", "bf16")


def test_loss_scale_history_counts_skipped_steps() -> None:
    model = Net()
    model, optimizer = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16")
    for inject in (False, True, False):
        loss = model(torch.randn(2, 6)).float().mean() * (math.inf if inject else 1e-3)
        optimizer.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    history = stats.loss_scale_history(optimizer)
    assert history.steps == (1, 2, 3) and history.skipped == (False, True, False)
    assert history.skipped_steps == 1 and history.skipped_at == (2,)
    assert history.scales == (65536.0, 32768.0, 32768.0) and history.final_scale == 32768.0
    assert history.dynamic and history.as_record()["curve"][1] == [2, 32768.0]
    assert stats.loss_scale_history(optimizer.scaler) == history


def test_bad_input_gives_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown format"):
        stats.StatsConfig(formats=("fp17",))
    with pytest.raises(ValueError, match="1 to 10 mantissa bits"):
        stats.thresholds("fp32")
    with pytest.raises(ValueError, match="every must be"):
        stats.StatsConfig(every=0)
    with pytest.raises(ValueError, match="unknown tensor classes"):
        stats.StatsConfig(classes=("gradients",))
    with pytest.raises(TypeError, match="nn.Module"):
        stats.observe("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss_scale must be"):
        stats.observe(Net(), loss_scale="big")
    with pytest.raises(ValueError, match="no layer to observe"):
        stats.observe(nn.ReLU())
    with pytest.raises(TypeError, match="floating-point"):
        stats.count_tensor(torch.arange(3))
    counts = stats.count_tensor(torch.ones(3), ("fp16",))
    with pytest.raises(ValueError, match="recorded at scales"):
        counts.share("fp16", "flush", 3.0)
    with pytest.raises(ValueError, match="was not observed"):
        counts.share("e4m3", "flush")
    with pytest.raises(ValueError, match="kind must be"):
        counts.share("fp16", "underflow")
    with pytest.raises(ValueError, match="nothing was recorded"):
        stats.observe(Net()).report(tmp_path)


# ---- block formats -------------------------------------------------------------------


def test_block_formats_count_against_their_own_blocks_padded() -> None:
    x = torch.randn(3, 5, 40)  # 40: not a multiple of 32 nor 16, padded with zeros
    x[1, 2, 0] = 60.0  # 7.5 * 2**3 in E2M1: clips
    x[0, 0, 1] = 1e-9  # beside values near 1: flushes
    c = stats.count_tensor(x, ("fp16", "mxfp4_e2m1", "nvfp4_16x16"), scale=2.0**10, exponents=(0, 4))
    padded = torch.nn.functional.pad(x.reshape(15, 40), (0, 24))
    want = mixprec.core.block_quantize.block_counts(padded, formats.blocks.mxfp4_e2m1)
    assert counts_of(c, "mxfp4_e2m1", "seen") == (want.flushed, want.subnormal, want.clipped)
    assert want.clipped >= 1 and want.flushed >= 1
    for scale in ("seen", 1.0, 16.0):  # block scales follow any power-of-two scale
        assert c.count("mxfp4_e2m1", "clip", scale) == want.clipped
    tiles = mixprec.core.block_quantize.block_counts(
        torch.nn.functional.pad(x.reshape(15, 40), (0, 8, 0, 1)), formats.blocks.nvfp4_16x16)
    assert counts_of(c, "nvfp4_16x16", "seen") == (tiles.flushed, tiles.subnormal, tiles.clipped)
    assert counts_of(c, "fp16", "seen") == counts_of(stats.count_tensor(x, ("fp16",), 2.0**10, (0, 4)), "fp16", "seen")
    assert c.nonzero == x.numel() and c.share("mxfp4_e2m1", "lost") > 0
    only_blocks = stats.count_tensor(x, ("mxfp4_e2m1",))
    assert counts_of(only_blocks, "mxfp4_e2m1", "seen") == counts_of(c, "mxfp4_e2m1", "seen")


def test_block_formats_in_the_observer_verdict_advisor_and_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
        model.fc1.weight[:, 0] = 7.5  # one value per row clips in MXFP4 (rows of 6, padded to 32)
        model.fc1.bias.fill_(1.0)  # counted with the weights: 35 values, 5 clipped
    config = stats.StatsConfig(formats=("fp16", "e4m3", "mxfp4_e2m1", "mxfp8_e4m3:rceil"))
    with stats.Observer(model, config) as obs:
        model(torch.randn(8, 6)).sum().backward()
        obs.step()
    summary = obs.summary()
    weight = summary.get("fc1", "weight")
    assert weight.share("mxfp4_e2m1", "clip") == pytest.approx(1 / 7)
    assert weight.share("mxfp8_e4m3:rceil", "clip") == 0
    rows = {(r.layer, r.cls, r.format): r for r in stats.block_shares(summary)}
    assert rows[("fc1", "weight", "mxfp4_e2m1")].clipped == pytest.approx(1 / 7)
    assert ("(model)", "error", "mxfp8_e4m3:rceil") in rows
    for recipe in ("mxfp8", "nvfp4", "mxfp4", "fp8-blockwise"):
        verdict = stats.recipe_verdict(summary, recipe)
        assert not verdict.needs_loss_scale and "block format" in verdict.reason
    assert "clip at the block's largest value" in stats.recipe_verdict(summary, "mxfp4").reason
    assert {a.format for a in stats.advise_formats(summary)} <= {"fp16", "e4m3", "fp32"}
    with pytest.raises(ValueError, match="no loss scale to recommend"):
        stats.recommend_loss_scale(summary, "mxfp4_e2m1")
    text = obs.report(tmp_path, recipe="mxfp4").read_text()
    assert "## Block formats: values clipped and flushed per layer" in text
    assert "| fc1 | weight | mxfp4_e2m1 | 35 | 14.29% |" in text
    record = json.loads((tmp_path / "stats.json").read_text())
    assert any(b["format"] == "mxfp4_e2m1" and b["clipped"] > 0 for b in record["blocks"])
