"""The GEMM kernel choice (:mod:`mixprec.nn.kernels`): which operands are exact in BF16,
which kernel each GEMM gets under each policy and capability, and that the BF16 path,
forced at small sizes on every machine, gives the FP32 path's results up to the order
of FP32 summation (single rounding), with the opt-in double rounding measured."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mixprec
from mixprec.nn import kernels
from mixprec.nn.kernels import KernelPolicy, bf16_exact, choose, fp16_exact, gemm_kernels
from mixprec.nn.state import EngineState, quantize_operand
from mixprec.recipe import Operand, TensorScaling

AUTO, FORCED, FP32 = KernelPolicy("auto"), KernelPolicy("bf16"), KernelPolicy("fp32")
BF16, E5M2, FP16 = Operand("bf16"), Operand("e5m2"), Operand("fp16")
E4M3_POW2 = Operand("e4m3", scaling=TensorScaling("delayed"))


@pytest.fixture
def capabilities(monkeypatch: pytest.MonkeyPatch):
    """A fresh capability cache whose probes the test sets: ``set(native=..., bias=...)``
    (``bias=None``: the real fused-bias probe, so a mocked True never calls a missing op)."""
    monkeypatch.setattr(kernels, "_capabilities", {})

    def set_probes(native: bool = True, bias: bool | None = None) -> None:
        monkeypatch.setattr(kernels, "_probe_native_bf16", lambda device_type: native and device_type == "cpu")
        if bias is not None:
            monkeypatch.setattr(kernels, "_probe_fused_bias", lambda: bias)

    return set_probes


class GemmLog(TorchDispatchMode):
    """The input dtypes of every GEMM-family aten op that runs inside it, and the paths
    (:data:`mixprec.nn.kernels.GemmPath`) of its matrix products: float32 operands in
    oneDNN's BF16 math mode are ``"bf16-fp32"``."""

    OPS = ("mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "_linear_pointwise",
           "gemm_bf16_packed")

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()
        self.calls: set[tuple[str, torch.dtype]] = set()
        self.paths: set[str] = set()
        self.count = 0
        self.eager = mixprec.kernel_backend("eager")  # torch.compile refuses to run under a dispatch mode

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.eager.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        super().__exit__(*exc)
        self.eager.__exit__(*exc)
        self.eager = mixprec.kernel_backend("eager")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ in self.OPS:
            self.count += 1
            # the GEMM's operands: the first two tensor arguments (the native BF16-units
            # GEMM's second is its packed operand: "bf16-fp32", as its first's dtype)
            native_dot = func.overloadpacket.__name__ == "gemm_bf16_packed"
            tensors = [a for a in args if isinstance(a, torch.Tensor)][:1 if native_dot else 2]
            self.dtypes |= {t.dtype for t in tensors}
            self.calls |= {(func.overloadpacket.__name__, t.dtype) for t in tensors}
            if "convolution" not in func.overloadpacket.__name__:
                products = torch.backends.mkldnn.matmul.fp32_precision == "bf16" or native_dot
                self.paths |= {"bf16" if t.dtype == torch.bfloat16 else "bf16-fp32" if products else "fp32"
                               for t in tensors}
        return func(*args, **(kwargs or {}))


# ---- which operands are BF16 values -----------------------------------------------------


@pytest.mark.parametrize(("operand", "exact"), [
    (BF16, True), (Operand("e4m3"), True), (E5M2, True), (E4M3_POW2, True),
    (Operand("e5m2", "stochastic"), True), (Operand("e3m4"), True),
    (Operand("e4m3", scaling=TensorScaling("current", power_of_two=False)), False),
    (FP16, False), (Operand(), False), (Operand("e8m8"), False), (Operand("e5m7"), True),
    (Operand("mxfp8_e4m3:rceil"), True), (Operand("mxfp4_e2m1"), True), (Operand("mxfp6_e3m2"), True),
    (Operand("nvfp4"), False), (Operand("fp8_block128"), False), (Operand("fp8_block128x128"), False),
    (Operand("fp8_block128:rceil"), True), (Operand("fp8_block128x128:rceil"), True),
])
def test_bf16_exact_by_format_and_scaling(operand: Operand, exact: bool) -> None:
    assert bf16_exact(operand) is exact


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_fp8_value_times_a_power_of_two_is_a_bf16_value(dtype: torch.dtype) -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    codes = codes[torch.isfinite(codes)]
    for exponent in (-100, -20, 0, 20, 100):
        values = codes * 2.0**exponent
        assert torch.equal(values.bfloat16().float(), values), exponent


