"""Third-party references for the engine: onnx's own node test cases and light model graphs.

    python experiments/onnx_references.py --out experiments/results/onnx_references.json   # all (minutes)
    python experiments/onnx_references.py --models squeezenet --json                       # smoke run

1. Node cases (``onnx.backend.test.case.node``): every case whose graph is one Conv,
   AveragePool, BatchNormalization, Pad, Add, Sum, Mul, Concat, Identity or Dropout node.
   Inputs after the first are bound as constants (the cases feed ``W`` and BatchNorm's
   statistics as inputs); the case is read with ``jfactor.from_onnx``, applied by
   jfactor's stack (float64, channels-last) and compared with the expected outputs shipped
   with onnx.  A case jfactor does not read as one linear map (count_include_pad=0 with
   pads, ceil_mode, reflect padding, training mode, a full-tensor constant) is listed with
   the reason.
2. Light models (``onnx/backend/test/data/light``): weights drawn at random
   (``with_random_weights``: the files make theirs with ConstantOfShape), every linear
   segment folded (``fold_model``), original and folded run by onnxruntime on one random
   input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx.backend.test.case.node import collect_testcases

import jfactor as jf
from jfactor.errors import JFactorError
from jfactor.interop.onnx import compare_outputs, fold_model, with_constant_inputs, with_random_weights
import arguments
import devices

OPS = {"Conv", "AveragePool", "BatchNormalization", "Pad", "Add", "Sum", "Mul", "Concat", "Identity", "Dropout"}
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = ["squeezenet", "bvlc_alexnet", "zfnet512", "vgg19", "inception_v1", "resnet50", "shufflenet",
          "inception_v2", "densenet121"]


def node_case(case) -> dict:
    """One node test case: read, applied by jfactor, compared with onnx's expected output."""
    graph = case.model.graph
    row = {"case": case.name, "op": graph.node[0].op_type}
    inputs, expected = case.data_sets[0]
    names = [i.name for i in graph.input]
    bound = with_constant_inputs(case.model, dict(zip(names[1:], inputs[1:])))
    try:
        stack = jf.from_onnx(bound)
    except JFactorError as exc:
        return {**row, "applicable": False, "reason": str(exc)}
    x = np.moveaxis(np.asarray(inputs[0], np.float64), 1, -1)
    got = np.moveaxis(np.asarray(stack(x)), -1, 1)
    want = np.asarray(expected[0], np.float64)
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    tolerance = 1e-5 * max(1.0, float(np.abs(want).max()))
    return {**row, "applicable": True, "max_abs_diff": diff, "match": diff <= tolerance, "layers": len(stack.layers)}


def node_cases() -> list[dict]:
    cases = [c for c in collect_testcases(None) if c.kind == "node" and len(c.model.graph.node) == 1
             and c.model.graph.node[0].op_type in OPS]
    return [node_case(c) for c in cases]


def light_model(name: str, seed: int = 0) -> dict:
    """Fold one light model's linear segments; compare original and folded under onnxruntime."""
    model = with_random_weights(onnx.load(str(LIGHT / f"light_{name}.onnx")), seed=seed)
    start = time.perf_counter()
    folded, reports = fold_model(model)
    seconds = time.perf_counter() - start
    done = [r for r in reports if r.folded]
    kept = [r.reason for r in reports if not r.folded and not r.reason.startswith("one node")]
    return {
        "model": name, "nodes": len(model.graph.node), "segments": len(reports), "folded": len(done),
        "single_node_segments": sum(r.reason.startswith("one node") for r in reports), "kept": kept,
        "macs_before": sum(r.macs["stack"] for r in done), "macs_after": sum(r.macs["folded"] for r in done),
        "params_before": sum(r.params["stack"] for r in done), "params_after": sum(r.params["folded"] for r in done),
        "merged": sorted({"+".join(r.ops) for r in done}), "fold_seconds": round(seconds, 1),
        "onnxruntime": compare_outputs(model, folded, seed=seed, strict=True),
    }


def markdown(result: dict) -> str:
    nodes = result["node_cases"]
    used = [r for r in nodes if r["applicable"]]
    lines = [(f"onnx {result['versions']['onnx']} node cases: {len(used)} of {len(nodes)} read as linear stacks, "
             f"{sum(r['match'] for r in used)} match the expected outputs "
             f"(max abs diff {max((r['max_abs_diff'] for r in used), default=0):.1e}): "
             + ", ".join(f"`{r['case'].removeprefix('test_')}`" for r in used) + "."), "",
             ("| model | nodes | linear segments | folded | MACs before -> after (folded segments) | "
             "params before -> after | onnxruntime max abs diff |"), "|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        lines.append(f"| {m['model']} | {m['nodes']} | {m['segments']} | {m['folded']} | "
                     f"{m['macs_before']:,} -> {m['macs_after']:,} | {m['params_before']:,} -> {m['params_after']:,} | "
                     f"{m['onnxruntime']['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="light models, comma-separated")
    parser.add_argument("--out", type=arguments.output_file, help="write the JSON here")
    parser.add_argument("--json", action="store_true", help="print the JSON only")
    args = parser.parse_args()
    import onnxruntime

    result = {
        "machine": devices.describe(),
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "jfactor": jf.__version__},
        "node_cases": node_cases(),
        "models": [],
    }
    for name in [m for m in args.models.split(",") if m]:
        result["models"].append(light_model(name))
        print(f"{name}: {result['models'][-1]['folded']} segments folded", file=sys.stderr, flush=True)
        if args.out:  # after every model: a long run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    text = json.dumps(result, indent=1)
    print(text if args.json else markdown(result))


if __name__ == "__main__":
    main()
