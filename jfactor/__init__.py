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
from jfactor.keras import load_any, parse_keras, parse_keras_blocks  # noqa: E402
from jfactor.stack import Stack, apply  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    """``from_nnx``, ``to_nnx`` and ``FactorizedConv`` load flax only when first used."""
    if name in ("from_nnx", "to_nnx"):
        from jfactor import nnx

        return getattr(nnx, name)
    if name == "FactorizedConv":
        from jfactor.factorized_conv import FactorizedConv

        return FactorizedConv
    raise AttributeError(f"module 'jfactor' has no attribute {name!r}")


__all__ = [
    "AvgPool", "BatchFolded", "BatchNorm", "Branches", "Canonical", "Certificate", "ConfigError", "Conv",
    "FactorizedConv", "FoldError", "Folded", "Identity", "JFactorError", "Layer", "Residual", "Stack",
    "StackError", "Subsample", "SumPool", "apply", "batch", "fold", "fold_batch", "fold_conv", "from_nnx", "load_any",
    "parse_keras", "parse_keras_blocks", "stack_batch", "to_nnx",
]
