"""mixprec.nn.state: the stochastic-rounding keys mixed on the host equal the int32
tensor arithmetic they replace on CPU (which devices and compiled graphs still run); FP8
operands' values written by their rounding pass equal their decoded bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec.nn.state import EngineState, _mix_key, _mix_tensor, _site_hash, quantize_operand
from mixprec.recipe import Operand, TensorScaling

int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(int32, min_size=2, max_size=2), st.integers(min_value=0, max_value=2**31 - 1))
def test_host_mixed_key_equals_the_tensor_arithmetic(words, salt):
    base = torch.tensor(words, dtype=torch.int32)
    salts = torch.tensor([salt, (salt * 31 + 17) & 0x7FFFFFFF], dtype=torch.int32)
    host = _mix_key(base, salt)
    assert host.dtype == torch.int32 and host.shape == (2,)
    assert host.tolist() == _mix_tensor(base, salts).tolist()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_site_hash_is_31_bits_of_fnv1a_remembered_or_not(name):
    """The remembered hash of a call site's name (eager mode) is FNV-1a's over its code
    points, on the first call and the second."""
    h = 0x811C9DC5
    for char in name:
        h = ((h ^ ord(char)) * 0x01000193) % 2**32
    assert _site_hash(name) == h & 0x7FFFFFFF
    assert _site_hash(name) == h & 0x7FFFFFFF


def test_site_hash_of_known_names():
    """FNV-1a's published 32-bit hashes ("a": 0xE40C292C, "foobar": 0xBF9CF968), top bit cleared."""
    assert _site_hash("a") == 0xE40C292C & 0x7FFFFFFF
    assert _site_hash("foobar") == 0xBF9CF968 & 0x7FFFFFFF


def test_distinct_salts_give_unrelated_keys():
    base = torch.tensor([12345, -678], dtype=torch.int32)
    keys = {tuple(_mix_key(base, salt).tolist()) for salt in range(1000)}
    assert len(keys) == 1000


