"""Bad input to every command: a non-zero exit, one line naming the key, file or argument,
no traceback, no output directory left behind, nothing of an earlier run touched."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

GOOD_TARGET = {"family": "gaussian", "size": 5, "params": {"sigma": 1.0}}


def _files(tmp_path: Path) -> None:
    (tmp_path / "dir.npy").mkdir()
    np.save(tmp_path / "t.npy", np.ones((5, 5)))
    (tmp_path / "dup.yaml").write_text("name: a\nname: b\ntarget: {family: gaussian, size: 5}\n"
                                       "chain: {sizes: [3, 3]}\n")
    (tmp_path / "broken.yaml").write_text("name: [a\n")
    (tmp_path / "channels.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET,
                                                            "chain": {"sizes": [3, 3], "channels": -1}}))
    (tmp_path / "bias.yaml").write_text(yaml.safe_dump({"input_shape": [8, 8, 1], "layers": [
        {"conv": {"kernel_size": 3, "filters": 1, "use_bias": False, "bias": [1.0]}}]}))
    (tmp_path / "nosweep.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET, "chain": {"sizes": [3, 3]}}))
    (tmp_path / "dupstack.yaml").write_text("input_shape: [8, 8, 1]\ninput_shape: [9, 9, 1]\nlayers: []\n")
    (tmp_path / "randint.yaml").write_text(yaml.safe_dump({"input_shape": [8, 8, 1], "layers": [
        {"conv": {"kernel_size": 3, "filters": 1, "weights": {"init": "randint", "low": 3, "high": 1}}}]}))
    (tmp_path / "floatsizes.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET, "chain": {"sizes": [3, 2.5]}}))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe not text")
    (tmp_path / "frozeninit.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET, "chain": {
        "sizes": [3, 3], "frozen": [{"layer": 0, "weights": {"init": "ones"}}]}}))
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET, "chain": {"sizes": [3, 3]},
                                                         "sweep": {"grid": {"seed": [1, 2]}, "zip": {"seed": [3, 4]}}}))
    (tmp_path / "swept.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET, "chain": {"sizes": [3, 3]},
                                                         "sweep": {"grid": {"seed": [1, 2]}}}))
    (tmp_path / "bigpad.yaml").write_text(yaml.safe_dump({"input_shape": [28, 28, 1], "layers": [
        {"conv": {"kernel_size": 3, "filters": 1, "padding": 30000}}]}))
    (tmp_path / "text.npy").write_text("not an array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "frozentwice.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET, "chain": {
        "sizes": [3, 3], "frozen": [{"layer": 0, "weights": {"values": [[1.0]]}}] * 2}}))
    (tmp_path / "frozenall.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET, "chain": {
        "sizes": [3, 3], "frozen": [{"layer": i, "weights": {"values": np.eye(3).tolist()}} for i in (0, 1)]}}))
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump({"input_shape": [28, 28, 1], "layers": [
        {"conv": {"kernel_size": 3, "filters": 100000}}] * 2}))
    (tmp_path / "noimages.yaml").write_text(yaml.safe_dump({"target": GOOD_TARGET, "chain": {"sizes": [3, 3]},
                                                            "objective": {"name": "images", "images": []}}))


# (command line after `jfactor`, text the one line must contain); {d} is the test's directory
CASES = [
    ("fold {d}/missing.yaml", "missing.yaml"),
    ("fold {d}/bias.yaml", "use_bias"),
    ("fold {d}/dupstack.yaml", "input_shape' is written twice"),
    ("fold {d}/broken.yaml", "broken.yaml"),
    ("fold {d}/randint.yaml", "randint.yaml: layers[0].conv.weights: randint needs high > low"),
    ("factorize --target {d}/dir.npy --chain 3,3", "is a directory"),
    ("factorize --target {d}/missing.npy --chain 3,3", "missing.npy"),
    ("factorize --target {d}/t.npy --chain 3,x", "--chain"),
    ("factorize --target {d}/t.npy --chain 3", "covers 3x3"),
    ("factorize --family gaussian --size 5 --chain 3,3 --restarts 0", "restarts"),
    ("factorize {d}/channels.yaml", "chain.channels: Input should be greater than 0"),
    ("factorize --family gaussian --size 5 --chain 3,3 --set solver.steps=-2", "solver.steps"),
    ("run {d}/dup.yaml", "'name' is written twice"),
    ("run {d}/channels.yaml", "chain.channels"),
    ("sweep {d}/nosweep.yaml", "sweep"),
    ("sweep {d}/nosweep.yaml --num-processes 2", "--coordinator"),
    ("search --family gaussian --size 5 --budget -1", "--budget"),
    ("search --family gaussian --size 5 --slack -1", "--slack"),
    ("search --target {d}/dir.npy", "is a directory"),
    ("search --target {d}/t.npy --family gaussian --size 5", "give one target: --target T.npy or --family NAME"),
    ("search --family gaussian --size 5 --layers -1", "--layers: '-1': every entry must be a positive integer"),
    ("search --family gaussian --size 5 --widths 0", "--widths: '0': every entry must be a positive integer"),
    ("factorize --family gaussian --size 5 --chain 3,3 --dilations 1,0", "--dilations: '1,0': every entry must be"),
    ("factorize --family gaussian --size 5 --chain 3,3 --seed -1", "seed"),
    ("factorize --family gaussian --size 5 --param sigma --chain 3,3", "--param 'sigma'"),
    ("factorize --family log --size 1 --chain 3,3", "too small for the family"),
    ("factorize --family gaussian --size 5 --chain 100001", "past the memory budget"),
    ("--compile-cache {d}/t.npy factorize --family gaussian --size 5 --chain 3,3", "compile cache"),
    ("run {d}/floatsizes.yaml", "chain.sizes[1]"),
    ("run {d}/noimages.yaml", "objective.images"),
    ("fold {d}/huge.yaml", "layers[1].conv.weights: weights of shape (3, 3, 100000, 100000) needs about"),
    ("run {d}/frozenall.yaml", "frozenall.yaml: chains[0]: every layer of the chain is frozen"),
    ("factorize --family gaussian --size 100000 --chain 3,3", "size 100000 in 2 dimensions needs about"),
    ("factorize --family random_normal --size 7 --chain 3,5 --param seed=-1", "expected non-negative integer"),
    ("factorize --family randint --size 7 --chain 3,5 --param low=2 --param high=2", "low >= high"),
    ("factorize {d}/binary.yaml", "binary.yaml: not a text file"),
    ("run {d}/frozeninit.yaml", "chain.frozen[0]: a frozen layer's weights come from a file or values"),
    ("sweep {d}/twice.yaml", "seed: swept twice"),
    ("sweep {d}/swept.yaml --set seed=5", "swept.yaml: --set seed: the sweep sets seed in every cell"),
    ("fold {d}/bigpad.yaml", "layers[0]: the certificate's probe run"),
    ("factorize --family log --size 7 --chain 3,5 --set restarts=2 --set restarts=3", "--set restarts: given twice"),
    ("factorize --family log --size 7 --chain 3,5 --param sigma=1 --param sigma=2", "--param sigma: given twice"),
    ("factorize --family log --size 7 --chain 3,5 --baselines svd,svd", "baselines: svd given twice"),
    ("factorize {d}/frozentwice.yaml", "frozen layer 0 is given twice"),
    ("factorize --target {d}/text.npy --chain 3,3", "text.npy: not a .npy or .npz file"),
    ("factorize --target {d}/objects.npy --chain 3,3", "objects.npy: holds Python objects (pickled)"),
    ("factorize --family log --size 7 --chain 3,5 --restarts 2 --set restarts=4",
     "--set restarts and --restarts both set restarts"),
    ("factorize --family log --size 7 --chain 3,5 --param sigma=1 --set target.params.sigma=2",
     "--set target.params.sigma and --param both set target.params"),
    ("factorize --family log --size 7 --chain 3,5 --steps 5 --set solver=null", "--set solver and --steps"),
    ("factorize {d}/nosweep.yaml --restarts 4 --seed 1", "or with --set restarts=..., --set seed=..."),
    ("run {d}/nosweep.yaml --set restart=3", "nosweep.yaml with --set restart: (top level): unknown key 'restart'"),
    ("run {d}/nosweep.yaml --set chain.sizes.5=3", "nosweep.yaml: --set chain.sizes.5: the list has no item 5"),
    ("run {d}/nosweep.yaml --set target.size.x=1", "nosweep.yaml: --set target.size.x: target.size is not a mapping"),
    ("factorize --family log --size 7 --chain 3,5 --set restarts=", "--set restarts=: the value is empty"),
    ("factorize --family log --size 7 --chain 3,5 --set restarts=[1", "--set value '[1' is not YAML"),
    ("factorize --family log --size 7 --chain 3,5 --set solver.learning_rate=.inf", "solver.learning_rate"),
    ("factorize --family log --size 7 --chain 3,5 --restarts 4 --budget-s 1", "restarts and budget_s: give one"),
    ("factorize --family log --size 7 --chain 3,5 --optimizer none --refine none", "nothing would optimise the starts"),
]


@pytest.mark.parametrize("command,named", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, command, named):
    _files(tmp_path)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "result.json").write_text("{}")  # an earlier run's output, which must stay as it was
    args = command.format(d=tmp_path).split()
    out_flag = ["--out", str(tmp_path / "out")] if args[0] in ("fold", "factorize", "search") else []
    runs_flag = ["--runs-dir", str(tmp_path / "runs")] if args[0] in ("run", "sweep") else []
    result = subprocess.run([sys.executable, "-m", "jfactor", *args, *out_flag, *runs_flag], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert named in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    assert (earlier / "result.json").read_text() == "{}"
