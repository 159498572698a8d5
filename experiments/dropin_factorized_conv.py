"""Drop-in factorized conv: a small CNN's 15x15 layer replaced by a chain of small kernels.

    python experiments/dropin_factorized_conv.py                 # table (a few minutes on 2 CPU cores)
    python experiments/dropin_factorized_conv.py --json --out experiments/results/dropin_factorized_conv.json
    python experiments/dropin_factorized_conv.py --tiny --json   # smoke run (seconds)

Model: conv 3x3 (1 -> C) -> relu -> conv 15x15 (C -> C, 'SAME') -> relu -> conv 1x1 (C -> 1),
weights drawn with a fixed seed.  The large layer's kernel is one of three kinds:

- ``gaussian``: a Gaussian blur (sigma 15 / 6) times a random C x C channel mix: separable,
  so the chain 3 -> 5 -> 9 (width C) represents it exactly;
- ``smooth``: white noise low-passed (Gaussian, sigma 1.5) under a Gaussian envelope
  (sigma 15 / 4), the look of trained large kernels;
- ``random``: i.i.d. normal taps, the worst case.

Each is replaced by ``FactorizedConv.from_conv`` with the chains 3 -> 5 -> 9 and
3 -> 3 d2 -> 3 d4 (width C; ``--solver`` L-BFGS or Levenberg-Marquardt, ``--steps`` steps,
``--restarts`` restarts), and both
models run on skimage's camera, astronaut, coins and moon (grey, resized to
``--size``).  Reported per row: the kernel's relative error, the model output's relative
error and PSNR per image (peak = max |dense output|; float64), exact multiply-adds per
image and parameters, and warm jitted time per batch of the four images (float32, the
median of ``--repeats`` calls) of the whole model and of the large layer alone.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

import jfactor as jf
from jfactor import kernels
from jfactor.analysis import program_macs
from jfactor.factorize import Chain, Solver
from jfactor.factorized_conv import FactorizedConv

IMAGES = ("camera", "astronaut", "coins", "moon")
KINDS = ("gaussian", "smooth", "random")


# -- the model -----------------------------------------------------------------------------


class SmallCNN(nnx.Module):
    """conv 3x3 (1 -> C) -> relu -> ``large`` (C -> C) -> relu -> conv 1x1 (C -> 1); (N, H, W, 1) -> (N, H, W, 1)."""

    def __init__(self, stem: nnx.Conv, large, head: nnx.Conv):
        self.stem, self.large, self.head = stem, large, head

    def __call__(self, x):
        return self.head(nnx.relu(self.large(nnx.relu(self.stem(x)))))


def nnx_conv(kernel: np.ndarray, bias: np.ndarray) -> nnx.Conv:
    """A float64 'SAME' nnx.Conv holding ``kernel`` (*k, C_in, C_out) and ``bias`` (C_out,)."""
    return nnx.Conv(kernel.shape[-2], kernel.shape[-1], kernel.shape[:-2], padding="SAME",
                    param_dtype=jnp.float64, kernel_init=lambda *_: jnp.asarray(kernel),
                    bias_init=lambda *_: jnp.asarray(bias), rngs=nnx.Rngs(0))


def large_kernel(kind: str, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """The large layer's kernel (size, size, C, C), each output channel of unit norm."""
    shape = (size, size, channels, channels)
    if kind == "gaussian":
        kernel = kernels.gaussian(size)[..., None, None] * rng.normal(size=(channels, channels))
    elif kind == "smooth":
        noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(1.5, 1.5, 0, 0))
        kernel = noise * kernels.gaussian(size, sigma=size / 4)[..., None, None]
    else:
        kernel = rng.normal(size=shape)
    return kernel / np.linalg.norm(kernel.reshape(-1, channels), axis=0)


