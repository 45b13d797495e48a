"""mixprec.core.kernels: the eager and compiled paths agree bit for bit, the backend switch
is scoped, and a broken compiler falls back to eager with a warning."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec.core import kernels
from mixprec.core.kernels import current_backend, kernel_backend
from tests.reference import assert_same


def adversarial(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31 - 1, (count,), dtype=torch.int32, generator=generator)
    return bits.view(torch.float32)


@pytest.mark.parametrize("name", ["bf16", "fp16", "e5m2", "e4m3", "e3m2", "e8m0"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scale", [None, 0.375])
def test_compiled_equals_eager(name, rounding, scale):
    x = adversarial(1 << 16)
    results = {}
    for backend in ("eager", "compiled"):
        with kernel_backend(backend):
            generator = torch.Generator().manual_seed(2)
            out = torch.empty_like(x)
            allocated = mixprec.quantize(x, name, rounding, scale=scale, generator=generator)
            generator = torch.Generator().manual_seed(2)
            mixprec.quantize(x, name, rounding, scale=scale, generator=generator, out=out)
            assert_same(out, allocated, x, f"{backend}: out= vs allocating")
            results[backend] = allocated
    assert_same(results["compiled"], results["eager"], x, f"{name} {rounding} compiled vs eager")


def test_backend_switch_is_scoped_and_validated():
    before = current_backend()
    with kernel_backend("eager"):
        assert current_backend() == "eager"
        with kernel_backend("compiled"):
            assert current_backend() == "compiled"
        assert current_backend() == "eager"
    assert current_backend() == before
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with kernel_backend("fast"):  # type: ignore[arg-type]
            pass


def test_auto_uses_eager_for_small_tensors(no_native, monkeypatch):
    calls = []
    original = kernels._compiled_entry

    def recording(name, fn):
        calls.append(name)
        return original(name, fn)

    monkeypatch.setattr(kernels, "_compiled_entry", recording)
    with kernel_backend("auto"):
        mixprec.quantize(torch.randn(kernels.COMPILE_MIN_NUMEL - 1), "fp16")
        assert calls == []
        mixprec.quantize(torch.randn(kernels.COMPILE_MIN_NUMEL), "fp16")
    assert len(calls) == 1


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(no_native, monkeypatch):
    def broken(name, fn):
        def fail(*args):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(kernels, "_compiled_entry", broken)
    monkeypatch.setattr(kernels, "_compile_broken", [])
    x = adversarial(kernels.COMPILE_MIN_NUMEL)
    with kernel_backend("auto"):
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            y = mixprec.quantize(x, "fp16")
    assert_same(y, x.half().float(), x, "fallback result")
    with kernel_backend("compiled"):
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            mixprec.quantize(x, "fp16")


def test_quantize_inside_a_users_torch_compile():
    def step(x):
        return mixprec.quantize(x * 2, "e5m2") + 1

    compiled = torch.compile(step, fullgraph=False)
    x = adversarial(4096).nan_to_num(0.0, 0.0, 0.0).clamp(-1e4, 1e4)
    assert_same(compiled(x), step(x), x, "inside torch.compile")


def test_auto_retries_compiling_a_few_times_before_staying_eager(no_native, monkeypatch):
    attempts = []

    def broken(name, fn):
        def fail(*args):
            attempts.append(name)
            raise RuntimeError("flaky compiler")

        return fail

    monkeypatch.setattr(kernels, "_compiled_entry", broken)
    monkeypatch.setattr(kernels, "_compile_broken", [])
    x = adversarial(kernels.COMPILE_MIN_NUMEL)
    with kernel_backend("auto"), pytest.warns(RuntimeWarning):
        for _ in range(6):
            assert_same(mixprec.quantize(x, "e5m2"), x.to(torch.float8_e5m2).float(), x, "eager fallback")
    assert len(attempts) == kernels._MAX_COMPILE_FAILURES


def test_small_kernels_run_on_one_thread_under_passive_openmp(no_native, monkeypatch):
    """Below the threshold a compiled kernel runs with one thread (no sleeping OpenMP
    thread to wake), gives the same bits as with all threads, and the thread count is
    restored after it, also when the kernel raises."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs at least two torch threads")
    threads = torch.get_num_threads()
    original = kernels._compiled_entry
    seen = []

    def recording(name, fn):
        compiled = original(name, fn)

        def call(*args):
            seen.append(torch.get_num_threads())
            return compiled(*args)

        return call

    monkeypatch.setattr(kernels, "_compiled_entry", recording)
    x = adversarial(1 << 12)
    with kernel_backend("compiled"):
        monkeypatch.setattr(kernels, "_serial_below", lambda: 0)
        parallel = mixprec.quantize(x, "e5m2", "stochastic", random_key=torch.tensor([3, 4], dtype=torch.int32))
        monkeypatch.setattr(kernels, "_serial_below", lambda: 1 << 13)
        serial = mixprec.quantize(x, "e5m2", "stochastic", random_key=torch.tensor([3, 4], dtype=torch.int32))
        large = mixprec.quantize(adversarial(1 << 14), "e5m2")
    assert seen == [threads, 1, threads]
    assert torch.equal(serial.view(torch.int32), parallel.view(torch.int32))
    assert_same(large, adversarial(1 << 14).to(torch.float8_e5m2).float(), adversarial(1 << 14), "large")
    assert torch.get_num_threads() == threads

    def broken(name, fn):
        def fail(*args):
            raise RuntimeError("kernel failed")

        return fail

    monkeypatch.setattr(kernels, "_compiled_entry", broken)
    with kernel_backend("compiled"), pytest.raises(RuntimeError, match="kernel failed"):
        mixprec.quantize(x, "e5m2")
    assert torch.get_num_threads() == threads


