"""The package's layers (DESIGN.md, "Layers"), checked by parsing every module of ``difflax/``.

Nothing is imported: each module is parsed with :mod:`ast`, and every import counts --
absolute (``import difflax.x.y``, ``from difflax import x``), relative (``from . import x``,
``from ..x import y``), inside functions (lazy imports), and ``importlib.import_module``
or ``__import__`` with a literal name. The rules:

* **core**: the core (the foundation modules, processes, parametrization, transitions,
  analytic, losses, guidance, solvers, likelihood, and ``difflax/__init__.py``) imports only
  the standard library without its I/O modules, jax, jaxlib, numpy, chex, diffrax, equinox
  and difflax.
* **layers**: imports only point down, in the order of :data:`LAYERS`; modules of one layer
  may import each other. ``difflax/__init__.py`` imports only the core and ``distill``.
  The recipes (``difflax.configs``) and the command-line jobs (``difflax.cli``) are the top.
  Nothing imports the checkout's entry points (``experiments``, ``configs``) or other top-level folders.
* **cycles**: no import cycle between modules (lazy imports included).
* **size**: every module has at most :data:`MAX_LINES` lines.

The checker works on a mapping ``{path: source}``, so the tests at the bottom feed it small
synthetic trees and show that it reports each kind of violation.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "difflax"
MAX_LINES = 500

# Low to high: a module may import its own layer and the layers below it. The upper layers
# follow the picture in DESIGN.md (metrics < distill < models < hub < data < train < configs < cli); the
# foundation modules are the helpers every core module may use.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pytree", "checks", "conditions", "interpolation"),
    ("processes",),
    ("parametrization",),
    ("transitions",),
    ("analytic",),
    ("losses",),
    ("guidance",),
    ("solvers",),
    ("likelihood",),
    ("metrics",),
    ("distill",),
    ("models",),
    ("hub",),
    ("data",),
    ("train",),
    ("configs",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
CORE = frozenset(LAYERS[0]) | {"processes", "parametrization", "transitions", "analytic", "losses", "guidance",
                               "solvers", "likelihood"}
ROOT_MAY_IMPORT = CORE | {"distill"}  # difflax/__init__.py: the public core API and distill

CORE_LIBRARIES = frozenset({"jax", "jaxlib", "numpy", "chex", "diffrax", "equinox", "optax", PACKAGE})
IO_MODULES = frozenset({
    "os", "io", "pathlib", "tempfile", "shutil", "pickle", "json", "glob", "csv", "sqlite3", "subprocess", "socket",
    "urllib", "http", "ftplib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "shelve", "dbm", "marshal", "mmap",
    "fileinput", "multiprocessing", "asyncio", "select", "selectors", "webbrowser",
})
ENTRY_POINTS = frozenset({"experiments", "configs", "colabs", "scripts", "benchmarks", "tests"})


class Import(NamedTuple):
    path: str  # file that imports, e.g. "difflax/guidance/cfg.py"
    line: int
    text: str  # the import as written
    target: str  # absolute module name, e.g. "difflax.solvers.base"


class Violation(NamedTuple):
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


def module_name(path: str) -> str:
    """``difflax/solvers/base.py`` -> ``difflax.solvers.base``; ``difflax/data/__init__.py`` -> ``difflax.data``."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def component(module: str) -> str | None:
    """The layer a ``difflax`` module belongs to: its first name below the package (``None`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def imports(path: str, source: str, modules: frozenset[str]) -> Iterator[Import]:
    """Every import of one file, as absolute module names (``from p import n`` is ``p.n`` if that is a module)."""
    tree = ast.parse(source, filename=path)
    module = module_name(path)
    is_package = path.endswith("__init__.py")
    lines = source.splitlines()

    def as_written(node: ast.AST) -> str:
        segment = "\n".join(lines[node.lineno - 1: node.end_lineno])
        return " ".join(segment.split()).replace("( ", "(").replace(", )", ")").replace(" )", ")")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            text = as_written(node)
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, text, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            base = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
            targets = {f"{base}.{alias.name}" for alias in node.names} & modules
            if len(targets) < len(node.names):  # some names are not modules: they come from `base` itself
                targets.add(base)
            for target in sorted(targets):
                yield Import(path, node.lineno, text, target)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                yield Import(path, node.lineno, as_written(node), node.args[0].value)


def check(sources: Mapping[str, str], max_lines: int = MAX_LINES) -> list[Violation]:
    """All violations of the layer rules in ``sources`` (``{"difflax/....py": source}``)."""
    modules = frozenset(module_name(p) for p in sources)
    found: list[Violation] = []
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for path, source in sorted(sources.items()):
        module = module_name(path)
        layer = component(module)
        count = len(source.splitlines())
        if count > max_lines:
            found.append(Violation(path, count, "size", f"{count} lines; a module has at most {max_lines}"))
        if layer is not None and layer not in RANK:
            found.append(Violation(path, 1, "layers", f"{layer!r} is in no layer of DESIGN.md "
                                                      f"(known: {', '.join(RANK)})"))
            continue
        is_core = layer is None or layer in CORE
        for imp in imports(path, source, modules):
            top = imp.target.split(".")[0]
            if imp.target in modules and imp.target != module:
                graph[module].setdefault(imp.target, imp)
            if top in ENTRY_POINTS:
                found.append(Violation(path, imp.line, "layers", f"`{imp.text}`: the library never imports the "
                                                                 f"entry points or other top-level folders ({top})"))
            elif top != PACKAGE:
                if is_core and (top in IO_MODULES or (top not in sys.stdlib_module_names and top not in
                                                      CORE_LIBRARIES)):
                    kind = "an I/O module" if top in IO_MODULES else "a library outside the core's"
                    found.append(Violation(path, imp.line, "core", f"`{imp.text}`: the core imports {kind} "
                                           f"({top}); it may import the standard library without I/O and "
                                           f"{', '.join(sorted(CORE_LIBRARIES - {PACKAGE}))}"))
            else:
                found.extend(_layer_violation(module, layer, imp))
    found.extend(_cycles(graph))
    return found


def _layer_violation(module: str, layer: str | None, imp: Import) -> list[Violation]:
    target = component(imp.target)
    where = f"`{imp.text}`"
    if target is None:  # the root package imports everything public: only the layers above it may import it
        if layer is not None and RANK[layer] < RANK["distill"]:
            return [Violation(imp.path, imp.line, "layers", f"{where}: {layer} imports the root package "
                                                            "difflax, which imports distill (a higher layer)")]
        return []
    if target not in RANK:
        return [Violation(imp.path, imp.line, "layers", f"{where}: {target!r} is in no layer of DESIGN.md")]
    if layer is None:
        if target not in ROOT_MAY_IMPORT:
            return [Violation(imp.path, imp.line, "layers", f"{where}: difflax/__init__.py imports only the core "
                                                            f"and distill, not {target}")]
        return []
    if RANK[target] > RANK[layer]:
        return [Violation(imp.path, imp.line, "layers", f"{where}: {layer} (layer {RANK[layer]}) imports "
                                                        f"{target} (layer {RANK[target]}); imports only point down")]
    return []


def _cycles(graph: dict[str, dict[str, Import]]) -> list[Violation]:
    """One violation per strongly connected component of the import graph, naming one cycle in it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graphs are small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                components.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for scc in components:
        members, start = set(scc), scc[0]
        # shortest cycle through `start` inside the component (breadth-first)
        parent: dict[str, str] = {}
        queue, end = [start], None
        while queue and end is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    end = v
                    break
                if w in members and w not in parent:
                    parent[w] = v
                    queue.append(w)
        path = [end]
        while path[-1] != start:
            path.append(parent[path[-1]])
        path.reverse()
        hops = [graph[a][b] for a, b in zip(path, [*path[1:], start], strict=True)]
        chain = " -> ".join(f"{h.path}:{h.line} `{h.text}`" for h in hops)
        found.append(Violation(hops[0].path, hops[0].line, "cycles",
                               f"import cycle between {', '.join(scc)}: {chain}"))
    return found


