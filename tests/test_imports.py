"""Imports run downward only (the rule of docs/ARCHITECTURE.md, "Import direction").

Every module of the package (and of the task plugins, installed as ``vlm_grpo_ma.tasks``) and
every ``benchmarks/*.py`` and ``scripts/*.py`` file is parsed with ``ast``; each ``import`` /
``from ... import`` of a ``vlm_grpo_ma`` module or of a repository folder, at the top or inside a
function, is checked against the layers below, with no exceptions (``KNOWN`` is empty):

- a package module imports from its own layer or a lower one; ``training`` and ``bench`` are
  peers that never import each other; the core never imports the plugin package
  ``vlm_grpo_ma.tasks`` (it reaches tasks through the registry, ``vlm_grpo_ma.task.get_task``);
- the package never imports from ``benchmarks``, ``scripts`` or ``tests`` (nor a benchmark or
  script by its bare name, the way they import each other after putting their folder on
  ``sys.path``);
- benchmarks and scripts are applications on top of every layer: they may import any public
  name of the package (``training`` and ``bench`` together, the plugins ``vlm_grpo_ma.tasks``);
- nobody imports a private (``_name``) attribute across the parts of the package, nor from the
  package into a benchmark or script;
- no import circles between the modules of one folder: a folder of the package, ``benchmarks``
  (``from wide_model import ...``: fine while no circle) or ``scripts``.
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
#: repository folders whose ``*.py`` files are applications above every layer (and above the plugins)
APPS = ("benchmarks", "scripts")
APP_LAYER = 7
#: repository folders the package never imports from
OUTSIDE = ("benchmarks", "scripts", "tests")

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


def _apps(root: Path = REPO) -> dict[str, Path]:
    """The benchmarks and scripts, as ``benchmarks.<stem>`` / ``scripts.<stem>``."""
    return {f"{folder}.{p.stem}": p for folder in APPS for p in sorted((root / folder).glob("*.py"))}


def _local(apps: dict[str, Path], own: str | None = None) -> dict[str, str]:
    """{bare name: application module}: what ``import wide_model`` means once a benchmark has put
    its folder on ``sys.path`` (its own folder first, when the name is in both)."""
    names = {m.partition(".")[2]: m for m in apps if m.partition(".")[0] != own}
    names.update({m.partition(".")[2]: m for m in apps if m.partition(".")[0] == own})
    return names


def _imports(module: str, path: Path, local: dict[str, str] | None = None) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the file of a vlm_grpo_ma
    module, of a repository folder in ``OUTSIDE``, or of a bare name in ``local`` (resolved to
    its application module)."""
    local = local or {}
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        first, _, rest = target.partition(".")
        if first in local:
            return local[first] + ("." + rest if rest else "")
        return target if first == "vlm_grpo_ma" or first in OUTSIDE else None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(t, [], node.lineno) for a in node.names if (t := resolve(a.name))]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = resolve(node.module or "")
            if target and target.split(".")[0] in ("vlm_grpo_ma", *OUTSIDE):
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _private(names: list[str], target: str = "") -> list[str]:
    """The private names an import reaches: imported names, and modules on its path (``_geometry``
    in ``vlm_grpo_ma.tasks._geometry``), dunders aside."""
    path = [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
    return path + [n for n in names if n.startswith("_") and n != "__version__"]


def _violations(root: Path = REPO) -> dict[tuple[str, str], str]:
    """{(importing module, imported module): why} for every import against the rule."""
    bad: dict[tuple[str, str], str] = {}
    apps = _apps(root)
    for module, path in _modules(root).items():
        src = _part(module)
        for target, names, line in _imports(module, path, _local(apps)):
            dst = _part(target)
            where = f"{path.relative_to(root)}:{line}"
            if target.split(".")[0] in OUTSIDE:
                bad[(module, target)] = f"{where}: the package imports from {target.split('.')[0]}/ ({target})"
                continue
            if src == dst:
                continue
            if dst == PLUGINS:
                bad[(module, target)] = f"{where}: the core imports the plugin package ({target})"
                continue
            # ``from vlm_grpo_ma.tasks import x`` names a submodule: check it as one
            src_layer = PLUGIN_LAYER if src == PLUGINS else LAYERS[src]
            if LAYERS.get(dst, 99) > src_layer or (src_layer == 5 and LAYERS[dst] == 5):
                bad[(module, target)] = f"{where}: {src} (layer {src_layer}) imports {target} (layer {LAYERS.get(dst)})"
            private = _private(names, target)
            if private:
                bad[(module, target)] = f"{where}: private {private} imported from another layer ({target})"
    for module, path in apps.items():
        for target, names, line in _imports(module, path, _local(apps, own=module.partition(".")[0])):
            if target.split(".")[0] != "vlm_grpo_ma":
                continue  # one application imports another: only circles are wrong (_circles)
            dst = _part(target)
            where = f"{path.relative_to(root)}:{line}"
            if dst != PLUGINS and LAYERS.get(dst, 99) > APP_LAYER:
                bad[(module, target)] = f"{where}: {module} imports {target}, a part of the package with no layer"
            private = _private(names, target)
            if private:
                bad[(module, target)] = f"{where}: private {private} imported from the package into {module} ({target})"
    return bad


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(m) for m in _modules()} - {PLUGINS}
    assert parts <= set(LAYERS), f"add these to LAYERS (and docs/ARCHITECTURE.md): {sorted(parts - set(LAYERS))}"


