"""Pictures and markdown for factorizations and sweeps (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jfactor.factorize import Factorization, multistart  # noqa: E402
from jfactor.rundir import write_with  # noqa: E402


def _save(fig, path: Path) -> Path:
    write_with(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


def _plane(kernel: np.ndarray) -> np.ndarray:
    """A 2-D view of (*k, C_in, C_out): channel (0, 0); the middle slice of 3-D kernels."""
    k = kernel[..., 0, 0]
    while k.ndim > 2:
        k = k[k.shape[0] // 2]
    return k


def _title(ax, text: str) -> None:
    ax.set_title(textwrap.fill(text, 38), fontsize=8)


def _show(ax, image, title, symmetric=True):
    if image.ndim == 1:
        ax.plot(image, marker=".")
        _title(ax, title)
        return
    vmax = np.abs(image).max() or 1.0
    im = ax.imshow(image, cmap="RdBu_r" if symmetric else "magma", vmin=-vmax if symmetric else 0, vmax=vmax)
    _title(ax, title)
    ax.set_xticks([])
    ax.set_yticks([])
    plt.colorbar(im, ax=ax, fraction=0.046)


def plot_kernels(result: Factorization, path) -> Path:
    """Target, approximation and residual side by side (channel 0 -> 0)."""
    target, approx = _plane(result.target_padded), _plane(result.approx)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), layout="constrained")
    _show(axes[0], target, f"target {result.target.name}")
    _show(axes[1], approx, f"chain {result.chain.describe()}")
    _show(axes[2], approx - target, f"residual (rel. error {result.rel_error:.2e})")
    return _save(fig, path)


def _spectrum(kernel: np.ndarray, pad: int = 8) -> np.ndarray:
    k = _plane(kernel)
    size = [pad * n for n in k.shape]
    return np.fft.fftshift(np.abs(np.fft.fftn(k, s=size, axes=tuple(range(k.ndim)))))


def plot_spectra(result: Factorization, path) -> Path:
    """|frequency response| of target, approximation and their difference (8x zero-padded)."""
    target, approx = _spectrum(result.target_padded), _spectrum(result.approx)
    error = _spectrum(result.approx - result.target_padded)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), layout="constrained")
    if target.ndim == 1:
        freq = np.fft.fftshift(np.fft.fftfreq(target.size))
        for ax, data, title in zip(axes, (target, approx, error), ("|T(w)|", "|chain(w)|", "|error(w)|")):
            ax.plot(freq, data)
            _title(ax, title)
    else:
        for ax, data, title in zip(axes, (target, approx, error), ("|T(w)|", "|chain(w)|", "|error(w)|")):
            _show(ax, data, title, symmetric=False)
    fig.suptitle(f"worst-case response error {result.metrics['spectral_error']:.2e} of max |T(w)|")
    return _save(fig, path)


def plot_loss(result: Factorization, path) -> Path:
    """Relative error per step of every restart; the kept one in colour."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    curves = np.sqrt(np.maximum(2 * result.history, 1e-32))
    for r, curve in enumerate(curves):
        if r != result.history_row:
            ax.semilogy(curve, color="0.75", lw=0.8)
    ax.semilogy(curves[result.history_row], color="C3", lw=1.6, label=f"best restart ({result.best})")
    steps = result.settings["solver"]["steps"] if result.settings["solver"]["optimizer"] != "none" else 0
    if 0 < steps < curves.shape[-1]:
        ax.axvline(steps, color="k", ls=":", lw=0.8)
        ax.text(steps, ax.get_ylim()[1], " LM", va="top")
    ax.set_xlabel("step (first-order, then Levenberg-Marquardt iterations)")
    ax.set_ylabel("relative error")
    ax.legend()
    return _save(fig, path)


def found_minima(result: Factorization) -> tuple[np.ndarray, np.ndarray]:
    """The distinct minima the refined restarts reached, best first, grouped as the evidence
    groups them (:func:`jfactor.factorize.multistart.refined_minima`): each one's relative error (M,)
    and how many restarts reached it (M,)."""
    errors = result.restart_errors
    groups = multistart.refined_minima(errors, result.pruned, result.settings["dtype"])
    return np.array([errors[g[0]] for g in groups], float), np.array([g.size for g in groups], int)


