"""Imports run downward only (the rule of docs/ARCHITECTURE.md, "Import direction").

Every module of the package (and of the task plugins, installed as ``vlm_grpo_ma.tasks``) is
parsed with ``ast``; each ``import`` / ``from ... import`` of a ``vlm_grpo_ma`` module, at the top
or inside a function, is checked against the layers below.  A module may import from its own
layer or a lower one; ``training`` and ``bench`` are peers that never import each other; the
core never imports the plugin package ``vlm_grpo_ma.tasks`` (it reaches tasks through the
registry, ``vlm_grpo_ma.task.get_task``); nobody imports a private (``_name``) attribute from
another layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: layer of each top-level part of the package; a module imports only from layers <= its own
LAYERS = {
    "algorithms": 0, "config": 0, "resources": 0, "sandbox": 0,  # pure math and leaf utilities
    "models": 1,  # model families, loading, tiny models
    "data": 2,  # samples, images, collation, loaders
    "task": 3, "reward_guard": 3, "format": 3,  # the plugin contract, the format rule, the reward guard
    "rollout": 4,  # generation backends and the training layout
    "training": 5, "bench": 5,  # the two applications (peers)
    "cli": 6, "__main__": 6,  # the one console command (`vlm-grpo-ma train|bench`, `python -m vlm_grpo_ma`)
    "<root>": 6,  # vlm_grpo_ma/__init__.py re-exports the public names
}
PLUGINS = "tasks"  # vlm_grpo_ma.tasks: may import layers <= 3 (task, data, models, utilities)
PLUGIN_LAYER = 3

#: known edges that break the rule, each with the issue that removes it; the test fails when
#: one of them is gone (so this list cannot go stale) or a new one appears
KNOWN: set[tuple[str, str]] = set()


def _modules(root: Path = REPO) -> dict[str, Path]:
    mods = {}
    for p in sorted((root / "vlm_grpo_ma").rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    for p in sorted((root / "tasks").glob("*.py")):
        mods["vlm_grpo_ma.tasks" + ("" if p.stem == "__init__" else "." + p.stem)] = p
    return mods


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every vlm_grpo_ma import in the file."""
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "vlm_grpo_ma"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "vlm_grpo_ma":
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _violations(root: Path = REPO) -> dict[tuple[str, str], str]:
    """{(importing module, imported module): why} for every import against the rule."""
    bad: dict[tuple[str, str], str] = {}
    for module, path in _modules(root).items():
        src = _part(module)
        for target, names, line in _imports(module, path):
            dst = _part(target)
            where = f"{path.relative_to(root)}:{line}"
            if src == dst:
                continue
            if dst == PLUGINS:
                bad[(module, target)] = f"{where}: the core imports the plugin package ({target})"
                continue
            # ``from vlm_grpo_ma.tasks import x`` names a submodule: check it as one
            src_layer = PLUGIN_LAYER if src == PLUGINS else LAYERS[src]
            if LAYERS.get(dst, 99) > src_layer or (src_layer == 5 and LAYERS[dst] == 5):
                bad[(module, target)] = f"{where}: {src} (layer {src_layer}) imports {target} (layer {LAYERS.get(dst)})"
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                bad[(module, target)] = f"{where}: private {private} imported from another layer ({target})"
    return bad


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(m) for m in _modules()} - {PLUGINS}
    assert parts <= set(LAYERS), f"add these to LAYERS (and docs/ARCHITECTURE.md): {sorted(parts - set(LAYERS))}"


def test_imports_run_downward():
    why = _violations()
    found = set(why)
    new = found - KNOWN
    assert not new, "imports against the layering:\n" + "\n".join(sorted(why[e] for e in new))
    gone = KNOWN - found
    assert not gone, f"fixed: remove from KNOWN in tests/test_imports.py: {sorted(gone)}"


@pytest.mark.parametrize("where, src, expected", [
    ("rollout", "from vlm_grpo_ma.training.rl import rl_step\n", "rollout (layer 4) imports vlm_grpo_ma.training.rl"),
    ("rollout", "from vlm_grpo_ma.bench import backends\n", "rollout (layer 4) imports vlm_grpo_ma.bench"),
    ("bench", "from vlm_grpo_ma.training import rl\n", "bench (layer 5) imports vlm_grpo_ma.training"),
    ("data", "def f():\n    from vlm_grpo_ma.task import get_task\n", "data (layer 2) imports vlm_grpo_ma.task"),
    ("training", "from vlm_grpo_ma.rollout.hf import _unwrap\n", "private ['_unwrap']"),
    ("training", "import vlm_grpo_ma.tasks.common\n", "the core imports the plugin package"),
    ("algorithms", "from ..rollout import layout\n", "algorithms (layer 0) imports vlm_grpo_ma.rollout"),
])
def test_the_checker_catches_each_kind_of_violation(tmp_path, where, src, expected):
    """The checker itself: one planted bad import is reported, a clean tree has none."""
    (tmp_path / "vlm_grpo_ma" / where).mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "vlm_grpo_ma" / where / "__init__.py").write_text("")
    assert _violations(tmp_path) == {}
    (tmp_path / "vlm_grpo_ma" / where / "planted.py").write_text(src)
    why = list(_violations(tmp_path).values())
    assert len(why) == 1 and expected in why[0], why


def _module_of(target: str, names: list[str], mods: dict[str, Path]) -> list[str]:
    """The package modules an import statement reaches (``from pkg import mod`` names a module)."""
    hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
    return hits or ([target] if target in mods else [])


def _circles(root: Path = REPO) -> list[list[str]]:
    """Import circles between modules of one folder (imports at the top or inside functions;
    a package's ``__init__`` re-exporting its modules is not an edge): each as the list of
    modules on it."""
    mods = _modules(root)
    folder = lambda m: m.rpartition(".")[0]  # noqa: E731
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        if path.name == "__init__.py":
            continue
        for target, names, _ in _imports(module, path):
            for dst in _module_of(target, names, mods):
                if dst != module and folder(dst) == folder(module) and mods[dst].name != "__init__.py":
                    edges[module].add(dst)
    # strongly connected components (Tarjan) of more than one module
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_inside_a_folder():
    """Downward also inside a layer's folder: no module of a folder imports (at the top or inside a
    function) a module that imports it back, directly or through others of that folder."""
    assert _circles() == [], f"import circles: {_circles()}"


def test_the_circle_checker_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "vlm_grpo_ma" / "data"
    pkg.mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (pkg / "__init__.py").write_text("from .a import x\nfrom .b import y\n")  # re-exports are no edges
    (pkg / "a.py").write_text("from vlm_grpo_ma.data.b import y\nx = 1\n")
    (pkg / "b.py").write_text("y = 2\n")
    assert _circles(tmp_path) == []
    (pkg / "b.py").write_text("def f():\n    from vlm_grpo_ma.data import a\ny = 2\n")  # hidden in a function
    assert _circles(tmp_path) == [["vlm_grpo_ma.data.a", "vlm_grpo_ma.data.b"]]
