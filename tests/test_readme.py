"""The README's quick-start code runs as printed (its assertion included)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quick_start = next(block for block in blocks if "mixprec.quantize" in block)
    exec(compile(quick_start, "README quick start", "exec"), {})  # noqa: S102
