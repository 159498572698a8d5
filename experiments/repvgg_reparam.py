"""Structural re-parameterization (RepVGG): train three branches, deploy one conv.

    python experiments/repvgg_reparam.py    # table; writes experiments/results/repvgg_reparam.json and README's block
    python experiments/repvgg_reparam.py --tiny --out /tmp/r.json   # smoke run (seconds)

Task: learn an unknown 3x3 filter (a per-channel sharpening followed by a random RGB
mix) from noisy pairs ``y = teacher(x) + noise`` on crops of skimage's images (three
channels, standardised, ``--size`` pixels, ``--train`` / ``--test`` crops, noise std ``--noise``).

Block (RepVGG): ``conv 3x3 -> BN`` + ``conv 1x1 -> BN`` + ``BN`` (identity branch),
summed, 'same' padding, C -> C.  BatchNorm is the inference form: its mean and variance
are each branch's statistics on the training crops at initialisation (then frozen);
gamma, beta and the kernels are trained with optax's Adam (``--steps``, ``--lr``), full
batch, float64.  Three ways to train:

- ``fold_conv``: the loss applies ``jf.fold_conv(block)``, one 3x3 conv; gradients flow
  through the fold to every branch;
- ``branches``: the loss applies the block itself (three convs and a sum);
- ``plain conv``: a single 3x3 conv with bias, trained directly (the baseline).

The first two are the same function of the same parameters, so their loss curves agree
to rounding.  Deployed: ``jf.fold_conv`` of the trained block, compared with the block on
the test crops (max abs difference, and ``jf.fold``'s float64 certificate).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfactor as jf
from jfactor.factorize.objectives import load_images

sys.path.insert(0, str(Path(__file__).parent))
from readme_block import replace_block  # noqa: E402
import devices  # noqa: E402
import arguments

IMAGES = ("astronaut", "coffee", "chelsea")
DEFAULT_OUT = Path(__file__).parent / "results" / "repvgg_reparam.json"
CHANNELS = 3
EPSILON = 1e-3


def teacher_kernel(rng) -> np.ndarray:
    """(3, 3, C, C): per-channel sharpening ``x + (x - box3(x))``, then a random channel mix."""
    sharpen = -np.full((3, 3), 1 / 9)
    sharpen[1, 1] += 2.0
    mix = np.eye(CHANNELS) + 0.3 * rng.standard_normal((CHANNELS, CHANNELS))
    return sharpen[:, :, None, None] * mix[None, None]


def make_data(args, rng):
    """Train and test (inputs, targets), float64; targets carry Gaussian noise."""
    kernel = teacher_kernel(rng)
    teacher = jf.Conv(kernel, padding="same")
    crops = load_images(IMAGES, size=args.size, count=-(-(args.train + args.test) // len(IMAGES)), c_in=CHANNELS,
                        seed=args.seed)[: args.train + args.test]
    x = jnp.asarray((crops - crops.mean()) / crops.std(), jnp.float64)
    y = teacher(x) + args.noise * rng.standard_normal(x.shape)
    return (x[: args.train], y[: args.train]), (x[args.train :], y[args.train :])


def _statistics(branch_out):
    """Per-channel mean and variance over (N, H, W) of one branch's pre-BN output."""
    return branch_out.mean(axis=(0, 1, 2)), branch_out.var(axis=(0, 1, 2))


def _bn(stats):
    mean, var = stats
    return jf.BatchNorm(np.ones(CHANNELS), np.zeros(CHANNELS), mean, var, EPSILON)


def repvgg_block(x, rng) -> jf.Stack:
    """conv3x3 -> BN + conv1x1 -> BN + BN, summed; BN statistics measured on ``x``."""
    k3 = rng.standard_normal((3, 3, CHANNELS, CHANNELS)) / np.sqrt(9 * CHANNELS)
    k1 = rng.standard_normal((1, 1, CHANNELS, CHANNELS)) / np.sqrt(CHANNELS)
    conv3, conv1 = jf.Conv(k3, padding="same"), jf.Conv(k1)
    branches = [[conv3, _bn(_statistics(conv3(x)))], [conv1, _bn(_statistics(conv1(x)))], [_bn(_statistics(x))]]
    return jf.Stack([jf.Branches(branches, "sum")], x.shape[1:])


def plain_conv(rng, shape) -> jf.Stack:
    kernel = rng.standard_normal((3, 3, CHANNELS, CHANNELS)) / np.sqrt(9 * CHANNELS)
    return jf.Stack([jf.Conv(kernel, np.zeros(CHANNELS), padding="same")], shape)