def package_sources(root: Path = ROOT) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted((root / PACKAGE).rglob("*.py"))}


@functools.cache
def _real_tree() -> tuple[Violation, ...]:
    return tuple(check(package_sources()))


def _report(rule: str) -> str:
    violations = [v for v in _real_tree() if v.rule == rule]
    return "\n".join(map(str, violations))


# ------------------------------------------------------------------------------------------ the real tree
def test_core_imports_only_jax_and_the_standard_library():
    report = _report("core")
    assert not report, "The core imports something outside its allowed libraries:\n" + report


def test_imports_point_down():
    report = _report("layers")
    assert not report, "Imports that do not point down the layers of DESIGN.md:\n" + report


def test_no_import_cycles():
    report = _report("cycles")
    assert not report, "Import cycles:\n" + report


def test_modules_are_at_most_500_lines():
    report = _report("size")
    assert not report, "Modules over the size limit:\n" + report


def test_every_module_parses_and_is_seen():
    sources = package_sources()
    assert f"{PACKAGE}/__init__.py" in sources and len(sources) > 20
    modules = frozenset(module_name(p) for p in sources)
    seen = [imp for path, src in sources.items() for imp in imports(path, src, modules)]
    assert any(imp.target == "jax" for imp in seen)


# ------------------------------------------------------------------------------------------ the checker can fail
CLEAN = {
    "difflax/__init__.py": "from difflax import distill, guidance, processes, solvers\n",
    "difflax/pytree.py": "import dataclasses\nimport jax\n",
    "difflax/processes.py": "import math\nimport numpy as np\nfrom difflax import pytree\n",
    "difflax/guidance/__init__.py": "from .cfg import cfg\n",
    "difflax/guidance/cfg.py": "from __future__ import annotations\nimport chex\nfrom ..processes import broadcast\n",
    "difflax/solvers/__init__.py": "from difflax.solvers.base import run\nfrom . import grids\n",
    "difflax/solvers/base.py": "import diffrax\nimport equinox\nfrom difflax.guidance import cfg\n",
    "difflax/solvers/grids.py": "import jax.numpy as jnp\nfrom difflax.solvers.base import run\n",
    "difflax/distill/__init__.py": "import os\nfrom difflax.solvers import grids\n",
    "difflax/models/__init__.py": "import flax.linen as nn\nfrom difflax.distill import x\n",
    "difflax/train/__init__.py": "import optax\nimport difflax\nfrom difflax.models import m\nfrom .. import data\n",
    "difflax/data/__init__.py": "from difflax.data.toy import toy\n",
    "difflax/data/toy.py": "import numpy as np\nfrom difflax.analytic import GaussianMixture\n",
}