def dense_model(kind: str, size: int, channels: int, seed: int) -> SmallCNN:
    rng = np.random.default_rng(seed)
    stem = nnx_conv(rng.normal(size=(3, 3, 1, channels)) / 3, 0.1 * rng.normal(size=channels))
    large = nnx_conv(large_kernel(kind, size, channels, rng), 0.1 * rng.normal(size=channels))
    head = nnx_conv(rng.normal(size=(1, 1, channels, 1)) / math.sqrt(channels), np.zeros(1))
    return SmallCNN(stem, large, head)


def load(size: int) -> np.ndarray:
    """skimage's IMAGES, grey, resized to size x size: (4, size, size, 1) float64 in [0, 1]."""
    from skimage import color, data, transform, util

    out = []
    for name in IMAGES:
        image = util.img_as_float(getattr(data, name)())
        if image.ndim == 3:
            image = color.rgb2gray(image[..., :3])
        out.append(transform.resize(image, (size, size), anti_aliasing=True))
    return np.stack(out)[..., None]


# -- measurements --------------------------------------------------------------------------


def output_errors(dense: np.ndarray, factorized: np.ndarray) -> dict:
    """Per image: relative error and PSNR (peak = max |dense|) of ``factorized`` (N, H, W, 1)."""
    rows = {}
    for name, want, got in zip(IMAGES, dense, factorized):
        mse = float(np.mean((got - want) ** 2))
        rows[name] = {"rel_error": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
                      "psnr_db": None if mse == 0 else 10 * math.log10(float(np.abs(want).max()) ** 2 / mse)}
    return rows


