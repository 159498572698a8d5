"""A drop-in flax nnx layer: one large convolution replaced by a chain of small kernels.

``FactorizedConv.from_conv(conv, (3, 5, 9))`` factorizes an ``nnx.Conv``'s kernel
``(*k, C_in, C_out)`` with :func:`jfactor.factorize.factorize` and returns a module with
the conv's input/output shapes: layer i of the chain has kernel ``(*k_i, C_{i-1}, C_i)``,
its own dilation and stride, and valid padding, except the first layer, which takes the
conv's padding plus the zeros that place the conv's kernel in the chain's receptive
field ``E >= k`` as :func:`jfactor.factorize.chain.target_padding` places the target
(centred, the odd one high, the low side a multiple of the stride).  The chain therefore
computes exactly the convolution of the padded input by its folded kernel,
``Factorization.approx``: the only difference from the original conv is the kernel's
approximation error.  The conv's bias is added after the last layer.

Kernels and bias are ``nnx.Param``s (frozen chain layers are :class:`FrozenKernel`), so
``nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)`` fine-tunes the chain in place.
It computes in the promotion of the input's and the weights' dtypes at HIGHEST precision
(jfactor's conv); the replaced conv's compute ``dtype`` and ``precision`` are not carried over.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jfactor import _checks
from jfactor.analysis import program_macs
from jfactor.errors import StackError
from jfactor.factorize.api import factorize
from jfactor.factorize.chain import Chain, FactorizationError, Target, check_chain, target_padding
from jfactor.factorize.solve import Solver
from jfactor.interop.nnx import conv_from_nnx
from jfactor.layers import Conv
from jfactor.ops import conv as _conv
from jfactor.ops import dilate
from jfactor.stack import Stack

Shape = tuple[int, ...]
Pads = tuple[tuple[int, int], ...]


class FrozenKernel(nnx.Variable):
    """The kernel of a frozen chain layer: not an ``nnx.Param``, so ``wrt=nnx.Param`` skips it."""


def _check_factors(factors, chain: Chain) -> tuple[int, int]:
    """``(C_in, C_out)`` of factors ``(*k_i, C_{i-1}, C_i)`` that fit ``chain``; else FactorizationError."""
    if len(factors) != len(chain.layers):
        raise FactorizationError(f"{len(factors)} factors for a chain of {len(chain.layers)} layers")
    c_in, c_out = factors[0].shape[-2], factors[-1].shape[-1]
    expected = chain.factor_shapes(c_in, c_out)
    got = [tuple(f.shape) for f in factors]
    if got != expected:
        raise FactorizationError(
            f"factor shapes {got} do not fit chain {chain.describe()}: expected {expected} "
            f"(C_in {c_in}, C_out {c_out})")
    return c_in, c_out


def _padding(padding, ndim: int):
    """jfactor's normal form of a padding spec for ``ndim`` spatial dims; else StackError."""
    spec = _checks.padding_spec(padding, "FactorizedConv")
    if isinstance(spec, tuple) and len(spec) != ndim:
        raise StackError(f"FactorizedConv: padding {padding!r} has {len(spec)} entries for a {ndim}-D chain")
    return spec


def _check_bias(bias, c_out: int, dtype):
    """``bias`` as a finite ``(C_out,)`` array of ``dtype``; else FactorizationError."""
    bias = jnp.asarray(bias, dtype)
    if bias.shape != (c_out,):
        raise FactorizationError(f"bias has shape {tuple(bias.shape)}; the chain's C_out needs ({c_out},)")
    if _checks.is_concrete(bias) and (bad := _checks.non_finite(bias)):
        raise FactorizationError(f"bias has {bad} non-finite value(s) (NaN or inf)")
    return bias


