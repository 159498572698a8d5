"""What a factorization will cost, estimated before it starts, and the budget it must fit.

The estimate counts the arrays that dominate: the Levenberg-Marquardt Jacobians (dense
solve) or the per-factor kernel products (matrix-free solve), every restart's loss history,
the ALS / lstsq baselines, which build one Jacobian per start, and the targets padded to the
chain's extent and the default images of the output-space metric (all from shapes, before
any of them is made).  It is an order of magnitude, not a
measurement; it is shown with the progress bar and, past the memory budget, stops the
run before any compute with a message naming what to change.

The budget is :func:`jfactor.memory.memory_budget`.
"""

from __future__ import annotations

import dataclasses
import math

from jfactor.memory import check_bytes, size_text

ALS_SWEEPS = 100  # as in baselines.als


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Peak bytes per part (``lm``, ``als``) and floating-point operations in all."""

    memory: dict
    flops: float

    @property
    def peak_bytes(self) -> float:
        return max(self.memory.values(), default=0.0)

    def describe(self) -> str:
        return f"~{size_text(self.peak_bytes)}, ~{self.flops:.1e} flop"


def estimate(chain, c_in: int, c_out: int, free: tuple[int, ...], residuals: int, items: int, restarts: int,
             solver, itemsize: int, baselines=(), *, cpu: bool = True, arrays: dict | None = None) -> Estimate:
    """The cost of factorizing ``items`` (targets x restarts) with ``chain``.

    Args:
      chain: the :class:`~jfactor.factorize.Chain`; ``free`` the indices of its learned layers.
      residuals: length ``m`` of the objective's residual (the kernel's size for ``kernel``).
      solver: the :class:`~jfactor.factorize.Solver`; ``itemsize`` bytes per number.
      cpu: LM groups on a CPU hold ~8 MB of dense Jacobians at a time (see ``solve``).
      arrays: bytes of further parts (:func:`arrays`), counted as they are.
    """
    from jfactor.factorize.solve import dense_step

    shapes = chain.factor_shapes(c_in, c_out)
    sizes = [math.prod(shapes[i]) for i in free]
    n, m = sum(sizes), residuals
    extent = math.prod(chain.extent)
    channels = chain.channels(c_in, c_out)
    memory, flops = {}, 0.0
    if solver.refines:
        if dense_step(solver, m, n):
            per_item = (m * n + min(m, n) ** 2) * itemsize
            in_flight = min(items, max(1, int(8e6 // (m * n * itemsize)))) if cpu else items
            step = min(m * n * n, m * m * n)
        else:
            per_item = extent * c_in * c_out * max(a * b for a, b in zip(channels, channels[1:])) * itemsize * 2
            in_flight = items
            fft = 5 * extent * max(1.0, math.log2(extent)) * sum(a * b for a, b in zip(channels, channels[1:]))
            step = solver.cg_iterations * 2 * fft
        memory["lm"] = per_item * in_flight + items * solver.refine_steps * itemsize  # and every item's loss history
        flops += solver.refine_steps * items * step
    if solver.optimizer != "none" and solver.steps:
        memory["first-order"] = items * (m + 8 * n + solver.steps) * itemsize
        flops += solver.steps * items * 6 * m * max(channels)
    # ALS runs from every start; lstsq from one, and only where one factor is free (else it says so)
    least_squares = [name for name in ("als", "lstsq") if name in set(baselines) and (name == "als" or len(free) == 1)]
    if least_squares:
        starts = restarts if "als" in least_squares else 1
        widest = max(sizes)
        memory[least_squares[0]] = starts * (m * widest + widest * widest) * 8
        flops += ALS_SWEEPS * starts * sum(m * s * s for s in sizes)
    memory.update(arrays or {})
    return Estimate(memory, flops)


# float64 copies of its residual (every image's output) that the images objective holds at its peak,
# whatever the restarts: 1.30 and 2.54 GB peaks with 30 and 60 crops of each default image (a 7x7
# target into 3-5, 2 restarts, 2026-12-06), 0.45 GB for the default search on 2 crops
OBJECTIVE_COPIES = 140
# float64 copies of the images' Gram matrix (p x p) that making its factor holds at its peak (the matrix,
# eigh's eigenvectors and workspace, the factor): 3.6 by tracemalloc for a 53x53 kernel (p = 2,809)
GRAM_COPIES = 4


def arrays(targets: tuple[int, ...], count: int, image_values: int = 0, objective_residuals: int = 0,
           gram_taps: int = 0) -> dict:
    """Bytes of the float64 arrays a run makes before it starts, for :func:`estimate`'s ``arrays``:
    ``count`` targets of shape ``targets`` (zero-padded to the chain's extent; three copies),
    ``image_values`` values of the default images of the output-space metric (four copies: the
    resize that makes them and the FFTs that filter them) and, for the images objective, its
    ``objective_residuals`` residuals (:data:`OBJECTIVE_COPIES` copies) and, where it runs on the
    images' Gram factor (:func:`jfactor.factorize.objectives.gram_factor`), that factor's making
    for ``gram_taps`` taps (:data:`GRAM_COPIES` copies of its p x p matrix)."""
    return {"targets": 3 * count * math.prod(targets) * 8, "images": 4 * image_values * 8,
            "objective": OBJECTIVE_COPIES * objective_residuals * 8, "gram": GRAM_COPIES * gram_taps**2 * 8}


# what to change where each part of an estimate passes the budget
KNOBS = {
    "lm": "use fewer restarts, fewer channels or smaller chain sizes, or set solver.linear_solver: cg (every "
          "restart also keeps its loss at each of solver.refine_steps)",
    "first-order": "use fewer restarts or channels (every restart also keeps its loss at each of solver.steps)",
    "als": "drop the als baseline (and lstsq: baselines: [svd]) or use fewer restarts",
    "lstsq": "drop the lstsq baseline (baselines: [svd])",
    "targets": "use smaller chain sizes or dilations (the target is zero-padded to the chain's extent)",
    "images": "use smaller chain sizes or dilations (the output metric filters images four times the "
              "chain's extent)",
    "objective": "use fewer or smaller images for the images objective (objective.crops, objective.image_size, "
                 "objective.images)",
    "gram": "use smaller chain sizes or dilations (the images objective's Gram factor grows with the square of the "
            "kernel's taps)",
}


def check(cost: Estimate, what: str) -> None:
    """Raise a :class:`ConfigError` naming the largest part and the knobs for it when ``cost`` passes
    the memory budget (:func:`jfactor.memory.check_bytes`)."""
    if cost.memory:
        part = max(cost.memory, key=cost.memory.get)
        check_bytes(cost.peak_bytes, f"{what} ({part})", KNOBS[part])
