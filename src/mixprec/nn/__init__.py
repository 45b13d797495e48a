"""The training engine: emulated GEMM-family ops (:mod:`.ops`), the scoped function
mode that routes a model's calls to them (:mod:`.intercept`), ``convert`` and the
coverage report."""

from mixprec.nn.convert import convert, engine_state, is_converted
from mixprec.nn.intercept import UnsupportedOpError

__all__ = ["convert", "engine_state", "is_converted", "UnsupportedOpError"]
