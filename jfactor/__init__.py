"""jfactor: fold linear convolution stacks exactly, and factorize large kernels into small ones.

Importing jfactor switches on ``jax_enable_x64``: exactness is certified in float64.
jfactor keeps the dtype you give it, so float32 weights and inputs stay float32.
"""

import jax

jax.config.update("jax_enable_x64", True)

from jfactor import batch  # noqa: E402
from jfactor.batch import BatchFolded, fold_batch, stack_batch  # noqa: E402
from jfactor.errors import ConfigError, FoldError, JFactorError, StackError  # noqa: E402
from jfactor.fold import Canonical, Certificate, Folded, fold, fold_conv  # noqa: E402
from jfactor.layers import (  # noqa: E402
    AvgPool,
    BatchNorm,
    Branches,
    Conv,
    Identity,
    Layer,
    Residual,
    Subsample,
    SumPool,
)
from jfactor.stack import Stack, apply  # noqa: E402

__version__ = "0.1.0"


_LAZY = {
    "from_nnx": "jfactor.interop.nnx", "to_nnx": "jfactor.interop.nnx",
    "FactorizedConv": "jfactor.interop.factorized_conv",
    "from_keras": "jfactor.interop.keras3", "to_keras": "jfactor.interop.keras3",
    "from_onnx": "jfactor.interop.onnx", "to_onnx": "jfactor.interop.onnx",
    "load_any": "jfactor.interop.seed_notation", "parse_keras": "jfactor.interop.seed_notation",
    "parse_keras_blocks": "jfactor.interop.seed_notation",
}


def __getattr__(name):
    """The interop names load their framework (flax, keras, onnx) or, for the seed's Keras notation,
    the config schema (pydantic) only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jfactor' has no attribute {name!r}")


__all__ = [
    "AvgPool", "BatchFolded", "BatchNorm", "Branches", "Canonical", "Certificate", "ConfigError", "Conv",
    "FactorizedConv", "FoldError", "Folded", "Identity", "JFactorError", "Layer", "Residual", "Stack",
    "StackError", "Subsample", "SumPool", "apply", "batch", "fold", "fold_batch", "fold_conv", "from_keras",
    "from_nnx", "from_onnx", "load_any", "parse_keras", "parse_keras_blocks", "stack_batch", "to_keras", "to_nnx",
    "to_onnx",
]
