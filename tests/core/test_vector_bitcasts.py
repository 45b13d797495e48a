"""mixprec.core.vector_bitcasts: inductor's C++ kernels cast 32-bit vectors' bits in
registers inside the scope, with eager torch's results, and are left as torch made
them outside it."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from mixprec.core import vector_bitcasts as vb

pytestmark = pytest.mark.skipif(not vb.available(), reason="this torch's inductor lacks the C++ vector overrides")


def _bit_kernel(x: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int32)
    halved = (bits & 0x7FFFFFFF) >> 1
    return (halved | (bits & -(2**31))).view(torch.float32) * 3.0


def _random_bits(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    words = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=generator).to(torch.int32)
    return words.view(torch.float32)  # every pattern: NaNs, Infs, subnormals included


def _compiled_code(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    torch._dynamo.reset()
    compiled = torch.compile(_bit_kernel, dynamic=True, options={"fx_graph_cache": False})
    out, code = run_and_get_code(compiled, x)
    return out, "\n".join(code)


def test_in_scope_bit_casts_are_vector_casts_with_eager_results() -> None:
    x = _random_bits(4099)  # a tail after the vector loop too
    with vb.vector_bitcasts():
        got, code = _compiled_code(x)
    assert "at::vec::cast<int32_t>" in code and "at::vec::cast<float>" in code
    # every halved pattern is finite, so the products compare bit for bit
    assert torch.equal(got.view(torch.int32), _bit_kernel(x).view(torch.int32))


def test_out_of_scope_kernels_and_cache_key_are_torchs_own() -> None:
    from torch._inductor.codegen import cpp

    before = cpp.CppVecOverrides.to_dtype_bitcast
    tag = torch.compiler.config.cache_key_tag
    with vb.vector_bitcasts():
        assert cpp.CppVecOverrides.to_dtype_bitcast is not before
        assert torch.compiler.config.cache_key_tag != tag
        with vb.vector_bitcasts():  # nested: still active, then still active after
            pass
        assert cpp.CppVecOverrides.to_dtype_bitcast is not before
    assert cpp.CppVecOverrides.to_dtype_bitcast is before
    assert torch.compiler.config.cache_key_tag == tag
    _, code = _compiled_code(_random_bits(64))
    assert "at::vec::cast<int32_t>" not in code
