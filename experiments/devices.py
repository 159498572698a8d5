"""The device a benchmark runs on: its name, its measured bound, and where its results go.

Every rate here is measured through jax on ``jax.devices()[0]`` (the device the benchmark's
folds and solves run on), not on the host: a device-to-device copy and a float64 matmul.
Results of a device go to ``experiments/results/<slug>/`` (``slug``: the device kind,
e.g. ``cpu``, ``nvidia-h100-80gb-hbm3``, ``nvidia-h200``).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def describe() -> str:
    """``platform xCOUNT (device kind; host CPU, cores)``."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    d = jax.devices()[0]
    return f"{d.platform} x{jax.device_count()} ({d.device_kind}; {cpu}, {os.cpu_count()} cores)"


def slug() -> str:
    """The device kind of ``jax.devices()[0]`` as a folder name: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-") or "unknown"


def results_path(out_dir: Path, name: str) -> Path:
    """``out_dir/<slug>/name``, the folder made."""
    path = Path(out_dir) / slug() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def bound(tiny: bool = False) -> dict:
    """Copy bandwidth (bytes read + written per second) and float64 matmul FLOP/s on the device.

    The copy streams a float64 array resident on the device (256 MiB, 16 MiB with ``tiny``)
    through a jitted ``x + 1`` into its own donated buffer: every byte read and written once,
    and no allocation timed (a fresh output on the CPU would time page faults, not memory).
    The matmul is a jitted ``x @ x`` (2048^2, 512^2 with ``tiny``).
    """
    held = [jnp.asarray(np.random.default_rng(0).random((16 if tiny else 256) * 2**20 // 8))]
    nbytes = held[0].nbytes

    def stream():
        held[0] = _stream(held[0])
        return held[0]

    copy = _best(stream, 3 if tiny else 5)
    m = 512 if tiny else 2048
    a = jnp.asarray(np.random.default_rng(1).random((m, m)))
    matmul = _best(lambda: _matmul(a), 3)
    return {"device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "copy_gb_s": 2 * nbytes / copy / 1e9, "copy_mb": nbytes / 2**20,
            "matmul_gflop_s": 2 * m**3 / matmul / 1e9, "matmul_size": m, "dtype": "float64"}


@functools.partial(jax.jit, donate_argnums=0)
def _stream(x):
    return x + 1


@jax.jit
def _matmul(a):
    return jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST)


def peak_device_mb() -> float | None:
    """Peak bytes the device's allocator held (GPU/TPU; None where jax does not report it, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20
