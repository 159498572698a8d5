#!/usr/bin/env bash
# One check of the accelerator paths on the machine it runs on; every JSON goes to OUTDIR.
#
#   experiments/device_check.sh OUTDIR
#
# Runs these steps in order; their output goes to OUTDIR/device_check.log, their exit status
# and seconds to OUTDIR/device_check.json (six files in all, none deeper than OUTDIR/<device>/):
#   tests  the tests that exercise the device: tests/test_batch.py, tests/test_factorize.py
#          (pytest, hypothesis at 6 examples; JUnit XML in OUTDIR/tests.xml)
#   fold   experiments/bench_fold.py, method auto at N = 1k, 10k, 100k (-> OUTDIR/<device>/bench_fold.json)
#   fold_methods  the same with chain, fft and shift at N = 100k (-> bench_fold_methods.json)
#   factorize  experiments/bench_factorize.py parts B and D, 1,024 targets
#          (-> OUTDIR/<device>/bench_factorize.json)
# At most 6 minutes (each step is cut at its budget: 110 s, 75 s, 55 s, 110 s).
#
# Needs only python3 with jax (CUDA), flax, optax, numpy, scipy, scikit-image, matplotlib,
# typer, rich, PyYAML, pytest and hypothesis, and pydantic, flatbuffers (jax.export's
# serialization) and threadpoolctl, which a stock CUDA image may lack and no registry can bring there: carry
# their wheels (and pydantic's four dependencies') in .whl/ at
# the repository root (git ignores it). Fetch them where a registry is reachable, for
# Python 3.12 on x86-64 Linux:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing-extensions==4.16.0 flatbuffers==25.12.19 threadpoolctl==3.6.0
#
# The project is used from the checkout (PYTHONPATH), not installed: constraints.txt pins
# jax 0.10.2 for Python 3.11 on the CPU, and the device's Python and jax are newer.
set -uo pipefail

out=${1:?usage: experiments/device_check.sh OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"

missing() {  # the modules among "$@" that "$py" cannot import
  "$py" - "$@" <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}
if [ -n "$(missing pydantic flatbuffers threadpoolctl)" ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jfactor-site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/jfactor-site${PYTHONPATH:+:$PYTHONPATH}"
fi
gone=$(missing jax flax optax numpy scipy skimage matplotlib typer rich yaml pytest hypothesis pydantic flatbuffers \
  threadpoolctl)
if [ -n "$gone" ]; then
  echo "device_check: $py cannot import: $gone. pydantic's, flatbuffers' and threadpoolctl's wheels travel in .whl/ (the command that fetches" \
       "them is at the top of experiments/device_check.sh); the rest must be installed there." >&2
  exit 2
fi
export PYTHONPATH="$root:$root/experiments${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JFACTOR_BATCH_EXAMPLES=6

log="$out/device_check.log"
"$py" -c "import jax; print('device_check on', jax.devices())" | tee "$log"

if [ -n "${JFACTOR_DEVICE_CHECK_TINY:-}" ]; then  # the script's own smoke run (tests/test_device_check.py)
  select=(-k "dft_matrix or plan_costs"); ns=8,16; n_big=16; tiny=(--tiny); n_factorize=8
else
  select=(); ns=1000,10000,100000; n_big=100000; tiny=(); n_factorize=1024
fi

summary="" failed=0
step() {  # step NAME LIMIT_S COMMAND...: run it, log it, keep its exit status and seconds
  local name=$1 limit=$2 start=$SECONDS code
  shift 2
  echo "== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 25
  code=${PIPESTATUS[0]}
  summary+="$name $code $((SECONDS - start))"$'\n'
  [ "$code" -eq 0 ] || failed=1
  echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$log"
}

# -o addopts: pyproject's --dist loadfile needs pytest-xdist, which such a machine lacks
step tests 110 "$py" -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_batch.py tests/test_factorize.py \
  --junitxml="$out/tests.xml" "${select[@]}"
step fold 75 "$py" experiments/bench_fold.py --sweep "$ns" --baseline-n 50 --out-dir "$out" "${tiny[@]}"
step fold_methods 55 "$py" experiments/bench_fold.py --sweep "$n_big" --methods chain,fft,shift --baseline-n 50 \
  --out-dir "$out" --name bench_fold_methods.json "${tiny[@]}"
step factorize 110 "$py" experiments/bench_factorize.py --parts B,D --n "$n_factorize" --single-n 8 \
  --out-dir "$out" "${tiny[@]}"

"$py" - "$out" "$summary" <<'PY'
import json, sys
from pathlib import Path
import devices
steps = {name: {"exit": int(code), "seconds": int(seconds)}
         for name, code, seconds in (line.split() for line in sys.argv[2].splitlines())}
Path(sys.argv[1], "device_check.json").write_text(
    json.dumps({"device": devices.describe(), "device_slug": devices.slug(), "steps": steps}, indent=2) + "\n")
print(json.dumps(steps))
PY
exit "$failed"