def test_fp16_values_are_not_all_bf16_values() -> None:
    values = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    values = values[torch.isfinite(values)]
    assert not torch.equal(values.bfloat16().float(), values)


@pytest.mark.parametrize("operand", [
    BF16, Operand("e4m3"), E4M3_POW2, Operand("e5m2", scaling=TensorScaling("current")),
    Operand("mxfp8_e4m3:rceil"), Operand("mxfp4_e2m1"),
])
def test_bf16_values_are_the_operands_values_exactly(operand: Operand) -> None:
    state = EngineState(mixprec.get_recipe("fp8-hybrid"), None)
    x = torch.randn(16, 64) * 100
    q = quantize_operand(x, operand, state, "site")
    for held in (q, q.drop_values()):  # fresh (float32 values held) and as saved for backward
        values = kernels.bf16_values(held)
        assert values.dtype == torch.bfloat16
        assert torch.equal(values.float(), q.values())


# ---- the choice -------------------------------------------------------------------------


def test_auto_takes_bf16_only_where_exact_with_a_bf16_result(capabilities) -> None:
    capabilities(native=True)
    assert choose((BF16, BF16), BF16, AUTO, "cpu") == "bf16"
    assert choose((BF16, BF16), BF16, AUTO, "cpu", bias=True) == ("bf16" if kernels.fused_bias_exact() else "fp32")
    assert choose((E4M3_POW2, Operand("e5m2", scaling=TensorScaling("delayed"))), BF16, AUTO, "cpu") == "bf16"
    assert choose((Operand("mxfp8_e4m3:rceil"),) * 2, BF16, AUTO, "cpu") == "bf16"
    assert choose((BF16, FP16), BF16, AUTO, "cpu") == "fp32"  # FP16 operands are not BF16 values
    # the FP32 sum itself needed (an FP32 result; SR): BF16 products, FP32 out
    assert choose((BF16, BF16), Operand(), AUTO, "cpu") == "bf16-fp32"
    assert choose((BF16, BF16), Operand("bf16", "stochastic"), AUTO, "cpu") == "bf16-fp32"
    # FP32 tensor scales (NVFP4): applied to the FP32 sum, so BF16 products with an FP32 result
    assert choose((Operand("nvfp4"), Operand("nvfp4_16x16")), BF16, AUTO, "cpu") == "bf16-fp32"
    assert choose((Operand("nvfp4"), BF16), BF16, AUTO, "cpu") == "bf16-fp32"
    assert choose((Operand("fp8_block128"),) * 2, BF16, AUTO, "cpu") == "fp32"  # FP32 block scales
    assert choose((BF16, BF16), BF16, FP32, "cpu") == "fp32"
    assert choose((BF16, BF16), Operand(), FP32, "cpu") == "fp32"


def test_narrow_results_take_bf16_only_when_opted_in(capabilities) -> None:
    capabilities(native=True)
    assert choose((E5M2, E5M2), E5M2, AUTO, "cpu") == "bf16-fp32"  # single rounding from the FP32 sum
    assert choose((E5M2, E5M2), E5M2, FORCED, "cpu") == "bf16-fp32"
    assert choose((E5M2, E5M2), E5M2, KernelPolicy("auto", double_rounding=True), "cpu") == "bf16"
    assert choose((E5M2, E5M2), Operand("e5m2", "stochastic"), KernelPolicy("bf16", True), "cpu") == "bf16"
    assert choose((FP16, FP16), E5M2, KernelPolicy("bf16", True), "cpu") == "fp32"  # wider than BF16


def test_without_native_bf16_auto_keeps_fp32_and_forcing_still_works(capabilities) -> None:
    capabilities(native=False)
    assert choose((BF16, BF16), BF16, AUTO, "cpu") == "fp32"
    assert choose((BF16, BF16), BF16, FORCED, "cpu") == "bf16"
    assert choose((E5M2, E5M2), E5M2, AUTO, "cpu") == "fp32"
    assert choose((E5M2, E5M2), E5M2, FORCED, "cpu") == "bf16-fp32"
    assert not kernels.native_bf16("cpu")


