"""Shared fixtures: a seeded torch RNG for every test, the kernel backends to run the
numerics under, and hypothesis settings that suit a 2-core machine."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from mixprec.core.kernels import kernel_backend

settings.register_profile(
    "mixprec",
    deadline=None,  # the first call of a compiled kernel compiles it
    max_examples=int(os.environ.get("MIXPREC_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("mixprec")


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(1234)


@pytest.fixture(params=["eager", "compiled"])
def backend(request: pytest.FixtureRequest):
    """Run the test under each kernel backend: the two must agree bit for bit."""
    with kernel_backend(request.param):
        yield request.param


@pytest.fixture
def no_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled kernels in charge under ``"auto"``, as on a machine where the native
    library cannot be built (tests of the compiled path's own dispatch)."""
    from mixprec.core import native

    monkeypatch.setattr(native, "available", lambda: False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