def warm_ms(module, x: np.ndarray, repeats: int) -> float:
    """Median wall time (ms) of a jitted float32 call of ``module`` on ``x``, after a warm-up."""
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda a: a.astype(jnp.float32), state)
    run = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
    x = jnp.asarray(x, jnp.float32)
    run(state, x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(state, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def conv_macs(conv: nnx.Conv, input_shape) -> int:
    """Multiply-adds of one example (*spatial, C_in) through an nnx.Conv."""
    stack = jf.from_nnx(conv, input_shape)
    return program_macs(stack.lower(), stack.input_shape[:-1])


def layer_macs(layer, input_shape) -> int:
    return layer.macs(input_shape) if isinstance(layer, FactorizedConv) else conv_macs(layer, input_shape)


def layer_params(layer) -> int:
    if isinstance(layer, FactorizedConv):
        return layer.num_params
    return int(layer.kernel.size + (0 if layer.bias is None else layer.bias.size))


def costs(model: SmallCNN, x: np.ndarray, features: np.ndarray, repeats: int) -> dict:
    """Params, MACs per image and warm times of ``model`` on ``x`` and of its large layer on ``features``."""
    spatial = x.shape[1:-1]
    channels = features.shape[-1]
    macs = (conv_macs(model.stem, spatial + (1,)) + layer_macs(model.large, spatial + (channels,))
            + conv_macs(model.head, spatial + (channels,)))
    return {"layer_params": layer_params(model.large), "layer_macs": layer_macs(model.large, spatial + (channels,)),
            "macs": macs, "model_ms": warm_ms(model, x, repeats), "layer_ms": warm_ms(model.large, features, repeats)}


def solver_of(args) -> Solver:
    """``--solver lbfgs``: L-BFGS only (LM is slow on CPU once C_in * C_out grows); ``lm``: LM only."""
    chunk = max(1, args.steps // 4)
    if args.solver == "lm":
        return Solver(optimizer="none", refine="lm", refine_steps=args.steps, chunk=chunk)
    return Solver(optimizer="lbfgs", steps=args.steps, refine="none", chunk=chunk)


def run_row(kind: str, chain: Chain, args, x: np.ndarray) -> dict:
    """Build the dense model, replace its large layer by ``chain``, measure both."""
    model = dense_model(kind, args.kernel_size, args.channels, args.seed)
    features = nnx.relu(model.stem(jnp.asarray(x)))
    dense_out = np.asarray(model(x))
    dense = costs(model, x, features, args.repeats)
    solver = solver_of(args)
    start = time.perf_counter()
    model.large = FactorizedConv.from_conv(model.large, chain, restarts=args.restarts, solver=solver, seed=args.seed)
    factorize_s = time.perf_counter() - start
    per_image = output_errors(dense_out, np.asarray(model(x)))
    psnrs = [v["psnr_db"] for v in per_image.values() if v["psnr_db"] is not None]
    return {
        "kernel": kind, "chain": chain.describe(), "kernel_rel_error": model.large.init_error,
        "output_rel_error_max": max(v["rel_error"] for v in per_image.values()),
        "output_psnr_db_min": min(psnrs) if psnrs else None,
        "images": per_image, "dense": dense, "factorized": costs(model, x, features, args.repeats),
        "factorize_s": factorize_s,
    }


# -- report --------------------------------------------------------------------------------


def table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"SmallCNN: 3x3 (1->{s['channels']}) -> {s['kernel_size']}x{s['kernel_size']} ({s['channels']}->"
        f"{s['channels']}) -> 1x1; {len(IMAGES)} images {s['image_size']}x{s['image_size']}; "
        f"time: float32, warm, jitted, median of {s['repeats']} ({s['device']})",
        "| kernel | chain | kernel rel. error | output rel. error (max) | output PSNR dB (min) "
        "| model MACs/image dense -> chain | model ms dense -> chain | large layer ms dense -> chain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        d, f = r["dense"], r["factorized"]
        psnr = "exact" if r["output_psnr_db_min"] is None else f"{r['output_psnr_db_min']:.1f}"
        lines.append(
            f"| {r['kernel']} | {r['chain']} | {r['kernel_rel_error']:.1e} | {r['output_rel_error_max']:.1e} | {psnr} "
            f"| {d['macs'] / 1e6:.1f}M -> {f['macs'] / 1e6:.1f}M ({d['macs'] / f['macs']:.2f}x) "
            f"| {d['model_ms']:.1f} -> {f['model_ms']:.1f} ({d['model_ms'] / f['model_ms']:.2f}x) "
            f"| {d['layer_ms']:.1f} -> {f['layer_ms']:.1f} ({d['layer_ms'] / f['layer_ms']:.2f}x) |")
    return "\n".join(lines)


def chains(args) -> list[Chain]:
    if args.tiny:
        return [Chain.build([3, 5], channels=args.channels)]
    return [Chain.build([3, 5, 9], channels=args.channels),
            Chain.build([3, 3, 3], dilations=[1, 2, 4], channels=args.channels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=4, help="C, the model's width")
    parser.add_argument("--kernel-size", type=int, default=15, help="the large layer's kernel size")
    parser.add_argument("--size", type=int, default=256, help="image side")
    parser.add_argument("--solver", choices=("lbfgs", "lm"), default="lbfgs")
    parser.add_argument("--steps", type=int, default=2000, help="solver steps of each factorization")
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7, help="warm timed calls; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smoke run: C=2, 7x7, 32x32 images, chain 3 -> 5, LM")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.channels, args.kernel_size, args.size, args.repeats = 2, 7, 32, 2
        args.solver, args.steps, args.restarts = "lm", 100, 2
    x = load(args.size)
    rows = [run_row(kind, chain, args, x) for chain in chains(args) for kind in KINDS]
    result = {
        "settings": {"channels": args.channels, "kernel_size": args.kernel_size, "image_size": args.size,
                     "images": list(IMAGES), "solver": args.solver, "steps": args.steps, "restarts": args.restarts,
                     "repeats": args.repeats, "seed": args.seed, "timing_dtype": "float32",
                     "device": jax.devices()[0].device_kind, "platform": platform.platform(),
                     "command": " ".join(["python", *sys.argv])},
        "rows": rows,
    }
    print(json.dumps(result) if args.json else table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
