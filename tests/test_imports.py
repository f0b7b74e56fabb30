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
