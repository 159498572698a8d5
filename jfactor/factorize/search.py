"""Search over chains: the Pareto front of approximation error against multiply-adds.

Candidates are built from the sets a user gives: kernel sizes (e.g. 3, 5, 9), dilations,
channel widths and a number of layers; every chain whose receptive field covers the
target (and overshoots it by less than ``slack`` pixels) is factorized, and the ones
no other candidate beats on both error and cost form the front, best (lowest error)
first.  :func:`cheapest_under` then picks the cheapest chain within an error budget.
Layers (a size and a dilation each) are combined without regard to order for single-channel
chains of width 1 (convolution commutes there), up to reversal for single-channel chains of
more channels, in every order otherwise (:func:`arrangement`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from jfactor._checks import is_int, is_real
from jfactor.errors import ConfigError
from jfactor.factorize.api import Factorization, factorize
from jfactor.factorize.chain import Chain, FactorizationError, Target, _per_dim
from jfactor.factorize.multistart import EXACT
from jfactor.progress import ProgressBar


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One factorized chain of a search; ``on_front`` marks the Pareto-optimal ones."""

    chain: Chain
    rel_error: float
    macs: int
    params: int
    result: Factorization
    on_front: bool = False

    def to_dict(self) -> dict:
        return {"chain": self.chain.describe(), "rel_error": self.rel_error, "macs": self.macs,
                "params": self.params, "on_front": self.on_front,
                "spectral_error": self.result.metrics["spectral_error"], "evidence": self.result.evidence}


def candidates(target: Target, *, sizes=(3, 5, 9), dilations=(1,), widths=(1,), layers=(1, 2, 3),
               slack: int = 2, limit: int = 200) -> list[Chain]:
    """Chains from the given sets whose receptive field is within [size, size + slack] per dim."""
    sets = {"sizes": sizes, "dilations": dilations, "widths": widths, "layers": layers}
    for name, values in sets.items():
        if (isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray, set, frozenset))
                or not len(values)):
            raise FactorizationError(f"{name} must be a non-empty list or set of candidates, got {values!r}")
    # a set, in its sorted order: the candidates (and so the search) do not depend on the set's hash order
    sizes, dilations, widths, layers = (sorted(values) if isinstance(values, (set, frozenset)) else list(values)
                                        for values in sets.values())
    if not all(is_int(n) and n >= 1 for n in layers):
        raise FactorizationError(f"layers must be positive integers, got {list(layers)}")
    if not is_int(slack) or slack < 0:
        raise FactorizationError(f"slack must be a non-negative integer, got {slack!r}")
    single = target.c_in == 1 and target.c_out == 1
    # per-dim tuples, comparable whichever form each was given in
    each_size = [_per_dim(v, target.ndim, "sizes") for v in sizes]
    each_dilation = [_per_dim(v, target.ndim, "dilations") for v in dilations]
    arranged = {}  # each distinct chain once, in the order of its first arrangement
    for n in layers:
        for chosen in itertools.product(each_size, repeat=n):
            for dilation in itertools.product(each_dilation, repeat=n):
                for width in widths if n > 1 else (1,):
                    arranged.setdefault((arrangement(tuple(zip(chosen, dilation)), width, single), width), None)
    found = []
    for layer_list, width in arranged:
        chosen, dilation = zip(*layer_list)
        chain = Chain.build(list(chosen), dilations=list(dilation), channels=width, ndim=target.ndim)
        if all(0 <= e - s <= slack for e, s in zip(chain.extent, target.size)):
            found.append(chain)
    if not found:
        raise FactorizationError(
            f"no chain from sizes {list(sizes)}, dilations {list(dilations)} and {list(layers)} layers covers "
            f"the {'x'.join(map(str, target.size))} target within {slack} pixels; add sizes, layers or slack")
    if len(found) > limit:
        raise FactorizationError(f"{len(found)} candidate chains (limit {limit}); narrow the sets or raise the limit")
    return found


def arrangement(layers: tuple, width: int, single: bool) -> tuple:
    """The chain of ``layers`` ((size, dilation) each) and ``width`` channels, in the order that
    stands for every order giving the same chains: sorted for a single-channel chain of width 1
    (its kernel is a product of single-channel convolutions, which commute); of it and its
    reverse the lower for a single-channel chain of more channels (its kernel is
    ``sum_{a,b} f_1[a] * f_2[a,b] * ... * f_n[., .]``, which the reversed chain with transposed
    channels gives as well); as it is for other chains."""
    if single and width == 1:
        return tuple(sorted(layers))
    return min(layers, layers[::-1]) if single else layers


def _compared_error(candidate: Candidate) -> float:
    """The error a front compares: 0 at the rounding floor of the run's dtype (:data:`EXACT`),
    where 2e-16 and 3e-16 are the same answer."""
    return 0.0 if candidate.rel_error <= EXACT[candidate.result.settings["dtype"]] else candidate.rel_error


def pareto(points: list[Candidate]) -> list[Candidate]:
    """Mark the candidates no other beats on both error and MACs; front first, by error."""
    marked = []
    for p in points:
        dominated = any(_compared_error(q) <= _compared_error(p) and q.macs <= p.macs
                        and (_compared_error(q) < _compared_error(p) or q.macs < p.macs) for q in points)
        marked.append(dataclasses.replace(p, on_front=not dominated))
    return sorted(marked, key=lambda c: (not c.on_front, _compared_error(c), c.macs))


def search(target, *, sizes=(3, 5, 9), dilations=(1,), widths=(1,), layers=(1, 2, 3), slack: int = 2,
           limit: int = 200, progress: bool = False, **options) -> list[Candidate]:
    """Factorize every candidate chain (``options`` go to :func:`factorize`); return all, front first."""
    target = target if isinstance(target, Target) else Target.from_array(target)
    if any(s != 1 for s in target.stride):  # its chains have none, and search takes no strides to give them
        raise FactorizationError(f"{target.name}: search builds chains without strides, and the target has stride "
                                 f"{target.stride}: factorize it into chains of your own, Chain.build(sizes, "
                                 "strides=...) with strides that multiply to it")
    chains = candidates(target, sizes=sizes, dilations=dilations, widths=widths, layers=layers, slack=slack,
                        limit=limit)
    options.setdefault("baselines", ())
    results = []
    with ProgressBar(progress, len(chains), f"searching {len(chains)} chains") as bar:
        for chain in chains:
            result = factorize(target, chain, **options)
            results.append(Candidate(chain, result.rel_error, chain.macs_per_output(target.c_in, target.c_out),
                                     chain.num_params(target.c_in, target.c_out), result))
            bar.advance()
    return pareto(results)


def cheapest_under(front: list[Candidate], max_error: float) -> Candidate | None:
    """The front's cheapest chain with ``rel_error <= max_error`` (None if none is that good); an
    exact one (at the rounding floor, as the front compares it) fits any budget, 0 included."""
    if not is_real(max_error) or not max_error >= 0:
        raise ConfigError(f"max_error must be a relative error >= 0, got {max_error!r}")
    if not isinstance(front, (list, tuple)) or not all(isinstance(c, Candidate) for c in front):
        raise ConfigError(f"cheapest_under takes the list of Candidates search() returns, got {front!r:.80}")
    fitting = [c for c in front if c.on_front and _compared_error(c) <= max_error]
    return min(fitting, key=lambda c: c.macs) if fitting else None