def test_checker_passes_a_clean_tree():
    assert check(CLEAN) == []


@pytest.mark.parametrize(
    ("path", "source", "rule", "message"),
    [
        # the core imports Flax / I/O / an unlisted library, at module level or inside a function
        ("difflax/processes.py", "from flax import struct\n", "core", "`from flax import struct`: the core imports a "
                                                                      "library outside the core's (flax)"),
        ("difflax/solvers/grids.py", "def f():\n    import flax\n", "core", "(flax)"),
        ("difflax/guidance/cfg.py", "import json\n", "core", "an I/O module (json)"),
        ("difflax/likelihood.py", "from pathlib import Path\n", "core", "an I/O module (pathlib)"),
        ("difflax/__init__.py", "import tqdm\n", "core", "(tqdm)"),
        # guidance imports solvers: absolute, relative, lazy, via the root package or importlib
        ("difflax/guidance/cfg.py", "from difflax.solvers import sample\n", "layers",
         "`from difflax.solvers import sample`: guidance (layer 6) imports solvers (layer 7)"),
        ("difflax/guidance/cfg.py", "from ..solvers.base import run\n", "layers", "guidance (layer 6) imports solvers"),
        ("difflax/guidance/cfg.py", "def f():\n    import difflax.solvers.grids as g\n", "layers", "imports solvers"),
        ("difflax/guidance/cfg.py", "from difflax import solvers\n", "layers", "imports solvers"),
        ("difflax/guidance/cfg.py", "import difflax\n", "layers", "imports the root package"),
        ("difflax/guidance/cfg.py", "import importlib\nimportlib.import_module('difflax.solvers')\n", "layers",
         "imports solvers"),
        ("difflax/processes.py", "from difflax.analytic import GaussianMixture\n", "layers",
         "processes (layer 1) imports analytic (layer 4)"),
        ("difflax/models/unet.py", "from difflax.train import state\n", "layers", "models (layer 11) imports train"),
        ("difflax/metrics/fid.py", "from difflax.distill import x\n", "layers", "metrics (layer 9) imports distill"),
        ("difflax/data/toy.py", "from configs import toy2d\n", "layers", "entry points or other top-level folders"),
        ("difflax/train/loop.py", "import experiments.main\n", "layers", "(experiments)"),
        ("difflax/__init__.py", "from difflax import models\n", "layers", "imports only the core and distill"),
        ("difflax/train/loop.py", "from difflax.cli import train\n", "layers", "train (layer 14) imports cli"),
        ("difflax/configs/toy2d.py", "from difflax.cli import train\n", "layers", "configs (layer 15) imports cli"),
        ("difflax/sampling.py", "import jax\n", "layers", "'sampling' is in no layer"),
        ("difflax/solvers/base.py", "from difflax.guidance_v2 import x\n", "layers", "'guidance_v2' is in no layer"),
        # a cycle inside one package, closed by a lazy import
        ("difflax/data/toy.py", "def f():\n    from difflax.data.pipe import p\n",
         "cycles", "import cycle between difflax.data.pipe, difflax.data.toy"),
        ("difflax/solvers/base.py", "def f():\n    from difflax.solvers import grids\n", "cycles",
         "difflax.solvers.base, difflax.solvers.grids"),
        # size
        ("difflax/losses.py", "x = 1\n" * 501, "size", "501 lines; a module has at most 500"),
    ],
)
def test_checker_reports_a_synthetic_violation(path, source, rule, message):
    sources = dict(CLEAN)
    sources[path] = sources.get(path, "") + source
    if "pipe" in source:
        sources["difflax/data/pipe.py"] = "from difflax.data.toy import toy\n"
    violations = [v for v in check(sources) if v.rule == rule]
    assert any(message in str(v) and v.path.startswith(path.rsplit("/", 1)[0]) for v in violations), (
        f"expected a [{rule}] violation containing {message!r}; got:\n" + "\n".join(map(str, check(sources))))
    if rule != "cycles":  # the report names the file and line of the offending import
        assert any(v.path == path for v in violations)