class FactorizedConv(nnx.Module):
    """A chain of small convolutions standing in for one ``nnx.Conv`` of kernel size ``k``.

    Args:
      factors: the chain's kernels, ``factors[i]`` of shape ``(*k_i, C_{i-1}, C_i)``.
      chain: the :class:`~jfactor.factorize.Chain` (sizes, dilations, strides, frozen
        flags) the factors belong to; its frozen weights are not used (``factors`` are).
      kernel_size: ``(*k,)``, the replaced conv's kernel extent (dilation spelled out);
        the chain's receptive field must cover it.
      padding: the replaced conv's padding: ``'valid'``, ``'same'`` (TF/Keras rule, which
        is flax's), an int, or per-dim ints / ``(low, high)`` pairs; resolved per input
        shape with ``kernel_size`` and the chain's total stride, like the conv did.
      bias: ``(C_out,)`` or None, added after the last layer.
      param_dtype: dtype of the kernels and bias (default: the factors' dtype).
      metrics: the factorization's metrics (``Factorization.metrics``), kept for reporting.

    Calling it maps ``(N, *spatial, C_in)`` to ``(N, *out, C_out)``, ``out`` the conv's
    output size, computing in the promotion of the input's and the weights' dtypes.
    """

    def __init__(self, factors, chain: Chain, *, kernel_size, padding="valid", bias=None,
                 param_dtype=None, metrics: dict | None = None):
        factors = [_checks.as_weight(f, f"factors[{i}]", "FactorizedConv") for i, f in enumerate(factors)]
        dtype = None if param_dtype is None else _checks.floating(param_dtype, "FactorizedConv: param_dtype")
        factors = [f.astype(dtype or f.dtype) for f in factors]
        _, c_out = _check_factors(factors, chain)
        kernel_size = _checks.positive_ints(kernel_size, "kernel_size", "FactorizedConv")
        kernel_size = _checks.expand(kernel_size, chain.ndim, "kernel_size", "FactorizedConv")
        if any(e < k for e, k in zip(chain.extent, kernel_size)):
            raise FactorizationError(
                f"chain {chain.describe()} covers {chain.extent}, less than the kernel size {kernel_size}")
        self.chain = Chain(chain.layers, chain.widths)  # static: the frozen weights live in ``kernels``
        self.kernel_size = kernel_size
        self.padding = _padding(padding, chain.ndim)
        self.kernels = nnx.List([
            (FrozenKernel if layer.frozen else nnx.Param)(f) for f, layer in zip(factors, chain.layers)])
        self.bias = None if bias is None else nnx.Param(_check_bias(bias, c_out, dtype or factors[-1].dtype))
        self._metrics = tuple(sorted((metrics or {}).items()))  # hashable, as nnx static data must be

    @classmethod
    def from_conv(cls, conv: nnx.Conv, sizes=(3, 5, 9), *, channels: int | list[int] | None = None,
                  dilations=None, strides=None, restarts: int = 8, solver: Solver | None = None,
                  param_dtype=None, **options) -> FactorizedConv:
        """Factorize ``conv``'s kernel into a chain and return the layer that replaces it.

        Args:
          conv: an ``nnx.Conv`` with ``feature_group_count == 1`` (any dilation, padding,
            mask; ``input_dilation`` 1).
          sizes: the chain's kernel sizes (one entry per layer: an int or one per spatial
            dim), or a :class:`~jfactor.factorize.Chain` (then leave ``channels``,
            ``dilations`` and ``strides`` out).
          channels: widths between layers (an int or one per gap); default
            ``max(C_in, C_out)``.
          dilations, strides: per layer, as in ``Chain.build``; the strides must multiply
            to the conv's.
          restarts, solver: passed to ``factorize`` (default solver: L-BFGS, then
            Levenberg-Marquardt; LM is slow on CPU once C_in * C_out grows, see Solver).
          param_dtype: dtype of the new weights (default: the conv's kernel dtype).
          **options: more ``factorize`` options (``objective``, ``init``, ``seed``,
            ``images``, ``dtype``, ``progress``); baselines are not run.

        The factorization's metrics (``rel_error`` of the kernel, ``output_psnr_db``, ...)
        stay on the module: ``.metrics``, ``.init_error``.  Where the search doubts its best (reached
        by one or two restarts, say), a ``UserWarning`` says so.

        Raises:
          FactorizationError: grouped convs, a conv nnx computes otherwise than one
            convolution, strides the chain does not multiply to, a chain whose receptive
            field is smaller than the kernel, ``baselines`` among the options (none run), or
            a factorization that failed.
          ConfigError: a ``param_dtype`` that is not floating (checked before factorizing).
        """
        if param_dtype is not None:  # before the factorization, not after it
            _checks.floating(param_dtype, "FactorizedConv.from_conv: param_dtype")
        if "baselines" in options:
            raise FactorizationError("FactorizedConv.from_conv runs no baselines: leave baselines out (call "
                                     "jfactor.factorize.factorize for them)")
        layer = _read_conv(conv)
        kernel = np.asarray(dilate(layer.kernel, layer.dilation), np.float64)
        chain = _chain(sizes, layer, channels, dilations, strides)
        target = Target.from_array(kernel, spatial_dims=layer.ndim, stride=layer.strides, name="conv kernel")
        _check_covers(chain, target)
        result = factorize(target, chain, restarts=restarts, solver=solver, baselines=(), **options)
        if result.evidence["warning"]:  # the search's own doubt, which the metrics alone do not carry
            warnings.warn(f"FactorizedConv.from_conv: {result.evidence['warning']}", UserWarning, stacklevel=2)
        return cls(result.factors, chain, kernel_size=target.size, padding=layer.padding, bias=layer.bias,
                   param_dtype=param_dtype or layer.kernel.dtype, metrics=result.metrics)

    # -- what it computes ------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return self.kernels[0].shape[-2]

    @property
    def out_channels(self) -> int:
        return self.kernels[-1].shape[-1]

    def pads(self, spatial: Shape) -> Pads:
        """The first layer's ``(low, high)`` padding for inputs of spatial size ``spatial``."""
        where = "FactorizedConv"
        if len(spatial) != self.chain.ndim:
            raise StackError(f"{where}: a {self.chain.ndim}-D chain cannot apply to a {len(spatial)}-D input")
        conv_pads = _checks.resolve_padding(self.padding, tuple(spatial), self.kernel_size, self.chain.stride, where)
        centre = target_padding(self.chain.extent, self.kernel_size, self.chain.stride)
        return tuple((lo + a, hi + b) for (lo, hi), (a, b) in zip(conv_pads, centre))

    def to_stack(self, input_shape) -> Stack:
        """The chain as a jfactor Stack on ``input_shape`` (*spatial, C_in): explicit pads first, bias last."""
        input_shape = _checks.input_shape(input_shape)
        pads = self.pads(input_shape[:-1])
        last = len(self.chain.layers) - 1
        layers = [Conv(k[...], self.bias[...] if i == last and self.bias is not None else None,
                       layer.stride, layer.dilation, pads if i == 0 else "valid")
                  for i, (k, layer) in enumerate(zip(self.kernels, self.chain.layers))]
        return Stack(layers, input_shape)

    def __call__(self, x):
        """``x`` (N, *spatial, C_in) -> (N, *out, C_out), the replaced conv's output shape."""
        if x.ndim != self.chain.ndim + 2 or x.shape[-1] != self.in_channels:
            raise StackError(
                f"FactorizedConv: expected an input (N, {', '.join(['*'] * self.chain.ndim)}, {self.in_channels}), "
                f"got {tuple(x.shape)}")
        x = jnp.asarray(x)
        kernels = [k[...] for k in self.kernels]
        bias = None if self.bias is None else self.bias[...]
        dtype = jnp.result_type(x, *kernels)
        x = x.astype(dtype)
        for i, (kernel, layer) in enumerate(zip(kernels, self.chain.layers)):
            pads = self.pads(x.shape[1:-1]) if i == 0 else ((0, 0),) * self.chain.ndim
            x = _conv(x, kernel.astype(dtype), strides=layer.stride, dilation=layer.dilation, pads=pads, groups=1)
        return x if bias is None else x + bias.astype(dtype)

    # -- what it costs and how good it was -------------------------------------------------

    @property
    def metrics(self) -> dict:
        """The factorization's metrics (empty when built from explicit factors)."""
        return dict(self._metrics)

    @property
    def init_error(self) -> float | None:
        """Relative Frobenius error of the factorized kernel at construction (None if unknown)."""
        return self.metrics.get("rel_error")

    @property
    def num_params(self) -> int:
        """Every weight it holds: kernels (frozen ones too) and bias."""
        return sum(k.size for k in self.kernels) + (0 if self.bias is None else self.bias.size)

    @property
    def macs_per_output(self) -> int:
        """Multiply-adds per output position, each layer at its own resolution (borders ignored).

        The replaced conv's is ``prod(k) * C_in * C_out``.
        """
        return self.chain.macs_per_output(self.in_channels, self.out_channels)

    def macs(self, input_shape) -> int:
        """Multiply-adds of one example ``(*spatial, C_in)``, every layer's output counted."""
        stack = self.to_stack(input_shape)
        return program_macs(stack.lower(), stack.input_shape[:-1])


