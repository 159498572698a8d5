"""The ``jfactor`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from jfactor.errors import JFactorError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fold linear convolution stacks exactly; factorize large kernels into small ones.")
console = Console()


@app.callback()
def _group() -> None:
    """Fold linear convolution stacks exactly; factorize large kernels into small ones."""


def _fail(exc: Exception) -> None:
    print(f"error: {exc}", file=sys.stderr)
    raise typer.Exit(code=2)


@app.command()
def fold(
    config: Annotated[Path, typer.Argument(help="stack config (YAML), or Keras lines (.txt/.py)")],
    out: Annotated[Path | None, typer.Option(help="output directory (default: a new one under runs/)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON summary only")] = False,
) -> None:
    """Fold a stack into one convolution; write kernel.npy, bias.npy and summary.json."""
    from jfactor import rundir
    from jfactor.display import fold_summary
    from jfactor.fold import fold as fold_stack
    from jfactor.keras import load_any as load_stack

    try:
        stack = load_stack(config)
        out_dir = rundir.writable_dir(out) if out else rundir.new_run_dir("runs", f"fold-{config.stem}")
        folded = fold_stack(stack)
    except JFactorError as exc:
        _fail(exc)
    summary = {"config": str(config), **folded.to_dict()}
    rundir.write_npy(out_dir / "kernel.npy", folded.conv.kernel)
    bias = folded.conv.bias if folded.conv.bias is not None else folded.affine.bias
    rundir.write_npy(out_dir / "bias.npy", bias)
    rundir.write_json(out_dir / "summary.json", summary)
    if as_json:
        print(json.dumps(summary, indent=2, default=rundir._json_default))
        return
    fold_summary(folded, console, title=config.stem)
    console.print(f"wrote {out_dir}/kernel.npy, bias.npy, summary.json")
    print(out_dir)
