"""Every Python block of the README runs as shown (a newcomer copies them)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_generated_readme_block_is_filled():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- ([\w:]+) -->\n(.*?)<!-- /\1 -->", text, re.S)
    assert len(blocks) >= 10
    empty = [name for name, body in blocks if not body.strip()]
    assert not empty, f"README blocks with nothing in them: {empty}"
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text):
        assert (ROOT / picture).is_file(), picture


def test_a_script_that_rewrites_a_readme_block_says_so(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from readme_block import replace_block
    finally:
        sys.path.pop(0)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table -->\nold\n<!-- /table -->\nrest\n")
    assert replace_block("table", "new rows\n", readme)
    assert readme.read_text() == "intro\n<!-- table -->\nnew rows\n<!-- /table -->\nrest\n"
    assert f"rewrote the <!-- table --> block of {readme}" in capsys.readouterr().out
    assert not replace_block("missing", "x", readme)
    assert "has no <!-- missing --> block; not updated" in capsys.readouterr().out


def test_the_readme_families_table_lists_each_familys_parameters_and_defaults():
    """Its rows name every parameter of every family in order, with the default where the
    signature has one (computed defaults, None there, are written as formulas of the size)."""
    import inspect

    from jfactor import kernels

    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", (ROOT / "README.md").read_text(), re.M))
    for name, function in kernels.FAMILIES.items():
        written = [item.split("=") for item in rows[name].split(", ")]
        parameters = [p for p in inspect.signature(function).parameters.values() if p.name != "size"]
        assert [key for key, _ in written] == [p.name for p in parameters], name
        for (key, value), p in zip(written, parameters):
            assert p.default is None and "size" in value or value == repr(p.default), (name, key, value)