def _read_conv(conv) -> Conv:
    """The jfactor Conv an ``nnx.Conv`` computes, if a chain can replace it; else FactorizationError."""
    where = "FactorizedConv.from_conv"
    if not isinstance(conv, nnx.Conv):
        raise FactorizationError(f"{where}: expected an nnx.Conv, got {type(conv).__name__}")
    try:
        layer = conv_from_nnx(conv)
    except StackError as exc:
        raise FactorizationError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None
    if layer.groups != 1:
        raise FactorizationError(
            f"{where}: feature_group_count = {layer.groups}; only ungrouped convs (1) can be replaced, "
            "a chain of dense kernels would mix the groups")
    return layer


def _chain(sizes, layer: Conv, channels, dilations, strides) -> Chain:
    """The chain ``sizes`` describes for ``layer`` (a given Chain is checked, not rebuilt)."""
    where = "FactorizedConv.from_conv"
    if isinstance(sizes, Chain):
        given = [name for name, v in (("channels", channels), ("dilations", dilations), ("strides", strides))
                 if v is not None]
        if given:
            raise FactorizationError(f"{where}: {', '.join(given)} given with a Chain; build them into the Chain")
        chain = sizes
    else:
        width = max(layer.in_channels, layer.out_channels) if channels is None else channels
        chain = Chain.build(sizes, dilations=dilations, strides=strides, channels=width, ndim=layer.ndim)
    if chain.stride != tuple(layer.strides):
        raise FactorizationError(
            f"{where}: the conv has strides {tuple(layer.strides)} but the chain's strides multiply to "
            f"{chain.stride}; pass strides per layer whose product is {tuple(layer.strides)}, "
            f"e.g. strides={[1] * (len(chain.layers) - 1) + [tuple(layer.strides)]}")
    return chain


def _check_covers(chain: Chain, target: Target) -> None:
    """check_chain's errors (receptive field, frozen weights), named for from_conv."""
    try:
        check_chain(chain, target)
    except FactorizationError as exc:
        raise FactorizationError(f"FactorizedConv.from_conv: {exc}") from None


__all__ = ["FactorizedConv", "FrozenKernel"]
