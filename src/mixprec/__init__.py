"""mixprec: train any PyTorch model in reduced precision (FP16, BF16, FP8) with FP32's
accuracy, every matrix product emulated bit for bit where the hardware lacks the format.

The loop is torch.amp's: ``mixprec.convert(model, recipe)``, the user's own optimizer,
and ``mixprec.GradScaler(recipe)``; ``mixprec.prepare(model, optimizer, recipe)`` is the
one-call shortcut. ``mixprec.coverage`` says which call ran in which format. The
numeric core is importable from here too: formats (:mod:`mixprec.core.formats`),
rounding onto a format's grid (:func:`quantize`), per-tensor scales
(:func:`scale_from_amax`) and packing into real storage (:func:`to_storage`); block-scaled
MX, NVFP4 and FP8-block formats too (:class:`BlockFormat`, :mod:`mixprec.core.formats.blocks`).
"""

from mixprec.core import formats
from mixprec.core.formats import BlockFormat, FloatFormat, blocks
from mixprec.core.block_quantize import quantize_blocks
from mixprec.core.hadamard import hadamard_transform, inverse_hadamard_transform
from mixprec.core.kernels import kernel_backend
from mixprec.core.quantize import Rounding, quantize, scale_from_amax, tensor_scale
from mixprec.core.storage import from_storage, storage_dtype, to_storage
from mixprec.recipe import (
    ABLATIONS,
    RECIPES,
    Gemm,
    KeepHighPrecision,
    Operand,
    Recipe,
    TensorScaling,
    get_recipe,
)
from mixprec.scaling import DynamicScaling, StaticScaling
from mixprec.nn import UnsupportedOpError, convert
from mixprec.nn.kernels import gemm_kernels
from mixprec.nn.coverage import Coverage, coverage
from mixprec.amp import GradScaler, MixedPrecisionOptimizer, prepare
from mixprec import stats

__version__ = "0.2.0"

__all__ = [
    "ABLATIONS",
    "RECIPES",
    "Coverage",
    "DynamicScaling",
    "FloatFormat",
    "Gemm",
    "GradScaler",
    "KeepHighPrecision",
    "BlockFormat",
    "blocks",
    "quantize_blocks",
    "hadamard_transform",
    "inverse_hadamard_transform",
    "MixedPrecisionOptimizer",
    "Operand",
    "Recipe",
    "Rounding",
    "StaticScaling",
    "TensorScaling",
    "UnsupportedOpError",
    "convert",
    "coverage",
    "formats",
    "from_storage",
    "gemm_kernels",
    "get_recipe",
    "kernel_backend",
    "prepare",
    "quantize",
    "scale_from_amax",
    "stats",
    "storage_dtype",
    "tensor_scale",
    "to_storage",
    "__version__",
]