@pytest.mark.parametrize(("name", "scaling", "wanted", "held"), [
    ("e4m3", TensorScaling("current"), torch.bfloat16, torch.bfloat16),  # power-of-two scale: exact in BF16
    ("e4m3", TensorScaling("current", power_of_two=False), torch.bfloat16, torch.float32),  # not exact: float32
    ("e5m2", None, torch.float16, torch.float16),  # E5M2 is a subset of FP16
    ("e4m3", TensorScaling("current"), torch.float16, torch.float32),  # a scale may leave FP16's range
    ("e5m2", None, torch.float32, torch.float32),
])
def test_values_from_the_rounding_pass_equal_the_decoded_storage(name, scaling, wanted, held):
    # the values quantize_operand writes beside the FP8 bytes, in the kernel's dtype,
    # are exactly what decoding the bytes gives, and a dtype that cannot hold them
    # falls back to float32
    operand = Operand(name, scaling=scaling)
    state = EngineState(mixprec.get_recipe("fp8-hybrid"), None)
    x = torch.randn(64, 96) * torch.exp2(torch.randint(-12, 12, (64, 1)).float())
    q = quantize_operand(x, operand, state, "site", values_dtype=wanted)
    assert q.cached_values is not None and q.cached_values.dtype == held
    decoded = q.drop_values()
    assert torch.equal(q.values(), decoded.values())
    assert torch.equal(q.values_as(torch.bfloat16 if held != torch.float16 else held),
                       decoded.values_as(torch.bfloat16 if held != torch.float16 else held))
    assert quantize_operand(x, operand, state, "site").cached_values is None  # by default only the bytes
    # a result used at once: its values alone, the same ones, with no bytes written
    alone = quantize_operand(x, operand, state, "site", values_dtype=wanted, keep_storage=False)
    assert alone.storage is alone.cached_values and alone.storage.dtype == held
    assert torch.equal(alone.values(), q.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_weights_rounding_pass_gives_the_forward_its_values_and_caches_the_bytes(dtype):
    """The forward's weight comes with its values from the rounding pass (no decoding
    pass); the per-step cache keeps only the FP8 bytes, which later uses decode."""
    operand = Operand("e4m3", scaling=TensorScaling("current"))
    state = EngineState(mixprec.get_recipe("fp8-hybrid"), None)
    weight = torch.nn.Parameter(torch.randn(32, 48))
    first = state.weight(weight, operand, "w", values_dtype=dtype)
    assert first.cached_values is not None and first.cached_values.dtype == dtype
    again = state.weight(weight, operand, "w", values_dtype=dtype)
    assert again.cached_values is None and again.storage is first.storage
    assert torch.equal(again.values_as(dtype), first.values_as(dtype))
    for name in ("mxfp8_e4m3", "mxfp4_e2m1", "fp8_block128x128:rceil", "nvfp4_16x16"):
        # block weights: codes, and (no tensor scale) the values from the same pass
        block = state.weight(weight, Operand(name), "w", values_dtype=dtype)
        assert block.layout is not None
        decoded = block.drop_values()
        if name == "nvfp4_16x16":
            assert block.cached_values is None
            continue
        assert block.cached_values is not None and block.cached_values.dtype == dtype
        assert torch.equal(block.values(), decoded.values())
        assert torch.equal(block.values_as(dtype), decoded.values_as(dtype))


@pytest.mark.parametrize("name", ["mxfp8_e4m3:rceil", "mxfp4_e2m1", "nvfp4", "fp8_block128", "nvfp4_16x16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("axis", [-1, -2])
def test_block_values_from_the_rounding_pass_equal_the_unpacked_codes(name: str, rounding: str, axis: int) -> None:
    """An operand used at once gets its values straight from the rounding pass (no codes);
    they are the values its packed codes decode to, bit for bit, stochastic bits
    included, in BF16 only where the format's values all are BF16 values. NVFP4's come
    without the tensor scale (the GEMM applies it to its sum): element times block
    scale, as the codes decode without it, and the same tensor scale."""
    state = EngineState(mixprec.get_recipe("mxfp8"), None)
    torch.manual_seed(0)
    x = torch.randn(48, 64) * torch.logspace(-3, 3, 64)  # blocks of very different scales
    x[3, :16] = 0.0  # an all-zero block
    operand = Operand(name, rounding)  # type: ignore[arg-type]
    forward = torch.tensor([11, 12], dtype=torch.int32)  # one forward's key: the same random bits
    packed = quantize_operand(x, operand, state, "site", axis=axis, forward_key=forward)
    assert packed.layout is not None
    for wanted in (torch.bfloat16, torch.float32):
        direct = quantize_operand(x, operand, state, "site", axis=axis, values_dtype=wanted, forward_key=forward)
        assert direct.layout is None
        if operand.fmt.tensor_scale:
            # BF16 where the GEMM takes BF16: element times an E4M3 block scale is a BF16 value
            assert direct.storage.dtype == wanted and direct.tensor_scale is not None
            assert torch.equal(direct.tensor_scale.reshape(()), packed.tensor_scale.reshape(()))
            unscaled = direct.unscaled_as(torch.float32)
            assert torch.equal(unscaled, packed.unscaled_as(torch.float32))
            assert torch.equal(unscaled.bfloat16().float(), unscaled)  # BF16 values without the tensor scale
            # with the tensor scale: within one float32 rounding of the packed values
            assert torch.allclose(direct.values(), packed.values(), rtol=2.0**-23, atol=0.0)
            assert not torch.equal(unscaled, packed.values())  # the tensor scale is not 1 here
            continue
        assert direct.cached_values is not None
        exact_bf16 = wanted == torch.bfloat16 and operand.fmt.bf16_values
        assert direct.storage.dtype == (torch.bfloat16 if exact_bf16 else torch.float32)
        assert torch.equal(direct.values(), packed.values())
        assert torch.equal(direct.drop_values().values(), packed.values())  # as backward would keep it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delayed_scaling_records_the_amax_its_rounding_pass_took(dtype: torch.dtype) -> None:
    """An FP8 operand under delayed scaling is rounded with the history's scale and its
    amax is reduced by that same pass: the history holds abs_max(x) exactly, a non-finite
    amax as 0, and the rounding used the scale from before the record."""
    from mixprec.core.quantize import abs_max

    state = EngineState(mixprec.get_recipe("fp8-hybrid"), None)
    state.recording = True
    operand = Operand("e4m3", scaling=TensorScaling("delayed", history=4))
    x = (torch.randn(64, 48) * 37.0).to(dtype)
    first = quantize_operand(x, operand, state, "site")
    history = state.histories["site"]
    assert float(history.amax[0]) == float(abs_max(x)) and int(history.count) == 1
    assert float(first.scale) == 1.0  # the empty history's scale, taken before the record
    y = x * 3
    y[0, 0] = float("nan")
    second = quantize_operand(y, operand, state, "site")
    assert float(history.amax[1]) == 0.0 and int(history.count) == 2
    # rounded with the scale of the history before this record (x's amax alone); the
    # recorded 0 leaves it unchanged
    assert float(second.scale) == float(history.scale("e4m3")) != 1.0


@pytest.mark.parametrize("values_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_rotations_reuse_one_buffer_without_touching_earlier_results(
        values_dtype: torch.dtype | None, dtype: torch.dtype) -> None:
    """A Hadamard-rotated operand is rotated into the state's buffer for its shape, kept
    from call to call (no fresh pages to fault in each step); an operand quantized from
    it keeps its own memory, so a later rotation into the same buffer leaves it as it
    was; and every result equals the one a fresh state gives, bit for bit."""
    operand = Operand("nvfp4", hadamard=16)
    state = EngineState(mixprec.get_recipe("nvfp4"), None)
    torch.manual_seed(0)
    xs = [(torch.randn(96, 40) * torch.logspace(-2, 2, 40)).to(dtype) for _ in range(3)]
    results, buffers = [], []
    for x in xs:
        q = quantize_operand(x, operand, state, "site", axis=-2, values_dtype=values_dtype)
        results.append([None if t is None else t.clone() for t in (*q.tensors(), q.cached_values)])
        results[-1].append(q)
        buffers.append(state.workspace[(40, 96)].data_ptr())
    assert len(state.workspace) == 1 and len(set(buffers)) == 1  # one buffer, reused
    for x, kept in zip(xs, results):
        q = kept[-1]
        assert all(a is None or torch.equal(a, b) for a, b in zip(kept, (*q.tensors(), q.cached_values)))
        fresh = quantize_operand(x, operand, EngineState(mixprec.get_recipe("nvfp4"), None), "site", axis=-2,
                                 values_dtype=values_dtype)
        assert torch.equal(q.values(), fresh.values())
        assert torch.count_nonzero(q.values()) > 0.9 * x.numel()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_fresh_float32_result_rounds_to_a_16_bit_format_in_place(name: str) -> None:
    """A GEMM's fresh float32 result wanted as float32 values of a BF16/FP16 format (a
    weight's gradient) is rounded in place, in one pass: the same bits as torch's cast
    there and back, on random bit patterns with NaN, Inf, overflow, ties and
    subnormals; anything else still gets the cast."""
    operand = Operand(name)
    dtype = operand.fmt.torch_dtype
    state = EngineState(mixprec.get_recipe("nvfp4"), None)
    generator = torch.Generator().manual_seed(5)
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=generator, dtype=torch.int32)
    x = bits.view(torch.float32).clone()
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38, 65520.0, 1.0 + 2.0**-8])
    x[6:12] = torch.tensor([2.0**-130, -(2.0**-149), 2.0**-25, 0.0, -0.0, 1.0 + 3 * 2.0**-9])
    expected = x.to(dtype).float()
    fresh = x.clone()
    q = quantize_operand(fresh, operand, state, "site", in_place=True, values_dtype=torch.float32,
                         keep_storage=False)
    assert q.storage.data_ptr() == fresh.data_ptr() and q.values_as(torch.float32).data_ptr() == fresh.data_ptr()
    nan = expected.isnan()
    assert torch.equal(fresh.isnan(), nan)
    assert torch.equal(fresh[~nan].view(torch.int32), expected[~nan].view(torch.int32))
    assert not torch.equal(x[~nan], expected[~nan])  # the rounding did something
    kept = quantize_operand(x, operand, state, "site")  # not in place: the cast, x untouched
    assert kept.storage.dtype == dtype and torch.equal(kept.storage.view(torch.int16), x.to(dtype).view(torch.int16))