def test_one_thread_only_under_the_passive_wait_policy(no_native, monkeypatch):
    kernels._serial_below.cache_clear()
    try:
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
        assert kernels._serial_below() == kernels.SERIAL_BELOW_PASSIVE
        kernels._serial_below.cache_clear()
        monkeypatch.setenv("OMP_WAIT_POLICY", "active")
        assert kernels._serial_below() == 0
    finally:
        kernels._serial_below.cache_clear()


def test_small_gemm_loops_run_on_one_thread_under_the_passive_policy(monkeypatch):
    """A recurrence's loop of small GEMMs takes one thread under a passive OpenMP and
    torch's count otherwise, or for GEMMs past the bound; torch_threads restores the
    count it changed, also when the block raises."""
    threads = torch.get_num_threads()
    kernels._serial_below.cache_clear()
    try:
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        assert kernels.serial_gemm_threads(32 * 256 * 1024) == 1
        assert kernels.serial_gemm_threads(kernels.SERIAL_GEMM_BELOW_PASSIVE) == threads
        kernels._serial_below.cache_clear()
        monkeypatch.delenv("OMP_WAIT_POLICY")
        assert kernels.serial_gemm_threads(32 * 256 * 1024) == threads
    finally:
        kernels._serial_below.cache_clear()
    with pytest.raises(RuntimeError, match="inside"):
        with kernels.torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == threads


_FLOAT_NEAREST = ["fp16", "e5m2", "e4m3", "e2m1fn", "e2m3fn", "e3m2fn", "e3m4", "e6m9", "e2m1", "e5m10"]


@pytest.mark.parametrize("name", _FLOAT_NEAREST)
@pytest.mark.parametrize("overflow", ["inf", "saturate", "nan"])
def test_float_nearest_path_equals_the_integer_kernel(name, overflow):
    """Rounding to nearest in exact float arithmetic gives the integer kernel's bits, on
    random bit patterns (NaN payloads, Inf, float32 subnormals, overflow) and on every
    value near each of the format's grid points and midpoints, eager and compiled."""
    fmt = mixprec.formats.get(name)
    values = kernels.param_values(fmt, overflow)
    assert kernels.float_nearest_ok(values)
    p = torch.tensor(values, dtype=torch.int32)
    x = adversarial(1 << 16)
    # grid points and midpoints of the format, a few ulps either side, both signs
    grid = mixprec.quantize(torch.logspace(-30, 20, 4096, base=2.0), fmt, saturate=True).unique()
    mids = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, grid * 1.75])
    near = (mids.view(torch.int32)[:, None] + torch.arange(-2, 3, dtype=torch.int32)).flatten().view(torch.float32)
    x = torch.cat([x, near, -near])
    expected = kernels._round_bits(x, p, None)
    eager = kernels._round_nearest_float(x, p)
    assert torch.equal(eager.view(torch.int32), expected.view(torch.int32))
    compiled = torch.compile(kernels._round_nearest_float, dynamic=True)(x, p)
    assert torch.equal(compiled.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("name", ["bf16", "e8m0fnu", "e8m0", "fp32", "e8m7", "e2m0", "e4m0"])
def test_float_nearest_path_refuses_grids_it_cannot_hold(name):
    """BF16's and E8M0's smallest values are float32 subnormals (or there is no zero,
    or nothing to round): they keep the integer kernel."""
    fmt = mixprec.formats.get(name)
    assert not kernels.float_nearest(fmt, fmt.overflow)


def test_quantize_takes_the_float_path_to_nearest_only(monkeypatch):
    names = []
    original = kernels._compiled_entry
    monkeypatch.setattr(kernels, "_compiled_entry", lambda name, fn: names.append(name) or original(name, fn))
    x = adversarial(4096)
    with kernel_backend("compiled"):
        mixprec.quantize(x, "e5m2")
        mixprec.quantize(x, "bf16", saturate=True)
        mixprec.quantize(x, "e5m2", "stochastic")
    assert names == ["nearest_float", "nearest", "stochastic"]
