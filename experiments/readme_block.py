"""Replace a generated block of README.md: the text between ``<!-- NAME -->`` and ``<!-- /NAME -->``."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(name: str, body: str, readme: Path = README) -> bool:
    """Put ``body`` between the markers of block ``name`` and say so; False (and a message) if README has none."""
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        print(f"{readme.name} has no <!-- {name} --> block; not updated")
        return False
    readme.write_text(pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text))
    print(f"rewrote the <!-- {name} --> block of {readme}")
    return True
