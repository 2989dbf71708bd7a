"""docs/architecture.md lists the modules from the public API down and says a module never
imports one above it: checked here against the source, so the map stays true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _listed() -> list[str]:
    """Module names in the order of the architecture map (a folder line covers its files, in
    the order its description names them)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```", 2)[1]
    order: list[str] = []
    for line in block.splitlines():
        m = re.match(r"(curvkit/\S*)", line)
        if m is None:
            continue
        path = m.group(1)
        if path.endswith("/"):  # a package: its modules as the description lists them
            files = re.findall(r"(\w+)\.py", line)
            nxt = block.splitlines()[block.splitlines().index(line) + 1]
            files += re.findall(r"(\w+)\.py", nxt) if not nxt.startswith("curvkit/") else []
            order += [(path + f).replace("/", ".") for f in files]
        else:
            order.append(path.removesuffix(".py").removesuffix("/__init__").replace("/", "."))
    return order


def _imports(module: str) -> set[str]:
    path = SRC / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = SRC / module.replace(".", "/") / "__init__.py"
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def test_the_architecture_map_lists_every_module_and_imports_point_down():
    order = _listed()
    found = {
        str(p.relative_to(SRC).with_suffix("")).replace("/", ".").removesuffix(".__init__")
        for p in (SRC / "curvkit").rglob("*.py")
    }
    packages = {m for m in found if (SRC / m.replace(".", "/") / "__init__.py").exists()}
    assert set(order) == found - (packages - {"curvkit"}), set(order) ^ found
    rank = {m: i for i, m in enumerate(order)}
    for m in order:
        up = sorted(t for t in _imports(m) if t in rank and rank[t] < rank[m])
        assert not up, f"{m} imports {up}, listed above it in docs/architecture.md"
