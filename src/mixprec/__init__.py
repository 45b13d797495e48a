"""mixprec: train PyTorch models in reduced precision (FP16, BF16, FP8) with FP32's
accuracy, emulating each format bit for bit where the hardware lacks it.

``prepare(model, optimizer, recipe)`` converts a model and wraps its optimizer for one
of the papers' recipes. The numeric core is importable from here too: formats (:mod:`mixprec.core.formats`), rounding
onto a format's grid (:func:`quantize`; block-scaled MX, NVFP4 and FP8-block formats
too, :class:`BlockFormat`, :mod:`mixprec.core.formats.blocks`), per-tensor scales (:func:`scale_from_amax`),
and packing into real low-precision storage (:func:`to_storage`, :func:`from_storage`).
"""

from mixprec.core import formats
from mixprec.convert import ConversionSummary, convert
from mixprec.core.formats import BlockFormat, FloatFormat
from mixprec.core.formats import blocks
from mixprec.core import block_quantize
from mixprec.core.block_quantize import quantize_blocks
from mixprec.core.hadamard import hadamard_transform, inverse_hadamard_transform
from mixprec.core.kernels import kernel_backend
from mixprec.optim import MixedPrecisionOptimizer
from mixprec.core.quantize import Rounding, quantize, scale_from_amax, tensor_scale
from mixprec.recipe import RECIPES, Recipe, TensorFormat, TensorScaling, get_recipe
from mixprec.scaling import DynamicScaling, StaticScaling
from mixprec.core.storage import from_storage, storage_dtype, to_storage
from mixprec.training import prepare
from mixprec import stats

__version__ = "0.1.0"

__all__ = [
    "RECIPES",
    "ConversionSummary",
    "DynamicScaling",
    "FloatFormat",
    "BlockFormat",
    "blocks",
    "quantize_blocks",
    "hadamard_transform",
    "inverse_hadamard_transform",
    "MixedPrecisionOptimizer",
    "Recipe",
    "StaticScaling",
    "TensorFormat",
    "TensorScaling",
    "convert",
    "get_recipe",
    "prepare",
    "Rounding",
    "formats",
    "stats",
    "from_storage",
    "kernel_backend",
    "quantize",
    "scale_from_amax",
    "storage_dtype",
    "tensor_scale",
    "to_storage",
    "__version__",
]
