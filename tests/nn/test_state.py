"""mixprec.nn.state: the stochastic-rounding keys mixed on the host equal the int32
tensor arithmetic they replace on CPU (which devices and compiled graphs still run)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.nn.state import _mix_key, _mix_tensor

int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(int32, min_size=2, max_size=2), st.integers(min_value=0, max_value=2**31 - 1))
def test_host_mixed_key_equals_the_tensor_arithmetic(words, salt):
    base = torch.tensor(words, dtype=torch.int32)
    salts = torch.tensor([salt, (salt * 31 + 17) & 0x7FFFFFFF], dtype=torch.int32)
    host = _mix_key(base, salt)
    assert host.dtype == torch.int32 and host.shape == (2,)
    assert host.tolist() == _mix_tensor(base, salts).tolist()


def test_distinct_salts_give_unrelated_keys():
    base = torch.tensor([12345, -678], dtype=torch.int32)
    keys = {tuple(_mix_key(base, salt).tolist()) for salt in range(1000)}
    assert len(keys) == 1000
