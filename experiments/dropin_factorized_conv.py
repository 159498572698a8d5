"""Drop-in factorized conv: a small CNN's 15x15 layer replaced by a chain of small kernels.

    python experiments/dropin_factorized_conv.py                 # table (a few minutes on 2 CPU cores)
    python experiments/dropin_factorized_conv.py --json --out experiments/results/dropin_factorized_conv.json
    python experiments/dropin_factorized_conv.py --tiny --json   # smoke run (seconds)

Model: conv 3x3 (1 -> C) -> relu -> conv 15x15 (C -> C, 'SAME') -> relu -> conv 1x1 (C -> 1),
weights drawn with a fixed seed.  The large layer's kernel is one of three kinds:

- ``gaussian``: a Gaussian blur (sigma 15 / 6) times a C x C channel mix (identity plus
  noise): separable, so the chain 3 -> 5 -> 9 (width C) can represent it exactly;
- ``smooth``: white noise low-passed (Gaussian, sigma 1.5) under a Gaussian envelope
  (sigma 15 / 4), the look of trained large kernels;
- ``random``: i.i.d. normal taps, the worst case.

In a copy of the model (``nnx.clone``) the large layer is replaced by
``FactorizedConv.from_conv`` with the chain 3 -> 5 -> 9 or 3 -> 3 d2 -> 3 d4 (width C;
``--solver`` L-BFGS, the default, or Levenberg-Marquardt, which gets further where L-BFGS
stalls but slow on CPU from C = 3 on; ``--steps``, ``--restarts``), and both models run
on skimage's camera, astronaut, coins and moon (grey, resized to ``--size``).  Reported
per row: the kernel's relative error, the model output's relative
error and PSNR per image (peak = max |dense output|; float64), exact multiply-adds per
image and parameters, and warm jitted time per batch of the four images (float32, best of
``--repeats`` calls, dense and factorized interleaved) of the whole model and of the large
layer alone.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

import devices
import jfactor as jf
from jfactor import kernels
from jfactor.analysis import program_macs
from jfactor.factorize import Chain, Solver
from jfactor.interop.factorized_conv import FactorizedConv
import arguments

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
        mix = np.eye(channels) + rng.normal(size=(channels, channels)) / (2 * math.sqrt(channels))
        kernel = kernels.gaussian(size)[..., None, None] * mix
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
    """Per image: relative error and PSNR (peak = max |dense|) of ``factorized`` (N, H, W, 1).

    Both are None where they are undefined: an all-zero dense output (the relus can silence
    an image), and, for the PSNR, outputs that agree bit for bit.
    """
    rows = {}
    for name, want, got in zip(IMAGES, dense, factorized):
        norm, mse = float(np.linalg.norm(want)), float(np.mean((got - want) ** 2))
        rows[name] = {"rel_error": float(np.linalg.norm(got - want)) / norm if norm else None,
                      "psnr_db": 10 * math.log10(float(np.abs(want).max()) ** 2 / mse) if norm and mse else None}
    return rows


def jitted_float32(module, x: np.ndarray):
    """A no-argument call of ``module`` on ``x``, jitted, in float32, compiled and warm."""
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda a: a.astype(jnp.float32), state)
    run = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
    x = jnp.asarray(x, jnp.float32)
    call = lambda: run(state, x).block_until_ready()  # noqa: E731
    call()
    return call


def best_ms(calls: dict, repeats: int) -> dict:
    """Best wall time (ms) of each call over ``repeats`` rounds, the calls interleaved in each round.

    Best-of and interleaving keep other load on a shared machine out of the comparison.
    """
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


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


def costs(model: SmallCNN, spatial: tuple[int, ...]) -> dict:
    """Parameters and exact multiply-adds per image (*spatial) of ``model`` and of its large layer."""
    channels = model.stem.out_features
    large = layer_macs(model.large, spatial + (channels,))
    macs = conv_macs(model.stem, spatial + (1,)) + large + conv_macs(model.head, spatial + (channels,))
    return {"layer_params": layer_params(model.large), "layer_macs": large, "macs": macs}


def timings(dense: SmallCNN, factorized: SmallCNN, x: np.ndarray, repeats: int) -> dict:
    """Warm jitted float32 times (ms) of both models on ``x`` and of their large layers on the stem's features."""
    features = np.asarray(nnx.relu(dense.stem(jnp.asarray(x))))
    calls = {(name, part): jitted_float32(module, data)
             for name, model in (("dense", dense), ("factorized", factorized))
             for part, module, data in (("model_ms", model, x), ("layer_ms", model.large, features))}
    return best_ms(calls, repeats)


