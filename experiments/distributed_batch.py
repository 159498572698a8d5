"""fold_batch and factorize_batch spread over the processes of jax.distributed (several hosts).

Two processes on one machine (CPU; each may also have several devices)::

    python experiments/distributed_batch.py --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 &
    python experiments/distributed_batch.py --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1

N hosts under Slurm (``jax.distributed.initialize()`` reads the job from Slurm's variables)::

    srun --nodes=N --ntasks-per-node=1 python experiments/distributed_batch.py

Every process builds the same batches: ``--stacks`` random-weight copies of the seed's
section 5 stack, and ``--targets`` Laplacian-of-Gaussian targets (5x5, sigma 0.8 to 1.2)
for the chain 3x3 -> 3x3.  ``fold_batch(..., shard=True)`` and ``factorize_batch(...,
shard=True)`` give each process one block of each batch, and every process gets all the
results.  Each process prints one line; ``--out PREFIX`` writes ``PREFIX.npz`` (the
results) and ``PREFIX.json`` (process count, devices, seconds).  ``--single`` runs in one
process without jax.distributed and without sharding: the reference to compare with.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).parent.parent


def workload(n_stacks: int, n_targets: int, shard: bool) -> dict:
    """The folded kernels and biases of ``n_stacks`` stacks and the factorizations of ``n_targets``, as arrays."""
    import jfactor as jf
    from jfactor import kernels
    from jfactor.factorize import Chain, Solver, factorize_batch
    from jfactor.stack_config import load_stack

    structure = load_stack(ROOT / "configs" / "seed" / "section5_conv_pool_conv.yaml")
    rng = np.random.default_rng(0)
    stacks = jax.tree.map(lambda w: rng.standard_normal((n_stacks,) + w.shape), structure)
    folded = jf.fold_batch(stacks, shard=shard)
    targets = [kernels.make("log", 5, sigma=s) for s in np.linspace(0.8, 1.2, n_targets)]
    results = factorize_batch(targets, Chain.build([3, 3]), solver=Solver(optimizer="none", refine_steps=40, chunk=10),
                              restarts=2, shard=shard)
    out = {"kernel": np.asarray(folded.kernel), "bias": np.asarray(folded.bias),
           "rel_error": np.asarray([r.rel_error for r in results])}
    for i, r in enumerate(results):
        out |= {f"approx{i}": r.approx, f"restart_errors{i}": r.restart_errors, f"history{i}": r.history,
                f"best{i}": np.asarray(r.best), f"diverged{i}": r.diverged}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (default: what jax detects, e.g. Slurm)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--stacks", type=int, default=1000)
    parser.add_argument("--targets", type=int, default=16)
    parser.add_argument("--single", action="store_true", help="one process, no sharding (the reference)")
    parser.add_argument("--out", help="write OUT.npz and OUT.json")
    args = parser.parse_args()
    if not args.single:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=120)
    start = time.perf_counter()
    out = workload(args.stacks, args.targets, shard=not args.single)
    seconds = time.perf_counter() - start
    info = {"process": jax.process_index(), "process_count": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "stacks": args.stacks, "targets": args.targets,
            "seconds": seconds}
    print(f"process {info['process']}/{info['process_count']} ({info['local_devices']} of {info['devices']} "
          f"devices): folded {args.stacks} stacks and factorized {args.targets} targets in {seconds:.1f} s "
          f"(incl. compiling); median rel. error {np.median(out['rel_error']):.3e}")
    if args.out:
        np.savez(args.out + ".npz", **out)
        Path(args.out + ".json").write_text(json.dumps(info) + "\n")
    if not args.single:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
