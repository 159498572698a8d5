"""Learned factorization of a kernel into a chain of small kernels."""

from jfactor.factorize.api import Factorization, factorize, factorize_batch
from jfactor.factorize.baselines import BASELINES, DEFAULT_BASELINES
from jfactor.factorize.chain import Chain, ChainLayer, FactorizationError, Target, chain_kernel, check_chain
from jfactor.factorize.multistart import SearchPolicy
from jfactor.factorize.objectives import Objective, load_images
from jfactor.factorize.search import Candidate, cheapest_under, search
from jfactor.factorize.solve import Solver

__all__ = [
    "BASELINES", "Candidate", "Chain", "ChainLayer", "DEFAULT_BASELINES", "Factorization", "FactorizationError",
    "Objective", "SearchPolicy", "Solver", "Target", "chain_kernel", "check_chain", "cheapest_under", "factorize",
    "factorize_batch", "load_images", "search",
]