def plot_search(result: Factorization, path) -> Path:
    """How sure the best is: every refined restart's error in the order they ran, the best so
    far and the waves (left); each distinct minimum against the restarts that reached it (right)."""
    found = result.evidence
    errors = np.maximum(result.restart_errors, 1e-17)
    refined = multistart.refined(result.restart_errors, result.pruned)
    order = np.arange(1, errors.size + 1)
    fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    ax.semilogy(order[refined], errors[refined], ".", color="0.6", ms=4, label="refined restart")
    ax.semilogy(order, np.minimum.accumulate(np.where(refined, errors, np.inf)), color="C3", lw=1.6,
                drawstyle="steps-post", label="best so far")
    for wave in range(1, found["waves"]):
        ax.axvline(wave * errors.size / found["waves"] + 0.5, color="k", ls=":", lw=0.6)
    ax.set_xlabel(f"restart ({found['waves']} wave(s), dotted)")
    ax.set_ylabel("relative error")
    _title(ax, f"{found['restarts']} restarts, {found['refined']} refined; stopped: {found['stopped']}")
    ax.legend(fontsize=8)
    minima, hits = found_minima(result)
    ratio = minima / max(minima[0], 1e-17) if minima.size else minima
    right.vlines(ratio, 0, hits, color="0.5")
    right.plot(ratio[1:], hits[1:], "o", color="0.5", ms=4)
    if minima.size:
        right.plot(ratio[0], hits[0], "o", color="C3", label=f"best: relative error {minima[0]:.4g}")
        right.legend(fontsize=8)
    right.set_xscale("log" if ratio.size and ratio.max() > 10 else "linear")
    right.set_xlabel("the minimum's error / the best's")
    right.set_ylabel("restarts that reached it")
    _title(right, f"{found['distinct_minima']} distinct minima; the best reached by {found['best_hits']} "
                  f"({found['independent_hits']} from independent starts)"
           + (f". {found['warning']}" if found.get("warning") else ""))
    return _save(fig, path)


def factorization_plots(result: Factorization, directory, stem: str = "") -> list[Path]:
    directory = Path(directory)
    prefix = f"{stem}_" if stem else ""
    return [plot_kernels(result, directory / f"{prefix}kernels.png"),
            plot_spectra(result, directory / f"{prefix}spectrum.png"),
            plot_loss(result, directory / f"{prefix}loss.png"),
            plot_search(result, directory / f"{prefix}search.png")]


def _cost_axis(ax, macs: list) -> None:
    """Multiply-adds on x: a log axis where they span a decade or more, else a linear one (a log
    axis of less than a decade labels its minor ticks, on top of one another)."""
    ax.set_xscale("log" if macs and max(macs) >= 10 * min(macs) else "linear")


def _error_axis(ax, errors) -> None:
    """Errors on a log y axis at least a decade tall around them: errors equal to rounding left
    matplotlib's log axis a range of zero height, with no tick, no point and a broken layout."""
    low, high = float(np.min(errors)), float(np.max(errors))
    if high < 10 * low:
        ax.set_ylim(low / 10 ** 0.5, high * 10 ** 0.5)


def plot_error_vs_cost(rows: list[dict], path, *, label_key: str = "chain", title: str = "") -> Path:
    """Relative error (log) against multiply-adds per output (:func:`_cost_axis`), one point per row."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    middle = np.sqrt(min(row["macs"] for row in rows) * max(row["macs"] for row in rows)) if rows else 0
    errors = [max(row["rel_error"], 1e-17) for row in rows]  # exact ones drawn at the axis's floor
    for i, (row, error) in enumerate(zip(rows, errors)):
        ax.semilogy(row["macs"], error, "o", color=f"C{i % 10}")
        right_half = row["macs"] > middle  # labels point inwards, so they stay inside the axes
        label = ax.annotate(textwrap.fill(str(row.get(label_key, i)), 36), (row["macs"], error), fontsize=7,
                            xytext=(-4 if right_half else 4, 4), textcoords="offset points",
                            ha="right" if right_half else "left")
        label.set_in_layout(False)
    _cost_axis(ax, [row["macs"] for row in rows])
    ax.margins(x=0.1, y=0.15)
    if rows:
        _error_axis(ax, errors)
    ax.set_xlabel("multiply-adds per output")
    ax.set_ylabel("relative error")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_sweep(rows: list[dict], keys: list[str], path) -> Path:
    """Summary of a sweep: error vs MACs, and error against each swept key."""
    panels = 1 + len(keys)
    cols = min(panels, 3)
    fig, axes = plt.subplots(math.ceil(panels / cols), cols, figsize=(5 * cols, 3.8 * math.ceil(panels / cols)),
                             squeeze=False, layout="constrained")
    axes = axes.ravel()
    errors = np.array([max(r["rel_error"], 1e-17) for r in rows])
    axes[0].semilogy([r["macs"] for r in rows], errors, "o")
    _cost_axis(axes[0], [r["macs"] for r in rows])
    for ax in axes[:panels]:
        _error_axis(ax, errors)
    axes[0].set_xlabel("multiply-adds per output")
    axes[0].set_ylabel("relative error")
    axes[0].set_title("error vs cost")
    for ax, key in zip(axes[1:], keys):
        labels = [str(r[key]) for r in rows]
        order = list(dict.fromkeys(labels))
        for i, label in enumerate(order):
            values = errors[[j for j, x in enumerate(labels) if x == label]]
            ax.semilogy(np.full(values.size, i), values, "o", alpha=0.7)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"error by {key}")
    for ax in axes[panels:]:
        ax.axis("off")
    return _save(fig, path)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
