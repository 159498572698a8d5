"""Fold every stack of the seed document and show its exact dilated-chain form.

    python experiments/seed_reproduction.py [--print-only] [--json PATH]

Prints a markdown table: for each configs/seed/*.yaml, the folded kernel size and stride,
the seed's own (approximate) claim, the exact canonical chain, and the measured max abs
difference (float64 probe) of the stack vs the folded conv and of the chain vs the fold.
Unless ``--print-only``, it also writes experiments/results/seed_reproduction.json and .png
(every folded kernel) and replaces README.md's ``<!-- seed_reproduction -->`` block.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import jfactor as jf  # noqa: E402
from jfactor.stack_config import load_stack  # noqa: E402
import devices  # noqa: E402
from readme_block import replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
SEED_CLAIMS = {
    "section1_correlate": "C1 = correlate2d(B1, A1)",
    "section2_two_3x3": "two 3x3 = one 5x5",
    "section3_one_5x5": "5x5 -> two 3x3 only approximately (Wiener)",
    "section4_avgpool": "AvgPool2 = Conv2x2/s2 of 1/4",
    "section5_conv_pool_conv": "Conv8x8/s2",
    "section6_two_pools": "Conv18x18/s4 ~ 3 -> 5 -> 9 + AvgPool4 (approx.)",
    "section7_strides": "2 -> 3 -> 9 + Conv4/s4 (approx.)",
    "section8_avgpool": "3 -> 5 -> 9 -> 17 -> 33 = 63x63 + AvgPool16 (approx.); Conv78/s16",
    "section8_strides": "2 -> 3 -> 5 -> 9 -> 33 + Conv16/s16 (approx.)",
    "section8_strides_4x4": "4x4/s2 reproduces 3 -> 5 -> 9 -> 17 -> 33",
    "section8_strides_2x2_last": "2 -> 3 -> 5 -> 9 -> 17",
}


def folds() -> dict[str, jf.Folded]:
    """Every seed config's fold, by config name."""
    return {path.stem: jf.fold(load_stack(path)) for path in sorted((ROOT / "configs" / "seed").glob("*.yaml"))}


def rows(folded_by_name: dict) -> list[dict]:
    out = []
    for name, folded in folded_by_name.items():
        out.append({
            "config": name,
            "folded": f"{'x'.join(map(str, folded.receptive_field))} / s{folded.stride[0]}",
            "seed_claim": SEED_CLAIMS.get(name, ""),
            "canonical": folded.canonical.describe(),
            "stack_vs_fold": folded.certificate.max_abs_diff,
            "chain_vs_fold": folded.canonical.max_abs_diff,
        })
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| seed stack | folded | seed's claim | exact dilated chain | stack vs fold | chain vs fold |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['config']} | {r['folded']} | {r['seed_claim']} | {r['canonical']} | "
                     f"{r['stack_vs_fold']:.1e} | {r['chain_vs_fold']:.1e} |")
    return "\n".join(lines)


def figure(folded_by_name: dict):
    """One panel per seed stack: its folded kernel (first input and output channel)."""
    cols = 4
    rows_ = -(-len(folded_by_name) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 3.2 * rows_), squeeze=False, layout="constrained")
    for ax, (name, folded) in zip(axes.ravel(), folded_by_name.items()):
        kernel = np.asarray(folded.conv.kernel)[..., 0, 0]
        image = ax.imshow(kernel, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name}\n{'x'.join(map(str, kernel.shape))}, stride {folded.stride[0]}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8)
    for ax in axes.ravel()[len(folded_by_name):]:
        ax.axis("off")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows as JSON here (default with writing: "
                        "experiments/results/seed_reproduction.json)")
    parser.add_argument("--print-only", action="store_true", help="print the table; write no figure or README")
    args = parser.parse_args()
    folded_by_name = folds()
    table = rows(folded_by_name)
    device = devices.describe()
    text = f"{markdown(table)}\n\nFolded and compared in float64 on {device}."
    print(text)
    json_path = args.json or (None if args.print_only else RESULTS / "seed_reproduction.json")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"device": device, "rows": table}, indent=2) + "\n")
    if args.print_only:
        return
    fig = figure(folded_by_name)
    fig.savefig(RESULTS / "seed_reproduction.png", dpi=100)
    plt.close(fig)
    picture = "![the seed's stacks, folded](experiments/results/seed_reproduction.png)"
    replace_block("seed_reproduction", f"{text}\n\n{picture}\n")


if __name__ == "__main__":
    main()
