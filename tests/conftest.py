"""Make ``src/`` importable when curvkit is not installed (``pytest`` run from a bare checkout)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if importlib.util.find_spec("curvkit") is None and _SRC.is_dir():
    sys.path.insert(0, str(_SRC))
