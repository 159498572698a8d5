"""Regression for DESIGN.md section 5: a stride-1 scatter then a reverse aborts XLA under jit.

The abort kills the process, so each check runs in a subprocess: a crash fails the test
instead of the test run.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "jfactor"

FOLD_UNDER_JIT = """
import jax, jax.numpy as jnp, numpy as np
import jfactor as jf
from jfactor.ops import dilate, full_conv
k = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 1, 1)))
# the pattern of the trap, done the safe way: dilation 1 (a no-op) then a reverse, under jit
print(jax.jit(lambda k: dilate(k, (1, 1))[::-1, ::-1])(k).shape)
print(jax.jit(lambda a, b: full_conv(a, b, (1, 1))[::-1, ::-1])(k, k).shape)
stack = jf.Stack([jf.Conv(k), jf.Conv(k, dilation=1), jf.AvgPool(1), jf.Conv(k)], (12, 12, 1))
print(jf.fold(stack).conv.kernel.shape)
"""


def test_fold_paths_with_unit_stride_and_dilation_do_not_abort():
    result = subprocess.run([sys.executable, "-c", FOLD_UNDER_JIT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(7, 7, 1, 1)" in result.stdout


def test_package_never_scatters_into_zeros():
    """No ``.at[...].set`` anywhere in the package: dilation uses lax.pad interior padding.
    (numpy's ``ufunc.at(...)`` on the host is a call, not an index, and is not the trap.)"""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "at":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
