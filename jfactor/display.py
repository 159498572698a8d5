"""Terminal summaries (rich tables) of folds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from jfactor.analysis import exact_nowhere
from jfactor.fold import Folded, certified


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _count(n: int) -> str:
    return f"{n:,}"


def fold_summary(folded: Folded, console: Console, title: str = "stack") -> None:
    """Print the layer table, the folded conv, its canonical form, costs and certificate."""
    table = Table(title=f"{title}: {_shape(folded.input_shape)} -> {_shape(folded.output_shape)}")
    for column in ("#", "layer", "settings", "in", "out", "params", "MACs"):
        table.add_column(column, justify="right" if column in ("#", "params", "MACs") else "left")
    for row in folded.layers:
        table.add_row(str(row["index"]), row["kind"], row["description"], _shape(row["in_shape"]),
                      _shape(row["out_shape"]), _count(row["params"]), _count(row["macs"]))
    console.print(table)

    conv, cert = folded.conv, folded.certificate
    padding = ", ".join(f"({lo},{hi})" for lo, hi in conv.padding)
    console.print(
        f"[bold]folded[/bold]: one conv {_shape(conv.size)}, {conv.in_channels}->{conv.out_channels} channels, "
        f"stride {_shape(conv.strides)}, padding {padding}, groups {conv.groups}"
        + (", bias" if conv.bias is not None else "")
    )
    console.print(f"receptive field {_shape(folded.receptive_field)}, effective stride {_shape(folded.stride)}, "
                  f"offset {tuple(folded.offset)}")
    console.print(f"canonical form: {folded.canonical.describe()} "
                  f"(max abs diff to the folded conv {folded.canonical.max_abs_diff:.2e})")
    if folded.exact_region is None:
        console.print("exact on the whole output")
    elif exact_nowhere(folded.exact_region):
        console.print(f"[yellow]exact nowhere[/yellow]: zero padding between layers reaches every output position "
                      f"(measured max abs diff {cert.outside_max_abs_diff:.3g})")
    else:
        box = " x ".join(f"[{a}, {b})" for a, b in folded.exact_region)
        console.print(
            f"[yellow]exact only on output region {box}[/yellow]: zero padding between layers makes "
            f"the folded conv differ outside it (measured max abs diff there "
            f"{cert.outside_max_abs_diff:.3g})"
        )

    costs = Table(title="cost per example")
    for column in ("form", "params", "MACs"):
        costs.add_column(column, justify="left" if column == "form" else "right")
    for form in ("stack", "folded", "canonical"):
        costs.add_row(form, _count(folded.params[form]), _count(folded.macs[form]))
    console.print(costs)
    console.print(
        f"certificate ({cert.dtype}, probe {_shape(cert.probe_shape)}, {cert.positions_checked:,} values): "
        f"{certified(cert.to_dict(), relative=True)}")


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e5) else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _chain_table(summary: dict, console: Console) -> None:
    target = summary["target"]
    console.print(
        f"[bold]{summary['chain']}[/bold] for target {target['name']} {tuple(target['shape'])}"
        f" (stride {tuple(target['stride'])}): {summary['objective']} objective, {summary['dtype']},"
        f" {summary['time_s']:.2f} s ({summary['compile_s']:.2f} s compiling)")
    table = Table()
    for column in ("method", "rel. error", "max abs", "PSNR dB", "spectral", "output PSNR dB", "time s", "note"):
        table.add_column(column, justify="left" if column in ("method", "note") else "right", no_wrap=column != "note")
    table.add_row("jfactor", _num(summary["rel_error"]), _num(summary["max_abs_error"]), _num(summary["psnr_db"]),
                  _num(summary["spectral_error"]), _num(summary["output_psnr_db"]), f"{summary['time_s']:.2f}", "")
    for name, entry in summary["baselines"].items():
        time_s = "-" if entry["time_s"] is None else f"{entry['time_s']:.2f}"
        table.add_row(name, _num(entry["rel_error"]), "", "", "", "", time_s, entry.get("note", ""))
    console.print(table)
    console.print(f"cost per output: chain {summary['params']:,} params, {summary['macs']:,} MACs; "
                  f"dense {summary['dense_params']:,} params, {summary['dense_macs']:,} MACs")
    console.print(evidence_line(summary))
    if summary["evidence"]["warning"]:
        console.print(f"[bold yellow]warning[/bold yellow]: {summary['evidence']['warning']}")


def evidence_line(summary: dict) -> str:
    """One line: restarts, distinct minima, hits of the best, runner-up, why the search stopped."""
    e = summary["evidence"]
    runner = "none" if e["runner_up"] is None else f"{e['runner_up']:.4g}"
    if e["runner_up"] is not None and summary.get("objective", "kernel") != "kernel":
        runner += f" ({summary['objective']}'s own error)"  # the evidence's units (README, "How sure")
    return (f"search: {e['restarts']} restarts in {e['waves']} wave(s) ({summary['diverged']} diverged), "
            f"{e['refined']} run to convergence, {e['distinct_minima']} distinct minima; the best reached by "
            f"{e['best_hits']} ({e['independent_hits']} from independent starts), runner-up {runner}; stopped: "
            f"{e['stopped']}")


def factorization_summary(result, console: Console) -> None:
    """The factorization's error next to its baselines, and the costs."""
    _chain_table(result.to_dict(), console)


def run_summary(payload: dict, console: Console) -> None:
    """What `jfactor run` prints: the fold (if any), then one table per chain."""
    for entry in payload["results"]:
        if "fold" in entry:
            fold = entry["fold"]
            console.print(f"[bold]fold[/bold]: {'x'.join(map(str, fold['kernel_shape'][:-2]))} stride "
                          f"{tuple(fold['stride'])}, canonical {fold['canonical']['description']}, certificate "
                          f"{certified(fold['certificate'])}")
        else:
            _chain_table(entry, console)