def solver_of(args) -> Solver:
    """``--solver lbfgs``: L-BFGS only (LM is slow on CPU once C_in * C_out grows); ``lm``: LM only."""
    chunk = max(1, args.steps // 4)
    if args.solver == "lm":
        return Solver(optimizer="none", refine="lm", refine_steps=args.steps, chunk=chunk)
    return Solver(optimizer="lbfgs", steps=args.steps, refine="none", chunk=chunk)


def run_row(kind: str, chain: Chain, args, x: np.ndarray) -> dict:
    """Build the dense model, a copy with its large layer replaced by ``chain``, measure both."""
    dense = dense_model(kind, args.kernel_size, args.channels, args.seed)
    factorized = nnx.clone(dense)
    start = time.perf_counter()
    factorized.large = FactorizedConv.from_conv(dense.large, chain, restarts=args.restarts, solver=solver_of(args),
                                                seed=args.seed)
    factorize_s = time.perf_counter() - start
    per_image = output_errors(np.asarray(dense(x)), np.asarray(factorized(x)))
    errors = [v["rel_error"] for v in per_image.values() if v["rel_error"] is not None]
    psnrs = [v["psnr_db"] for v in per_image.values() if v["psnr_db"] is not None]
    times = timings(dense, factorized, x, args.repeats)
    spatial = x.shape[1:-1]
    return {
        "kernel": kind, "chain": chain.describe(), "kernel_rel_error": factorized.large.init_error,
        "output_rel_error_max": max(errors, default=None),
        "output_psnr_db_min": min(psnrs) if psnrs else None,
        "images": per_image, "factorize_s": factorize_s,
        **{name: {**costs(model, spatial), "model_ms": times[name, "model_ms"], "layer_ms": times[name, "layer_ms"]}
           for name, model in (("dense", dense), ("factorized", factorized))},
    }


# -- report --------------------------------------------------------------------------------


def table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"SmallCNN: 3x3 (1->{s['channels']}) -> {s['kernel_size']}x{s['kernel_size']} ({s['channels']}->"
        f"{s['channels']}) -> 1x1; {len(IMAGES)} images {s['image_size']}x{s['image_size']}; "
        f"time per batch of {len(IMAGES)}: float32, warm, jitted, best of {s['repeats']} ({s['device']})",
        "| kernel | chain | kernel rel. error | output rel. error (max) | output PSNR dB (min) "
        "| model MACs/image dense -> chain | model ms dense -> chain | large layer ms dense -> chain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        d, f = r["dense"], r["factorized"]
        psnr = "exact" if r["output_psnr_db_min"] is None else f"{r['output_psnr_db_min']:.1f}"
        error = "-" if r["output_rel_error_max"] is None else f"{r['output_rel_error_max']:.1e}"
        lines.append(
            f"| {r['kernel']} | {r['chain']} | {r['kernel_rel_error']:.1e} | {error} | {psnr} "
            f"| {d['macs'] / 1e6:.3g}M -> {f['macs'] / 1e6:.3g}M ({d['macs'] / f['macs']:.2f}x) "
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
    parser.add_argument("--channels", type=arguments.positive_int, default=4, help="C, the model's width")
    parser.add_argument("--kernel-size", type=arguments.positive_int, default=15, help="the large layer's kernel size")
    parser.add_argument("--size", type=arguments.positive_int, default=256, help="image side")
    parser.add_argument("--solver", choices=("lbfgs", "lm"), default="lbfgs")
    parser.add_argument("--steps", type=int, default=2000, help="solver steps of each factorization")
    parser.add_argument("--restarts", type=arguments.positive_int, default=4)
    parser.add_argument("--repeats", type=arguments.positive_int, default=15,
                        help="warm timed calls; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smoke run: C=1, 7x7, 32x32 images, chain 3 -> 5, LM")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", type=arguments.output_file, help="also write the JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.channels, args.kernel_size, args.size, args.repeats = 1, 7, 32, 2
        args.solver, args.steps, args.restarts = "lm", 100, 2
    x = load(args.size)
    rows = [run_row(kind, chain, args, x) for chain in chains(args) for kind in KINDS]
    result = {
        "settings": {"channels": args.channels, "kernel_size": args.kernel_size, "image_size": args.size,
                     "images": list(IMAGES), "solver": args.solver, "steps": args.steps, "restarts": args.restarts,
                     "repeats": args.repeats, "seed": args.seed, "timing_dtype": "float32",
                     "device": devices.describe(), "platform": platform.platform(),
                     "command": " ".join(["python", *sys.argv])},
        "rows": rows,
    }
    print(json.dumps(result) if args.json else table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
