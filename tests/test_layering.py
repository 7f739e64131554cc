"""Import layering: the package depends one way. An AST walk over ``src/dacnn`` checks every import
of a ``dacnn`` module against the layer table below, finds cycles, and finds ``dacnn`` imports hidden
inside functions. The checker itself is tested on planted packages so it cannot pass vacuously."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lower number = lower layer. A module may import its own layer or lower ones, never higher ones;
# "data" sits beside the model core (neither imports the other).
LAYERS: dict[str, tuple[int, str]] = {
    "dacnn.errors": (0, "base"),
    "dacnn.fileio": (0, "base"),
    "dacnn.validation": (0, "base"),
    "dacnn.runtime": (0, "base"),
    "dacnn.data.catalog": (0, "base"),  # static facts about datasets (statistics for pretrained_cfg)
    "dacnn.shared_kernel": (1, "core"),
    "dacnn.tying": (1, "core"),
    "dacnn.counting": (1, "core"),
    "dacnn.checkpoint": (1, "core"),
    "dacnn.hub": (1, "core"),
    "dacnn.hf_hub": (1, "core"),
    "dacnn.features": (1, "core"),
    "dacnn.registry": (1, "core"),
    "dacnn.models": (1, "core"),
    "dacnn.quantize": (1, "core"),
    "dacnn.compact_format": (1, "core"),
    "dacnn.importing": (1, "core"),
    "dacnn.loading": (1, "core"),
    "dacnn.data": (1, "data"),
    "dacnn.train": (2, "train"),
    "dacnn.export": (3, "tools"),
    "dacnn.experiments": (3, "tools"),
    "dacnn.analysis": (3, "tools"),
    "dacnn.timm_bridge": (3, "tools"),
    "dacnn.prune": (3, "tools"),
    "dacnn.cli": (4, "cli"),
    "dacnn.__main__": (4, "cli"),
    "dacnn": (5, "package"),  # dacnn/__init__.py: the public facade
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str, layers: dict[str, tuple[int, str]]) -> tuple[int, str]:
    # the root package's entry covers dacnn/__init__.py only, so every other module needs its own
    best = max((k for k in layers if module == k or ("." in k and module.startswith(k + "."))), key=len,
               default=None)
    if best is None:
        raise KeyError(f"{module} has no layer: add it to LAYERS")
    return layers[best]


def _imports(
    tree: ast.Module, module: str, is_package: bool, known: set[str], top: str
) -> list[tuple[str, bool, int]]:
    """``(imported dacnn module, at top level, line)`` for every import in the file."""
    found = []
    toplevel = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        at_top = id(node) in toplevel
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            if name == top or name.startswith(top + "."):
                found.append((name, at_top, node.lineno))
    return found


def check_package(root: Path, top: str, layers: dict[str, tuple[int, str]]) -> list[str]:
    """Every violation in package ``root/top``: upward or sideways imports, cycles, dacnn imports
    inside functions. Empty list: clean."""
    files = {(_module_name(p, root), p) for p in (root / top).rglob("*.py")}
    known = {m for m, _ in files}
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems = []
    for module, path in sorted(files):
        tree = ast.parse(path.read_text(), str(path))
        src_level, src_group = _layer(module, layers)
        seen = set()
        for name, at_top, line in _imports(tree, module, path.name == "__init__.py", known, top):
            if (name, line) in seen:
                continue
            seen.add((name, line))
            if name not in known:  # `from dacnn.x import name` where name is not a module
                name = next((k for k in sorted(known, key=len, reverse=True) if name.startswith(k + ".")),
                            name)
            if not at_top:
                problems.append(f"{module}:{line}: imports {name} inside a function (move it to the top)")
            if name == module or name == top:
                continue
            dst_level, dst_group = _layer(name, layers)
            if dst_level > src_level or (dst_level == src_level and dst_group != src_group and dst_level > 0):
                problems.append(f"{module}:{line}: {src_group} (layer {src_level}) imports {name} "
                                f"({dst_group}, layer {dst_level})")
            if at_top and name in graph:
                graph[module].add(name)
    # cycles among top-level imports (a package's __init__ importing its own submodules is no cycle)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):
                continue  # submodule -> its parent package is resolved by Python before the submodule
            if state.get(nxt) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return problems


def test_dacnn_layers_are_respected() -> None:
    problems = check_package(SRC, "dacnn", LAYERS)
    assert not problems, "\n".join(problems)


# (importer, imported): loading, evaluation and pruning are not exporting
FORBIDDEN = (("dacnn.analysis", "dacnn.export"), ("dacnn.experiments", "dacnn.export"))


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_analysis_and_experiments_do_not_import_export() -> None:
    files = {(_module_name(p, SRC), p) for p in (SRC / "dacnn").rglob("*.py")}
    known = {m for m, _ in files}
    bad = [f"{module}:{line}: imports {name}" for module, path in sorted(files)
           for name, _, line in _imports(ast.parse(path.read_text()), module, path.name == "__init__.py",
                                         known, "dacnn")
           for src, dst in FORBIDDEN if _within(module, src) and _within(name, dst)]
    assert not bad, "\n".join(bad)


def test_the_package_reaches_nothing_outside_it() -> None:
    """No path outside the installed package: no ``../shared``, no repository root from ``__file__``."""
    bad = []
    for path in sorted((SRC / "dacnn").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if "../shared" in line or "shared/reference" in line or "shared/papers" in line:
                bad.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
            if "parents[2]" in line:
                bad.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_registry_does_not_import_models() -> None:
    tree = ast.parse((SRC / "dacnn" / "registry.py").read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n and n.startswith("dacnn.models")]


# ---- the checker fails on planted problems ---------------------------------------------------------
PLANT_LAYERS = {"pkg.low": (0, "low"), "pkg.high": (1, "high"), "pkg": (2, "package")}


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"pkg/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_passes_clean_package(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"pkg/low.py": "X = 1\n", "pkg/high.py": "from pkg.low import X\n"})
    assert check_package(root, "pkg", PLANT_LAYERS) == []


def test_checker_fails_on_upward_import(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"pkg/low.py": "from pkg.high import Y\n", "pkg/high.py": "Y = 2\n"})
    problems = check_package(root, "pkg", PLANT_LAYERS)
    assert any("pkg.low:1: low (layer 0) imports pkg.high" in p for p in problems), problems


def test_checker_fails_on_relative_upward_import(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"pkg/low.py": "from . import high\n", "pkg/high.py": "Y = 2\n"})
    assert any("imports pkg.high" in p for p in check_package(root, "pkg", PLANT_LAYERS))


def test_checker_fails_on_cycle(tmp_path: Path) -> None:
    root = _plant(tmp_path, {
        "pkg/low.py": "X = 1\n",
        "pkg/high.py": "from pkg.high2 import Z\n",
        "pkg/high2.py": "from pkg.high import Y\nZ = 3\n",
    })
    layers = {**PLANT_LAYERS, "pkg.high2": (1, "high")}
    problems = check_package(root, "pkg", layers)
    assert any(p.startswith("import cycle: pkg.high -> pkg.high2 -> pkg.high") for p in problems), problems


def test_checker_fails_on_import_inside_function(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"pkg/low.py": "X = 1\n",
                             "pkg/high.py": "def f():\n    from pkg.low import X\n    return X\n"})
    problems = check_package(root, "pkg", PLANT_LAYERS)
    assert problems == ["pkg.high:2: imports pkg.low inside a function (move it to the top)"]


def test_checker_fails_on_module_without_layer(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"pkg/low.py": "X = 1\n", "pkg/high.py": "Y = 1\n", "pkg/stray.py": "Z = 1\n"})
    with pytest.raises(KeyError, match="pkg.stray has no layer"):
        check_package(root, "pkg", PLANT_LAYERS)


def test_checker_fails_on_planted_upward_import_in_dacnn(tmp_path: Path) -> None:
    shutil.copytree(SRC / "dacnn", tmp_path / "dacnn")
    registry = tmp_path / "dacnn" / "registry.py"
    registry.write_text(registry.read_text() + "\nfrom dacnn.cli import main  # planted\n")
    problems = check_package(tmp_path, "dacnn", LAYERS)
    assert any(p.startswith("dacnn.registry:") and "imports dacnn.cli" in p for p in problems), problems
