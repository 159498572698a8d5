"""Speed of original vs folded ONNX models under onnxruntime, per linear segment and whole.

    python experiments/onnx_speed.py --out experiments/results/onnx_speed.json     # RepVGG-style example
    python experiments/onnx_speed.py --model resnet50 --batch 1                    # an onnx light model
    python experiments/onnx_speed.py --tiny --json                                 # smoke run (seconds)

Models are built here, never downloaded: ``repvgg`` is :func:`jfactor.interop.onnx_examples.repvgg`
(onnx.helper, random weights); the others are the light models shipped in the onnx wheel,
with random weights.  Each folded segment is cut out of both models with
``onnx.utils.Extractor`` (its source tensor in, its sink tensor out) and both pieces are
timed on one random batch: best of ``--repeats`` warm runs, onnxruntime CPU, threads as
``--threads``.  MACs are jfactor's counts for one example.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from jfactor.interop.onnx import compare_outputs, fold_model, with_random_weights
from jfactor.interop.onnx_examples import repvgg
import arguments
import devices

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def best_ms(model: onnx.ModelProto, x: np.ndarray, repeats: int, threads: int) -> float:
    session = _session(model, threads)
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def _input(model: onnx.ModelProto, batch: int, rng) -> np.ndarray:
    initializers = {t.name for t in model.graph.initializer}
    info = next(i for i in model.graph.input if i.name not in initializers)
    dims = [d.dim_value if d.HasField("dim_value") else batch for d in info.type.tensor_type.shape.dim]
    return rng.standard_normal(dims).astype(np.float32)


def measure(model: onnx.ModelProto, *, batch: int, repeats: int, threads: int, seed: int = 0) -> dict:
    folded, reports = fold_model(model)
    rng = np.random.default_rng(seed)
    original_cut, folded_cut = (onnx.utils.Extractor(onnx.shape_inference.infer_shapes(m)) for m in (model, folded))
    rows = []
    for i, report in enumerate(reports):
        if not report.folded:
            continue
        before = original_cut.extract_model([report.source], [report.sink])
        after = folded_cut.extract_model([report.source], [report.sink])
        x = _input(before, batch, rng)
        rows.append({
            "segment": i, "ops": list(report.ops), "input_shape": report.input_shape,
            "output_shape": report.output_shape, "kernel": report.kernel, "stride": report.stride,
            "macs_before": report.macs["stack"], "macs_after": report.macs["folded"],
            "ms_before": best_ms(before, x, repeats, threads), "ms_after": best_ms(after, x, repeats, threads),
        })
    x = _input(model, batch, rng)
    whole = {"ms_before": best_ms(model, x, repeats, threads), "ms_after": best_ms(folded, x, repeats, threads),
             "check": compare_outputs(model, folded, batch=batch, strict=True)}
    kept = [{"segment": i, "ops": list(r.ops), "reason": r.reason} for i, r in enumerate(reports)
            if not r.folded and len(r.ops) > 1]
    return {"segments": rows, "kept": kept, "whole": whole}


def table(name: str, result: dict) -> str:
    lines = [(f"{name}: folded segments, onnxruntime ms per batch (best of {result['repeats']}, batch "
             f"{result['batch']}, {result['threads']} thread(s), {result['machine']})"), "",
             "| segment | layers | in -> out | one conv | MACs before -> after | ms before | ms after | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    def shape(dims):
        return "x".join(map(str, dims))

    for r in result["segments"]:
        lines.append(f"| {r['segment']} | {' '.join(r['ops'])} | {shape(r['input_shape'])} -> "
                     f"{shape(r['output_shape'])} | {shape(r['kernel'][:-2])} s{r['stride'][0]} | "
                     f"{r['macs_before']:,} -> {r['macs_after']:,} | {r['ms_before']:.3f} | {r['ms_after']:.3f} | "
                     f"{r['ms_before'] / r['ms_after']:.2f}x |")
    w = result["whole"]
    lines.append(f"| whole model | | | | | {w['ms_before']:.3f} | {w['ms_after']:.3f} | "
                 f"{w['ms_before'] / w['ms_after']:.2f}x |")
    for k in result["kept"]:
        lines.append(f"\nsegment {k['segment']} ({' '.join(k['ops'])}): {k['reason']}")
    lines.append(f"\nfolded vs original (onnxruntime): max abs diff {w['check']['max_abs_diff']:.1e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="repvgg", help="repvgg, or a light model name (resnet50, ...)")
    parser.add_argument("--size", type=int, default=64, help="repvgg: input size")
    parser.add_argument("--channels", type=int, default=32, help="repvgg: channels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="smoke run: 16x16 input, 4 channels, 2 repeats")
    parser.add_argument("--out", type=arguments.output_file, help="write the JSON here")
    parser.add_argument("--json", action="store_true", help="print the JSON only")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.channels, args.batch, args.repeats = 16, 4, 2, 2
    if args.model == "repvgg":
        model = repvgg(channels=args.channels, size=args.size)
    else:
        model = with_random_weights(onnx.load(str(LIGHT / f"light_{args.model}.onnx")))
    result = {"model": args.model, "size": args.size, "channels": args.channels, "batch": args.batch,
              "repeats": args.repeats, "threads": args.threads, "onnxruntime": ort.__version__,
              "machine": devices.describe(),
              **measure(model, batch=args.batch, repeats=args.repeats, threads=args.threads)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1) if args.json else table(args.model, result))


if __name__ == "__main__":
    main()