def frozen_labels(stack):
    """'freeze' for BatchNorm mean and variance (statistics, not parameters), 'train' elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "freeze" if jax.tree_util.keystr(path).endswith((".mean", ".var")) else "train", stack)


def forward_fold(stack, x):
    return jf.fold_conv(stack)(x)


def train(stack, forward, data, args):
    """Full-batch Adam on the mean squared error; returns the trained stack, losses and s/step."""
    (x, y), _ = data
    optimizer = optax.multi_transform({"train": optax.adam(args.lr), "freeze": optax.set_to_zero()},
                                      frozen_labels)

    def loss(s):
        return jnp.mean((forward(s, x) - y) ** 2)

    @jax.jit
    def step(s, state):
        value, grads = jax.value_and_grad(loss)(s)
        updates, state = optimizer.update(grads, state, s)
        return optax.apply_updates(s, updates), state, value

    state = optimizer.init(stack)
    stack, state, _ = step(stack, state)  # compile (and take the first step)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps - 1):
        stack, state, value = step(stack, state)
        losses.append(float(value))
    seconds = (time.perf_counter() - start) / max(args.steps - 1, 1)
    return stack, np.asarray(losses), seconds


def mse(stack, data) -> float:
    x, y = data
    return float(jnp.mean((jf.apply(stack, x) - y) ** 2))


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    data = make_data(args, rng)
    x_train = data[0][0]
    block = repvgg_block(x_train, rng)
    baseline = plain_conv(rng, x_train.shape[1:])
    trained = {
        "fold_conv": train(block, forward_fold, data, args),
        "branches": train(block, jf.apply, data, args),
        "plain conv": train(baseline, jf.apply, data, args),
    }
    rows = []
    for name, (stack, losses, seconds) in trained.items():
        deployed = jf.Stack([jf.fold_conv(stack)], stack.input_shape)
        x_test = data[1][0]
        rows.append({
            "model": name,
            "train_params": stack.num_params(),
            "deployed_params": deployed.num_params(),
            "train_mse": mse(stack, data[0]),
            "test_mse": mse(stack, data[1]),
            "deployed_test_mse": mse(deployed, data[1]),
            "block_vs_deployed_max_abs": float(jnp.abs(jf.apply(stack, x_test) - deployed(x_test)).max()),
            "certificate_max_abs_diff": jf.fold(stack).certificate.max_abs_diff,
            "exact_everywhere": jf.fold(stack).exact,
            "s_per_step": seconds,
            "final_loss": float(losses[-1]) if len(losses) else None,
        })
    same_curve = float(np.max(np.abs(trained["fold_conv"][1] - trained["branches"][1]))) if args.steps > 1 else 0.0
    return {
        "task": {"images": list(IMAGES), "size": args.size, "train": args.train, "test": args.test,
                 "noise_std": args.noise, "noise_floor_mse": args.noise**2},
        "steps": args.steps, "lr": args.lr, "seed": args.seed, "dtype": "float64",
        "rows": rows,
        "fold_conv_vs_branches_max_loss_diff": same_curve,
        "machine": {"device": devices.describe(), "processor": platform.processor() or platform.machine(),
                    "jax": jax.__version__, "optax": optax.__version__},
    }


def table(result: dict) -> str:
    lines = ["| training | params (train) | params (deployed) | train MSE | test MSE | deployed test MSE "
             "| max abs block - deployed | ms/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['train_params']} | {r['deployed_params']} | {r['train_mse']:.3e} "
                     f"| {r['test_mse']:.3e} | {r['deployed_test_mse']:.3e} | {r['block_vs_deployed_max_abs']:.1e} "
                     f"| {1e3 * r['s_per_step']:.2f} |")
    lines.append(f"\nnoise floor (MSE) {result['task']['noise_floor_mse']:.1e}; loss curves of fold_conv and "
                 f"branches differ by at most {result['fold_conv_vs_branches_max_loss_diff']:.1e}; measured on "
                 f"{result['machine']['device']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--test", type=int, default=24)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="5 steps on 4 small crops (a smoke run)")
    parser.add_argument("--out", type=arguments.output_file,
                        help=f"write the JSON here (default: {DEFAULT_OUT.name} in experiments/results, which "
                             "rewrites README's table too; a --tiny run writes only where --out says)")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.size, args.train, args.test = 5, 12, 3, 3
    out = args.out or (None if args.tiny else DEFAULT_OUT)
    result = run(args)
    print(table(result))
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if out == DEFAULT_OUT and not args.tiny:  # README shows the full run's numbers only
        replace_block("repvgg_reparam", table(result))


if __name__ == "__main__":
    main()