def test_the_benchmarks_and_scripts_are_checked():
    """The applications are found, and a benchmark's bare-name import of another is an edge."""
    apps = _apps()
    assert {"benchmarks.layout_cost", "benchmarks.wide_model", "scripts.train", "scripts.benchmark"} <= set(apps)
    assert "benchmarks.wide_model" in _edges()["benchmarks.layout_cost"]


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


def _edges(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the modules of its own folder it imports} over the package's folders,
    ``benchmarks`` and ``scripts`` (imports at the top or inside functions; a package's
    ``__init__`` re-exporting its modules is not an edge)."""
    apps = _apps(root)
    mods = {**_modules(root), **apps}
    folder = lambda m: m.rpartition(".")[0]  # noqa: E731
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        if path.name == "__init__.py":
            continue
        own = module.partition(".")[0] if module in apps else None
        for target, names, _ in _imports(module, path, _local(apps, own=own)):
            for dst in _module_of(target, names, mods):
                if dst != module and folder(dst) == folder(module) and mods[dst].name != "__init__.py":
                    edges[module].add(dst)
    return edges


def _circles(root: Path = REPO) -> list[list[str]]:
    """Import circles between modules of one folder (see ``_edges``): each as the list of
    modules on it."""
    edges = _edges(root)
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
    """Downward also inside a layer's folder (and among the benchmarks, and among the scripts): no
    module of a folder imports (at the top or inside a function) a module that imports it back,
    directly or through others of that folder."""
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


#: a clean application: every layer at once, the plugins, another benchmark by its bare name
CLEAN_APP = (
    "from vlm_grpo_ma import __version__, get_task\n"
    "from vlm_grpo_ma.training import rl\n"
    "from vlm_grpo_ma.bench import backends\n"
    "import vlm_grpo_ma.tasks.common\n"
    "from vlm_grpo_ma.cli import main\n"
    "from wide_model import build_wide_model\n"
)


@pytest.mark.parametrize("where, src, expected", [
    ("benchmarks", "def f():\n    from vlm_grpo_ma.training.data import _STRIDE\n",
     "private ['_STRIDE'] imported from the package into benchmarks.planted"),
    ("scripts", "from vlm_grpo_ma.tasks import _geometry\n", "private ['_geometry'] imported from the package into scripts.planted"),
    ("benchmarks", "from vlm_grpo_ma.tasks._geometry import discrete_frechet\n",
     "private ['_geometry'] imported from the package into benchmarks.planted"),
    ("benchmarks", "import vlm_grpo_ma.nowhere\n", "a part of the package with no layer"),
    ("vlm_grpo_ma/training", "from benchmarks.wide_model import build_wide_model\n", "the package imports from benchmarks/"),
    ("vlm_grpo_ma/bench", "def f():\n    import wide_model\n", "the package imports from benchmarks/ (benchmarks.wide_model)"),
    ("vlm_grpo_ma/rollout", "from scripts import train\n", "the package imports from scripts/"),
    ("vlm_grpo_ma/data", "from tests._launch import free_port\n", "the package imports from tests/"),
])
def test_the_checker_catches_each_kind_of_application_violation(tmp_path, where, src, expected):
    """The rules for benchmarks and scripts: a clean tree (with an application importing every
    layer) has no violation; one planted bad import is reported."""
    for folder in ("vlm_grpo_ma/training", "vlm_grpo_ma/bench", "vlm_grpo_ma/rollout", "vlm_grpo_ma/data",
                   "tasks", "benchmarks", "scripts"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "benchmarks" / "wide_model.py").write_text("def build_wide_model():\n    pass\n")
    (tmp_path / "benchmarks" / "clean.py").write_text(CLEAN_APP)
    (tmp_path / "scripts" / "train.py").write_text("from vlm_grpo_ma.training.cli import main\n")
    assert _violations(tmp_path) == {}
    (tmp_path / where / "planted.py").write_text(src)
    why = list(_violations(tmp_path).values())
    assert len(why) == 1 and expected in why[0], why


def test_the_circle_checker_finds_a_planted_circle_among_benchmarks(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "a.py").write_text("import sys\nfrom b import y\nx = 1\n")  # bare name: the folder is on sys.path
    (tmp_path / "benchmarks" / "b.py").write_text("y = 2\n")
    assert _circles(tmp_path) == []
    (tmp_path / "benchmarks" / "b.py").write_text("def f():\n    from benchmarks import a\ny = 2\n")
    assert _circles(tmp_path) == [["benchmarks.a", "benchmarks.b"]]


# ----------------------------------------------------------------------------- the architecture doc
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"


def _documented_files(root: Path = REPO) -> list[str]:
    """Every module of the package and the plugins, and every script and benchmark, as the path
    relative to its folder that docs/ARCHITECTURE.md names (``rl.py``, ``vllm_cpu/sitecustomize.py``)."""
    out = []
    for folder in ("vlm_grpo_ma", "tasks"):
        out += [str(p.relative_to(p.parent)) for p in sorted((root / folder).rglob("*.py"))
                if p.name != "__init__.py" or p.parent.name == "sandbox"]
    out += [p.name for p in sorted((root / "scripts").glob("*")) if p.is_file()]
    out += [p.name for p in sorted((root / "benchmarks").glob("*.py"))]
    return out


def test_architecture_doc_names_every_module_and_no_stale_one():
    """docs/ARCHITECTURE.md is drawn from the code: each module, script and benchmark is named in
    it (as ``name.py`` in backticks), and each ``folder/name.py`` path it names exists."""
    import re

    doc = ARCHITECTURE.read_text(encoding="utf-8")
    named = set(re.findall(r"[\w/]*?(\w+\.(?:py|sh))", doc))
    missing = [f for f in _documented_files() if Path(f).name not in named]
    assert not missing, f"name these in docs/ARCHITECTURE.md: {missing}"
    stale = []
    for path in set(re.findall(r"`((?:vlm_grpo_ma|tasks|scripts|benchmarks|training|rollout|algorithms|models|data|bench|sandbox)/[\w/]+\.(?:py|sh))", doc)):
        candidates = [REPO / path, REPO / "vlm_grpo_ma" / path]
        if not any(c.exists() for c in candidates):
            stale.append(path)
    every_file = {p.name for p in REPO.rglob("*.py") if ".venv" not in p.parts} | {
        p.name for p in (REPO / "scripts").glob("*.sh")}
    stale += sorted(n for n in named if n not in every_file)
    assert not stale, f"docs/ARCHITECTURE.md names files that do not exist: {stale}"
