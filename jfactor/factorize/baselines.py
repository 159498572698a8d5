"""Baselines reported next to every factorization, each timed in the same run.

- ``svd``: rank-R truncation of a 2-D single-channel target (R = the chain's width), the
  best sum of R separable filters; not a chain, but the classic cheap alternative;
- ``als``: alternating least squares over the free factors from the same starts as the
  factorizer (each factor's least-squares update is exact given the others);
- ``lstsq``: exact least-squares deconvolution, where one factor is free and the rest frozen;
- ``wiener`` / ``unsupervised_wiener``: the seed's route (scikit-image deconvolution of the
  target by the known, frozen part), where one undilated factor is free in a single-channel,
  stride-1 chain.  The target is zero-padded by the known kernel's size - 1 against
  circular wrap-around, and the estimate is cropped to the free factor's support;
- ``scipy_lm``: scipy ``least_squares(method='lm')`` from the same starts, in float64,
  with a numpy residual; needs at least as many residuals as parameters.

Each returns ``{"rel_error", "time_s"}`` or, where it does not apply, both None and a ``note``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jfactor.factorize.chain import Chain, chain_kernel, chain_kernel_numpy
from jfactor.factorize.metrics import rel_error
from jfactor.factorize.npconv import convolve_full
from jfactor.one_at_a_time import one_at_a_time

BASELINES = ("svd", "als", "lstsq", "wiener", "unsupervised_wiener", "scipy_lm")
DEFAULT_BASELINES = ("svd", "lstsq", "wiener", "unsupervised_wiener")  # the fast ones; als, scipy_lm on request


def _not_applicable(note: str) -> dict:
    return {"rel_error": None, "time_s": None, "note": note}


def _timed(function):
    start = time.perf_counter()
    error = function()
    return {"rel_error": float(error), "time_s": time.perf_counter() - start}


def _free_indices(chain: Chain) -> list[int]:
    return [i for i, layer in enumerate(chain.layers) if not layer.frozen]


def _support(matrix: np.ndarray) -> np.ndarray:
    """The smallest box ``(h, w)`` of a 2-D array holding all its nonzeros (a padded target's own extent)."""
    rows, cols = np.nonzero(matrix)
    return matrix[rows.min():rows.max() + 1, cols.min():cols.max() + 1] if rows.size else matrix


def svd_truncation(target: np.ndarray, chain: Chain) -> dict:
    """Rank-R truncation of a 2-D single-channel target ``(h, w, 1, 1)``; its MACs are R 1-D passes
    over the target's nonzero extent (the zero border a larger chain pads it with costs nothing)."""
    if target.ndim != 4 or target.shape[-2:] != (1, 1):
        return _not_applicable("needs a 2-D single-channel target")
    support = _support(target[..., 0, 0])
    rank = min(min(chain.widths or (1,)), *support.shape)
    sigma = np.linalg.svd(support, compute_uv=False)
    entry = _timed(lambda: np.sqrt(np.sum(sigma[rank:] ** 2)) / np.linalg.norm(sigma))
    return {**entry, "macs": rank * sum(support.shape), "note": f"rank {rank}: sum of {rank} separable"}


def _als_one(chain: Chain, free: tuple[int, ...], factors, target, sweeps: int):
    """``sweeps`` rounds of exact least-squares updates of each free factor (one start)."""
    def update(factors, i):
        def approx_of(w):
            return chain_kernel([w if j == i else f for j, f in enumerate(factors)], chain).ravel()
        matrix = jax.jacfwd(approx_of)(factors[i]).reshape(target.size, -1)
        gram = matrix.T @ matrix
        ridge = 1e-14 * jnp.trace(gram) / gram.shape[0] * jnp.eye(gram.shape[0], dtype=gram.dtype)
        w = jnp.linalg.solve(gram + ridge, matrix.T @ target.ravel()).reshape(factors[i].shape)
        return [w if j == i else f for j, f in enumerate(factors)]

    def sweep(_, factors):
        for i in free:
            factors = update(factors, i)
        return factors

    factors = jax.lax.fori_loop(0, sweeps, sweep, list(factors))
    approx = chain_kernel(factors, chain)
    return jnp.linalg.norm(approx - target) / jnp.linalg.norm(target)


@functools.partial(jax.jit, static_argnames=("chain", "free", "sweeps"))
def _als(chain: Chain, free: tuple[int, ...], factors, target, sweeps: int):
    """Relative errors ``(R,)`` of ALS from ``R`` starts at once (each factor ``(R, *shape)``)."""
    return jax.vmap(lambda start: _als_one(chain, free, start, target, sweeps))(factors)


def _stacked(starts: list[list[np.ndarray]]) -> list[jax.Array]:
    """``R`` start lists -> one list of factors with a leading restart axis."""
    return [jnp.stack([jnp.asarray(start[i]) for start in starts]) for i in range(len(starts[0]))]


@one_at_a_time
def als(target: np.ndarray, chain: Chain, starts: list[list[np.ndarray]], sweeps: int = 100) -> dict:
    """Best relative error of ALS over ``starts`` (each a full factor list), all run at once."""
    args = (chain, tuple(_free_indices(chain)), _stacked(starts), jnp.asarray(target), sweeps)
    _als(*args)  # compile

    def run():
        errors = np.asarray(_als(*args))
        return float(errors[np.isfinite(errors)].min()) if np.isfinite(errors).any() else float("nan")

    entry = _timed(run)
    if not np.isfinite(entry["rel_error"]):
        return {**_not_applicable(f"all {len(starts)} starts diverged"), "time_s": entry["time_s"]}
    return entry


@one_at_a_time
def lstsq(target: np.ndarray, chain: Chain, start: list[np.ndarray]) -> dict:
    free = _free_indices(chain)
    if len(free) != 1:
        return _not_applicable(f"{len(free)} free factors; needs 1")
    args = (chain, tuple(free), _stacked([start]), jnp.asarray(target), 1)
    _als(*args)  # compile
    return _timed(lambda: float(_als(*args)[0]))


def _known_kernel(chain: Chain, free: int) -> np.ndarray:
    """Full convolution of the frozen factors (2-D, single channel, stride 1)."""
    known = np.ones((1, 1))
    for i, (weights, dilation) in enumerate(zip(chain.weights, chain.effective_dilations)):
        if i != free:
            spread = np.zeros([(k - 1) * d + 1 for k, d in zip(weights.shape[:2], dilation)])
            spread[:: dilation[0], :: dilation[1]] = weights[..., 0, 0]
            known = convolve_full(known, spread)
    return known


def wiener(target: np.ndarray, chain: Chain, *, unsupervised: bool, seed: int = 0, balance: float = 0.01) -> dict:
    free = _free_indices(chain)
    if len(free) != 1:
        return _not_applicable(f"{len(free)} free factors; needs 1")
    from skimage import restoration  # only where it applies: it imports scipy.signal (~1 s)

    i = free[0]
    single_channel = target.ndim == 4 and target.shape[-2:] == (1, 1) and all(w == 1 for w in chain.widths)
    strided = any(s > 1 for layer in chain.layers for s in layer.stride)
    if not single_channel or strided or any(d > 1 for d in chain.effective_dilations[i]):
        return _not_applicable("needs 2-D, 1 channel, stride 1, undilated free factor")
    known = _known_kernel(chain, i)
    size = chain.layers[i].size

    def run():
        # skimage regularises with a 3x3 Laplacian, so the padded image needs 3 pixels per dim:
        # grow each side by half the shortfall, rounded up
        grow = [max(0, 4 - n - 2 * (k - 1)) // 2 for k, n in zip(known.shape, target.shape)]
        pad = [(k - 1 + g, k - 1 + g) for k, g in zip(known.shape, grow)]
        image = np.pad(target[..., 0, 0], pad)
        if unsupervised:
            estimate, _ = restoration.unsupervised_wiener(image, known, clip=False, rng=np.random.default_rng(seed))
        else:
            estimate = restoration.wiener(image, known, balance, clip=False)
        # 'same' alignment: factor tap t sits at known's centre offset (k - 1) // 2 past the padding
        start = [p + (k - 1) // 2 for (p, _), k in zip(pad, known.shape)]
        factor = estimate[start[0]: start[0] + size[0], start[1]: start[1] + size[1]]
        approx = convolve_full(known, factor)
        return rel_error(approx[..., None, None], target)

    return _timed(run)


def scipy_lm(target: np.ndarray, chain: Chain, starts: list[list[np.ndarray]]) -> dict:
    """scipy least_squares(method='lm') from each start (free factors optimised), best error."""
    from scipy import optimize

    free = _free_indices(chain)
    shapes = [starts[0][i].shape for i in free]
    sizes = [int(np.prod(s)) for s in shapes]
    if target.size < sum(sizes):
        return _not_applicable(f"method 'lm' needs residuals >= parameters ({target.size} < {sum(sizes)})")

    def factors_of(x, start):
        pieces = np.split(x, np.cumsum(sizes)[:-1])
        out = list(start)
        for i, piece, shape in zip(free, pieces, shapes):
            out[i] = piece.reshape(shape)
        return out

    def run():
        best = np.inf
        for start in starts:
            x0 = np.concatenate([start[i].ravel() for i in free])
            fun = lambda x, start=start: (chain_kernel_numpy(factors_of(x, start), chain) - target).ravel()  # noqa: E731
            result = optimize.least_squares(fun, x0, method="lm")
            best = min(best, rel_error(chain_kernel_numpy(factors_of(result.x, start), chain), target))
        return best

    return _timed(run)


def _baseline(name: str, target: np.ndarray, chain: Chain, starts: list[list[np.ndarray]], seed: int) -> dict:
    if name == "svd":
        return svd_truncation(target, chain)
    if name == "als":
        return als(target, chain, starts)
    if name == "lstsq":
        return lstsq(target, chain, starts[0])
    if name in ("wiener", "unsupervised_wiener"):
        return wiener(target, chain, unsupervised=name == "unsupervised_wiener", seed=seed)
    return scipy_lm(target, chain, starts)


def run_baselines(names, target: np.ndarray, chain: Chain, starts: list[list[np.ndarray]], seed: int = 0) -> dict:
    """Every baseline in ``names`` on ``target`` (*extent, C_in, C_out), float64.

    A baseline that fails (an outside library raising on a degenerate case, a non-finite
    result) becomes a row with ``rel_error`` None and a note saying why: it never costs the
    factorization it is compared with.
    """
    table = {}
    for name in names:
        try:
            entry = _baseline(name, target, chain, starts, seed)
        except Exception as exc:  # noqa: BLE001 - a comparison must not lose the result it is compared with
            entry = _not_applicable(f"failed: {type(exc).__name__}: {exc}".strip().rstrip(":"))
        if entry["rel_error"] is not None and not np.isfinite(entry["rel_error"]):
            entry = {**_not_applicable("non-finite result"), "time_s": entry["time_s"]}
        table[name] = entry
    return table
