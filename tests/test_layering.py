"""The package layering, read from the source: which ``app`` package may import which, and no cycles.

Every ``import``/``from ... import`` of ``app`` code in ``app/`` and ``scripts/`` counts, also those
inside functions (a lazy import is still a dependency). ``LAYERS`` is the architecture the README
describes; a new dependency either fits it or changes it here, on purpose.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: dict[str, set[str]] = {
    "app.utils": set(),
    "app.nn": set(),
    "app.data": {"app.utils"},
    "app.models": {"app.nn", "app.utils"},
    "app.measure": {"app.nn", "app.models", "app.utils"},
    "app.plan": {"app.measure", "app.models", "app.nn", "app.utils"},
    "app.infer": {"app.data", "app.models", "app.nn", "app.utils"},
    "app.train": {"app.data", "app.measure", "app.models", "app.nn", "app.plan", "app.utils"},
    "app.bench": {"app.data", "app.measure", "app.models", "app.nn", "app.plan", "app.utils"},
}
"""Package -> the other ``app`` packages it may import. ``app`` itself (``app/__init__.py``) is empty."""


def module_name(path: Path, root: Path) -> str:
    """``app/nn/functional.py`` -> ``app.nn.functional``; ``app/nn/__init__.py`` -> ``app.nn``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path, known: set[str]) -> Iterator[str]:
    """The ``app``/``scripts`` modules one file imports (relative imports resolved; ``from pkg import
    sub`` counts ``pkg.sub`` when ``sub`` is a module, else ``pkg``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in known else target


def import_graph(root: Path, folders: tuple[str, ...] = ("app", "scripts")) -> dict[str, set[str]]:
    """Module -> the project modules it imports, for every ``.py`` file under ``folders`` of ``root``."""
    files = [p for folder in folders for p in sorted((root / folder).rglob("*.py"))]
    known = {module_name(p, root) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        deps = {m for m in imported_modules(path, root, known) if m in known or m.split(".")[0] in folders}
        graph[module_name(path, root)] = {d for d in deps if d in known} - {module_name(path, root)}
    return graph


def package_of(module: str) -> str:
    """``app.nn.functional`` -> ``app.nn``; ``scripts.x`` -> ``scripts``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "app" and len(parts) > 1 else parts[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, deps in graph.items():
        out.setdefault(package_of(module), set()).update(package_of(d) for d in deps)
    return {p: deps - {p} for p, deps in out.items()}


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks :data:`LAYERS`, or reaches ``scripts``, as ``"importer -> imported"``."""
    bad = []
    for module, deps in sorted(graph.items()):
        pkg = package_of(module)
        for dep in sorted(deps):
            target = package_of(dep)
            if target == pkg or pkg == "scripts" and target != "scripts":
                continue
            if target == "scripts" or pkg not in LAYERS or target not in LAYERS[pkg]:
                bad.append(f"{module} -> {dep}")
    return bad


# ------------------------------------------------------------------------------------ the tree


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_every_app_package_has_a_layer(graph):
    packages = {package_of(m) for m in graph if m.startswith("app.") and m != "app.conf"}
    assert packages <= set(LAYERS), f"packages without a declared layer: {sorted(packages - set(LAYERS))}"


def test_imports_follow_the_layers(graph):
    assert layering_violations(graph) == []


def test_no_package_cycle(graph):
    assert find_cycle(package_graph(graph)) is None


def test_no_module_cycle(graph):
    assert find_cycle(graph) is None


# ------------------------------------------------------------------ the checks catch violations


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checks_find_a_cycle_inside_functions_and_a_forbidden_import(tmp_path):
    root = _tree(tmp_path, {
        "app/__init__.py": "",
        "app/data/__init__.py": "",
        "app/data/nifti.py": "def f():\n    from app.data.video import g\n",
        "app/data/video.py": "from .nifti import f\n",
        "app/nn/__init__.py": "from app.models import build\n",
        "app/models/__init__.py": "import app.nn\n",
        "scripts/study.py": "import app.bench\n",
        "app/bench/__init__.py": "",
    })
    g = import_graph(root)
    assert g["app.data.video"] == {"app.data.nifti"} and g["app.data.nifti"] == {"app.data.video"}
    assert find_cycle(g) in (["app.data.nifti", "app.data.video", "app.data.nifti"],
                             ["app.data.video", "app.data.nifti", "app.data.video"],
                             ["app.models", "app.nn", "app.models"], ["app.nn", "app.models", "app.nn"])
    assert find_cycle(package_graph(g)) in (["app.models", "app.nn", "app.models"], ["app.nn", "app.models", "app.nn"])
    assert layering_violations(g) == ["app.nn -> app.models"]  # scripts may import anything of app


def test_every_package_ships_in_the_wheel():
    line = next(ln for ln in (ROOT / "pyproject.toml").read_text().splitlines() if ln.startswith("packages = ["))
    listed = set(ast.literal_eval(line.partition("=")[2].strip()))
    found = {module_name(p, ROOT) for p in (ROOT / "app").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