def test_a_bias_needs_the_fused_exact_linear(capabilities) -> None:
    capabilities(native=True, bias=False)
    # the bias added to the FP32 sum after the GEMM, then one rounding
    assert choose((BF16, BF16), BF16, AUTO, "cpu", bias=True) == "bf16-fp32"
    assert choose((BF16, BF16), BF16, FORCED, "cpu", bias=True) == "bf16-fp32"
    assert choose((BF16, BF16), BF16, AUTO, "cpu", bias=False) == "bf16"


def test_auto_keeps_fp32_kernels_on_cuda(capabilities) -> None:
    capabilities(native=True)
    assert choose((BF16, BF16), BF16, AUTO, "cuda") == "fp32"
    assert choose((E5M2, E5M2), E5M2, FORCED, "cuda") == "fp32"  # oneDNN's math mode is the CPU's


def test_capabilities_are_probed_once_at_first_use(capabilities, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(kernels, "_probe_native_bf16", lambda device_type: calls.append(device_type) or True)
    assert kernels._capabilities == {}
    assert kernels.native_bf16("cpu") and kernels.native_bf16("cpu")
    assert calls == ["cpu"]


def test_the_real_capability_probes_answer() -> None:
    # the fused-bias probe tells single from double rounding; where it says True the
    # op must round once (the BF16 path of biased GEMMs is tested below)
    assert isinstance(kernels._probe_native_bf16("cpu"), bool)
    assert kernels._probe_native_bf16("cuda") is False
    assert isinstance(kernels._probe_fused_bias(), bool)


def test_gemm_kernels_scopes_and_restores_the_policy() -> None:
    before = kernels.current_policy()
    with gemm_kernels("fp32") as outer:
        assert kernels.current_policy() == outer == KernelPolicy("fp32")
        with gemm_kernels("bf16", double_rounding=True):
            assert kernels.current_policy() == KernelPolicy("bf16", True)
        assert kernels.current_policy() == outer
    assert kernels.current_policy() == before


def test_gemm_kernels_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        KernelPolicy("fast")  # type: ignore[arg-type]


def test_environment_sets_the_default_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXPREC_GEMM_KERNELS", "fp32")
    assert kernels._PolicyState().policy == KernelPolicy("fp32")
    monkeypatch.setenv("MIXPREC_GEMM_KERNELS", "nonsense")
    with pytest.warns(RuntimeWarning, match="MIXPREC_GEMM_KERNELS"):
        assert kernels._PolicyState().policy == AUTO


# ---- the forced BF16 path gives the FP32 path's results ----------------------------------


def same_up_to_summation_order(fast: torch.Tensor, slow: torch.Tensor, bound: torch.Tensor) -> None:
    """Both are one rounding to BF16 of FP32 sums that may differ by summation order:
    equal bit for bit almost everywhere; elsewhere within one BF16 step plus the FP32
    summation error bound ``bound`` (2 K 2**-24 sum |a b|, per element)."""
    fast, slow = fast.double(), slow.double()
    step = slow.abs() * 2.0**-7 + 2.0**-126
    assert bool(((fast - slow).abs() <= step + bound.double()).all()), float(((fast - slow).abs() - step).max())
    assert float((fast != slow).double().mean()) < 0.01


def run_both(build, inputs, recipe: str, backward: bool = True):
    """The module under the recipe, once per forced policy: outputs, gradients, GEMM dtypes."""
    results = {}
    for mode in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = mixprec.convert(build(), mixprec.get_recipe(recipe).replace(keep=mixprec.KeepHighPrecision()))
        xs = [x.clone().requires_grad_(backward) for x in inputs]
        log = GemmLog()
        with log, gemm_kernels(mode):  # type: ignore[arg-type]
            y = model(*xs)
        if backward:
            with log:
                (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads = [x.grad for x in xs] + [p.grad for p in model.parameters()] if backward else []
        results[mode] = (y.float().detach(), grads, log)
    return results


def magnitude_bound(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """2 K 2**-24 sum |a b| for a @ b_t.T, loosened by 4 for the operands' rounding."""
    k = a.shape[-1]
    return 4 * 2 * k * 2.0**-24 * (a.abs() @ b_t.abs().t())


@pytest.mark.parametrize("recipe", ["bf16", "fp8-hybrid", "mxfp8"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_bf16_path_matches_fp32_path(recipe: str, bias: bool) -> None:
    x = torch.randn(64, 96) * 2
    results = run_both(lambda: nn.Linear(96, 48, bias=bias), [x], recipe)
    (y32, g32, log32), (y16, g16, log16) = results["fp32"], results["bf16"]
    assert log32.dtypes == {torch.float32} and log32.count >= 3
    fused = bias and kernels.fused_bias_exact()
    if not bias or fused:
        assert log16.dtypes == {torch.bfloat16}
    torch.manual_seed(0)
    weight = nn.Linear(96, 48, bias=bias).weight.detach()
    same_up_to_summation_order(y16, y32, magnitude_bound(x, weight))
    for fast, slow in zip(g16, g32):
        assert torch.equal(fast.bfloat16().float(), fast)  # on the BF16 grid
        same_up_to_summation_order(fast, slow, slow.abs().max() * 2.0**-10 * torch.ones_like(slow))


@pytest.mark.parametrize("recipe", ["bf16", "fp8-hybrid"])
def test_conv_and_attention_bf16_path_matches_fp32_path(recipe: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).float().flatten(2).transpose(1, 2).reshape(2, 4, -1, 8)  # (B, heads, L, 8)
            return F.scaled_dot_product_attention(h, h * 0.5, h, is_causal=True)

    x = torch.randn(2, 4, 8, 8)
    results = run_both(Net, [x], recipe)
    (y32, g32, log32), (y16, g16, log16) = results["fp32"], results["bf16"]
    assert log32.dtypes == {torch.float32}
    # BF16 kernels, except the convolution's weight gradient (FP32 by design: see ops.py)
    assert {("convolution", torch.bfloat16), ("bmm", torch.bfloat16)} <= log16.calls
    assert ("convolution_backward", torch.float32) in log16.calls
    for fast, slow in zip([y16, *g16], [y32, *g32]):
        # a one-step difference in a BF16 output moves what follows by up to a few BF16 steps
        scale = slow.abs().max()
        assert float((fast - slow).abs().max()) <= float(scale) * 2.0**-5
        assert float((fast != slow).double().mean()) < 0.05


def test_fp16_gemms_with_a_bias_keep_fp32_kernels_even_when_forced() -> None:
    results = run_both(lambda: nn.Linear(32, 16), [torch.randn(8, 32)], "fp16", backward=False)
    assert results["bf16"][2].dtypes == {torch.float32}
    assert torch.equal(results["bf16"][0], results["fp32"][0])


@pytest.mark.parametrize("native", [False, True])
def test_auto_follows_the_capability_check(capabilities, native: bool) -> None:
    capabilities(native=native)
    model = mixprec.convert(nn.Linear(32, 16), "bf16")
    log = GemmLog()
    with log:
        model(torch.randn(8, 32, requires_grad=True)).float().sum().backward()
    assert log.dtypes == ({torch.bfloat16} if native else {torch.float32})


def test_backward_keeps_the_forward_policy() -> None:
    model = mixprec.convert(nn.Linear(32, 16, bias=False), "bf16")
    x = torch.randn(8, 32, requires_grad=True)
    with gemm_kernels("bf16"):
        y = model(x)
    log = GemmLog()
    with gemm_kernels("fp32"), log:
        y.float().sum().backward()
    assert log.dtypes == {torch.bfloat16} and log.count == 2


# ---- a training step under each path -------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.mark.parametrize("recipe", ["bf16", "fp8-hybrid"])
def test_mlp_training_steps_agree_across_paths(recipe: str) -> None:
    torch.manual_seed(0)
    reference = mlp()
    data = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(3)]
    trained = {}
    for mode in ("fp32", "bf16"):
        model = copy.deepcopy(reference)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, wrapped = mixprec.prepare(model, optimizer, mixprec.get_recipe(recipe).replace(
            keep=mixprec.KeepHighPrecision()))
        log, losses = GemmLog(), []
        for x, y in data:
            with gemm_kernels(mode), log:  # type: ignore[arg-type]
                loss = F.cross_entropy(model(x).float(), y)
                wrapped.backward(loss)
            wrapped.step()
            wrapped.zero_grad()
            losses.append(float(loss.detach()))
        trained[mode] = (losses, [p.detach().clone() for p in model.parameters()], log)
    (losses32, params32, log32), (losses16, params16, log16) = trained["fp32"], trained["bf16"]
    assert log32.dtypes == {torch.float32}
    assert torch.bfloat16 in log16.dtypes
    assert losses16 == pytest.approx(losses32, rel=1e-2)
    for start, fast, slow in zip(reference.parameters(), params16, params32):
        update = (slow - start.detach()).abs().max()
        # the updates agree up to BF16 summation-order noise in the gradients
        assert float((fast - slow).abs().max()) <= float(update) * 2.0**-4


# ---- the opt-in double rounding -------------------------------------------------------------


def e5m2_step(y: torch.Tensor) -> torch.Tensor:
    exponent = torch.floor(torch.log2(y.abs().clamp_min(2.0**-14)))
    return 2.0 ** (exponent - 2)


def test_double_rounding_to_e5m2_is_opt_in_and_its_share_small_but_nonzero() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    outputs = {}
    for name, policy in (("fp32", dict(mode="fp32")), ("forced", dict(mode="bf16")),
                         ("double", dict(mode="bf16", double_rounding=True))):
        torch.manual_seed(0)
        model = mixprec.convert(nn.Linear(256, 256, bias=False), mixprec.get_recipe("fp8").replace(
            keep=mixprec.KeepHighPrecision()))
        log = GemmLog()
        with torch.no_grad(), gemm_kernels(**policy), log:  # type: ignore[arg-type]
            outputs[name] = model(x).float()
        outputs[name + ".dtypes"] = log.dtypes  # type: ignore[assignment]
        outputs[name + ".paths"] = log.paths  # type: ignore[assignment]
    # E5M2 results: the FP32 sum (on BF16 products) unless opted in
    assert outputs["forced.dtypes"] == {torch.float32}
    assert outputs["forced.paths"] == {"bf16-fp32"} and outputs["fp32.paths"] == {"fp32"}
    assert float((outputs["forced"] != outputs["fp32"]).double().mean()) < 0.002  # summation order only
    assert outputs["double.dtypes"] == {torch.bfloat16}
    single, double = outputs["fp32"], outputs["double"]
    off = single != double
    share = float(off.double().mean())
    print(f"E5M2 results off by double rounding: {share:.2%}")
    assert 0.001 < share < 0.05, share  # 1.58% measured (documented in mixprec.nn.kernels)
    # every difference is one E5M2 step
    diff = (double - single).abs()[off]
    low = e5m2_step(torch.minimum(single.abs(), double.abs()))[off]
    high = e5m2_step(torch.maximum(single.abs(), double.abs()))[off]
    assert bool(((diff >= low) & (diff <= high)).all())


@pytest.mark.cuda
def test_forced_bf16_path_on_cuda_matches_fp32() -> None:
    """Untested path: torch's BF16 GEMM on CUDA (cuBLAS may reduce split-K partial sums in
    BF16); "auto" never takes it. Runs only with a CUDA device, which CI lacks."""
    x = torch.randn(64, 96, device="cuda")
    model = mixprec.convert(nn.Linear(96, 48, bias=False).cuda(), "bf16")
    with gemm_kernels("fp32"):
        slow = model(x).float()
    with gemm_kernels("bf16"):
        fast = model(x).float()
    torch.manual_seed(0)
    same_up_to_summation_order(fast, slow, slow.abs().max() * 2.0**-10 * torch.ones_like(slow))


# ---- the FP8 tensor-core path (torch._scaled_mm) ------------------------------------------------


def _e5m2_results() -> mixprec.Recipe:
    """fp8-hybrid with E5M2 results (paper 2's result format): a result narrower than
    the kernel's output, rounded once from its FP32 sum."""
    hybrid = mixprec.get_recipe("fp8-hybrid")
    e5m2 = Operand("e5m2")
    return hybrid.replace(name="fp8-hybrid-e5m2-results", forward=dataclasses.replace(hybrid.forward, result=e5m2),
                          dgrad=dataclasses.replace(hybrid.dgrad, result=e5m2),
                          wgrad=dataclasses.replace(hybrid.wgrad, result=e5m2))


def _fp8_linear_run(device: str, mode: str, recipe: str | mixprec.Recipe = "fp8-hybrid"):  # type: ignore[no-untyped-def]
    """Output and gradients of a Linear under ``recipe`` (nothing kept in high precision)
    on ``device``, with a batched input, under kernel policy ``mode``."""
    torch.manual_seed(0)
    recipe = mixprec.get_recipe(recipe) if isinstance(recipe, str) else recipe
    model = mixprec.convert(nn.Linear(64, 48).to(device), recipe.replace(keep=mixprec.KeepHighPrecision()))
    x = torch.randn(4, 8, 64, device=device, generator=None).requires_grad_()
    with gemm_kernels(mode):  # type: ignore[arg-type]
        out = model(x)
        out.float().square().sum().backward()
    return out.float(), x.grad.float(), model.weight.grad.float(), model.bias.grad.float()


@pytest.mark.parametrize("recipe", ["fp8-hybrid", "e5m2-results"])
def test_fp8_tensor_core_path_gives_the_fp32_kernels_results(recipe: str, capabilities,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``torch._scaled_mm`` path's glue (storage layouts, transposes, scales, the
    three GEMMs of a linear layer, bias and one rounding after an FP32 output), run on
    the CPU, where torch._scaled_mm exists too, by declaring FP8 tensor cores present:
    the FP32 kernels' outputs and gradients up to the order of FP32 summation, and
    each GEMM went through _scaled_mm with the operands' 1-byte storage."""
    capabilities(native=False)
    monkeypatch.setattr(kernels, "_probe_fp8_tensor_cores", lambda device: True)
    calls: list[tuple[torch.dtype, torch.dtype]] = []
    real = torch._scaled_mm

    def counting(a, b, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((a.dtype, b.dtype))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    narrow = recipe == "e5m2-results"
    run = _e5m2_results() if narrow else recipe
    fast = _fp8_linear_run("cpu", "auto", run)
    assert len(calls) == 3, calls  # forward, dgrad, wgrad
    storage = {torch.float8_e4m3fn, torch.float8_e5m2}
    assert all(a in storage and b in storage for a, b in calls)
    calls.clear()
    slow = _fp8_linear_run("cpu", "fp32", run)
    assert calls == []  # policy "fp32": FP32 kernels only
    for f, s in zip(fast, slow):
        # FP32 sums in another order, then the same one rounding: within an ulp of the
        # result format (E5M2: 2**-2 relative) where they differ at all
        step = s.abs() * (2.0**-2 if narrow else 2.0**-7) + 2.0**-20
        assert bool(((f - s).abs() <= step).all())
        assert float((f != s).double().mean()) < 0.02


def test_fp8_tensor_core_path_declines_what_it_cannot_serve(capabilities,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """None (the caller's FP32 or BF16 kernel) without FP8 tensor cores (every CPU, by
    the real probe), under policy "fp32", for dimensions not multiples of 16, for two
    E5M2 operands and for block formats."""
    state = EngineState(mixprec.get_recipe("fp8-hybrid"), None)
    x, w = torch.randn(32, 64), torch.randn(48, 64)
    e4m3 = quantize_operand(x, E4M3_POW2, state, "x")
    weight = quantize_operand(w, Operand("e4m3", scaling=TensorScaling("current")), state, "w")
    assert not kernels.fp8_tensor_cores("cpu")
    assert kernels.scaled_mm(e4m3, weight, AUTO, transpose_right=True) is None
    monkeypatch.setattr(kernels, "_capabilities", {})
    monkeypatch.setattr(kernels, "_probe_fp8_tensor_cores", lambda device: True)
    assert kernels.scaled_mm(e4m3, weight, AUTO, transpose_right=True) is not None
    assert kernels.scaled_mm(e4m3, weight, FP32, transpose_right=True) is None
    odd = quantize_operand(torch.randn(32, 60), E4M3_POW2, state, "odd")
    assert kernels.scaled_mm(odd, quantize_operand(torch.randn(48, 60), E4M3_POW2, state, "w2"), AUTO,
                             transpose_right=True) is None
    e5m2 = Operand("e5m2", scaling=TensorScaling("current"))
    assert kernels.scaled_mm(quantize_operand(x, e5m2, state, "a"), quantize_operand(w, e5m2, state, "b"), AUTO,
                             transpose_right=True) is None
    block = quantize_operand(x, Operand("mxfp8_e4m3"), state, "blocks")
    assert kernels.scaled_mm(block, weight, AUTO, transpose_right=True) is None


@pytest.mark.cuda
def test_fp8_tensor_core_path_on_cuda_matches_fp32_kernels() -> None:
    """Untested path: torch._scaled_mm on FP8 tensor cores (compute capability 8.9+).
    Runs only with such a CUDA device, which CI lacks; skipped on older GPUs."""
    if not kernels.fp8_tensor_cores("cuda"):
        pytest.skip("this GPU has no FP8 tensor cores (compute capability < 8.9)")
    fast, slow = _fp8_linear_run("cuda", "auto"), _fp8_linear_run("cuda", "fp32")
    for f, s in zip(fast, slow):
        assert bool(((f - s).abs() <= s.abs() * 2.0**-7 + 2.0**-20).all())


# ---- the FP16 kernel ("fp16") -----------------------------------------------------------------


@pytest.fixture
def fp16_capabilities(monkeypatch: pytest.MonkeyPatch):
    """A fresh capability cache with native FP16 as the test sets it (BF16: as probed)."""
    monkeypatch.setattr(kernels, "_capabilities", {})

    def set_probe(native: bool) -> None:
        monkeypatch.setattr(kernels, "_probe_native_fp16", lambda device_type: native and device_type == "cpu")

    return set_probe


def test_fp16_path_only_for_fp16_values_rounded_to_fp16_without_bias(fp16_capabilities) -> None:
    fp16_capabilities(True)
    assert choose((FP16, FP16), FP16, AUTO, "cpu") == "fp16"
    assert choose((FP16, Operand("e4m3")), FP16, AUTO, "cpu") == "fp16"  # FP8 values are FP16 values
    assert choose((FP16, FP16), FP16, AUTO, "cpu", bias=True) == "fp32"  # the kernel adds it after rounding
    assert choose((FP16, FP16), Operand("fp16", "stochastic"), AUTO, "cpu") == "fp32"
    assert choose((FP16, FP16), Operand(), AUTO, "cpu") == "fp32"
    assert choose((FP16, Operand("e5m2", scaling=TensorScaling("current"))), FP16, AUTO, "cpu") == "fp32"
    assert choose((FP16, FP16), FP16, AUTO, "cuda") == "fp32"
    assert choose((FP16, FP16), FP16, FP32, "cpu") == "fp32"
    fp16_capabilities(False)
    kernels._capabilities.clear()
    assert choose((FP16, FP16), FP16, AUTO, "cpu") == "fp32"
    assert choose((FP16, FP16), FP16, FORCED, "cpu") == "fp16"


@pytest.mark.parametrize(("operand", "exact"), [
    (FP16, True), (Operand("e4m3"), True), (E5M2, True), (Operand("e5m2", "stochastic"), True),
    (BF16, False), (Operand(), False), (Operand("e4m3", scaling=TensorScaling("delayed")), False),
    (Operand("mxfp8_e4m3"), False), (Operand("e6m9"), False),
])
def test_fp16_exact_by_format_and_scaling(operand: Operand, exact: bool) -> None:
    assert fp16_exact(operand) is exact


def test_the_fp16_probe_answers_and_checks_fp32_accumulation() -> None:
    native = kernels._probe_native_fp16("cpu")
    assert isinstance(native, bool) and kernels._probe_native_fp16("cuda") is False
    if native:
        # what the probe rests on: FP16 sums would give 1, FP32 sums 3
        left = torch.full((1, 4097), 2.0**-11, dtype=torch.float16)
        left[0, 0] = 1
        assert float(torch.matmul(left, torch.ones(4097, 1, dtype=torch.float16))) == 3.0


def test_fp16_path_matches_fp32_path_on_gemms_without_bias() -> None:
    x = torch.randn(64, 96) * 2
    results = run_both(lambda: nn.Linear(96, 48, bias=False), [x], "fp16")
    (y32, g32, log32), (y16, g16, log16) = results["fp32"], results["bf16"]
    assert log32.dtypes == {torch.float32} and log16.dtypes == {torch.float16} and log16.count >= 3
    torch.manual_seed(0)
    weight = nn.Linear(96, 48, bias=False).weight.detach()
    bound = magnitude_bound(x, weight)
    for fast, slow, limit in [(y16, y32, bound), *[(f, s, s.abs().max() * 2.0**-12 * torch.ones_like(s))
                                                    for f, s in zip(g16, g32)]]:
        assert torch.equal(fast.half().float(), fast)  # on the FP16 grid
        fast, slow = fast.double(), slow.double()
        step = slow.abs() * 2.0**-10 + 2.0**-24
        assert bool(((fast - slow).abs() <= step + limit.double()).all())
        assert float((fast != slow).double().mean()) < 0.01


def test_fp16_path_runs_attention_on_fp16_kernels() -> None:
    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(x, x * 0.5, x, is_causal=True)

    x = torch.randn(2, 4, 16, 8)
    results = run_both(Net, [x], "fp16")
    (y32, g32, log32), (y16, g16, log16) = results["fp32"], results["bf16"]
    assert log16.calls == {("bmm", torch.float16)}
    for fast, slow in zip([y16, *g16], [y32, *g32]):
        assert float((fast - slow).abs().max()) <= float(slow.abs().max()) * 2.0**-8
        assert float((fast != slow).double().mean()) < 0.05


# ---- the FP32 sum on BF16 products ("bf16-fp32") ----------------------------------------------


def test_bf16_products_mode_is_scoped_and_restored() -> None:
    flags = torch.backends.mkldnn.matmul
    before = flags.fp32_precision
    with kernels.bf16_products():
        assert flags.fp32_precision == "bf16"
    assert flags.fp32_precision == before
    with pytest.raises(RuntimeError, match="inside"):
        with kernels.bf16_products():
            raise RuntimeError("inside")
    assert flags.fp32_precision == before


@pytest.mark.parametrize(("shape_a", "shape_b"), [((64, 96), (96, 48)), ((3, 32, 40), (40, 24)),
                                                  ((2, 3, 16, 24), (2, 3, 24, 8))])
def test_bf16_fp32_path_gives_the_fp32_sum_of_bf16_values(shape_a, shape_b) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    # E5M2 values: BF16 values, their products exact in FP32
    a = (torch.randn(shape_a) * 4).to(torch.float8_e5m2).float()
    b = torch.randn(shape_b).to(torch.float8_e5m2).float()
    exact = torch.matmul(a.double(), b.double())
    y = kernels.matmul(a, b, "bf16-fp32", FORCED)
    assert y.dtype == torch.float32 and y.shape == exact.shape
    # FP32 accumulation: within the FP32 summation bound of the exact sum, not BF16's
    bound = 2 * shape_a[-1] * 2.0**-24 * torch.matmul(a.abs().double(), b.abs().double())
    assert bool(((y.double() - exact).abs() <= bound).all())
    off_bf16 = (y.double() - y.bfloat16().double()).abs()
    assert bool((off_bf16 > 0).any())  # results carry more than BF16's 8 bits


def test_auto_keeps_small_gemms_on_the_plain_fp32_kernel() -> None:
    a, b = torch.ones(8, 16), torch.ones(16, 8)
    log = GemmLog()
    with log:
        kernels.matmul(a, b, "bf16-fp32", AUTO)
    assert log.paths == {"fp32"}
    log = GemmLog()
    with log:
        kernels.matmul(torch.ones(128, 128), torch.ones(128, 128), "bf16-fp32", AUTO)
        kernels.matmul(a, b, "bf16-fp32", FORCED)
    assert log.paths == {"bf16-fp32"}


@pytest.mark.parametrize("build", ["linear", "attention"])
def test_fp8_recipe_runs_every_gemm_on_bf16_products_and_matches_fp32_kernels(build: str) -> None:
    torch.manual_seed(0)
    if build == "linear":
        inputs = [torch.randn(64, 96) * 2]
        module = lambda: nn.Linear(96, 48)  # noqa: E731
    else:
        inputs = [torch.randn(2, 16, 32)]
        module = lambda: nn.MultiheadAttention(32, 4, batch_first=True)  # noqa: E731

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if build == "linear":
                return self.inner(x)
            return self.inner(x, x, x, need_weights=False, is_causal=True,
                              attn_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]))[0]

    results = run_both(Wrapped, inputs, "fp8")
    (y32, g32, log32), (y16, g16, log16) = results["fp32"], results["bf16"]
    assert log32.paths == {"fp32"} and log16.paths == {"bf16-fp32"}
    assert log16.count == log32.count >= 3
    for fast, slow in zip([y16, *g16], [y32, *g32]):
        # E5M2 results (stochastic in backward, same random bits): equal but where the
        # FP32 sums' order moved one across a rounding boundary
        assert torch.equal(fast.to(torch.float8_e5m2).float(), fast)  # on the E5M2 grid
        assert float((fast != slow).double().mean()) < 0.05
