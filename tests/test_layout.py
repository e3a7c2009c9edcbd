"""The shape of the package: no import cycles, and imports only along the allowed arrows.

Every module of ``src/gradprobe`` is parsed with :mod:`ast`; every ``import`` counts, at module
level or inside a function, absolute or relative. The rules (docs/design.md, "Map"):

    cli -> lab -> (capture, remedies, report, diagnose) -> (store, stats, layers)
    report -> diagnose, store          capture -> stats, store.writer (+ frames), layers
    store -> stats.schema only         diagnose -> store, stats.schema, layers, activations
    check -> layers, activations, errors only (stands alone)
    theory -> layers, activations, stats
    stats.schema imports no torch; nothing imports cli or lab except cli and lab
    remedies -> capture, diagnose and report (the doctor), store, stats, layers, theory

The top-level helpers (errors, _version, activations, layers) may be imported by every module;
``gradprobe/__init__.py`` is the lazy public facade and exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "gradprobe"

HELPERS = {"gradprobe.errors", "gradprobe._version", "gradprobe.activations", "gradprobe.layers"}
FACADE = "gradprobe"

# area -> areas it may import (besides itself and the helpers); an area is the first package
# below gradprobe, or a module named in full where the rule is finer ("stats.schema").
ALLOWED: dict[str, set[str]] = {
    "cli": {"*"},
    "lab": {"capture", "remedies", "report", "diagnose", "store", "stats", "theory", "check"},
    "remedies": {"capture", "diagnose", "report", "store", "stats", "theory"},  # report: the doctor's comparison view
    "report": {"diagnose", "store", "stats"},
    "integrations": {"capture", "diagnose", "report", "store", "stats"},
    "diagnose": {"store", "stats.schema"},
    "capture": {"stats", "store.writer", "store.frames"},  # the writing side of the store
    "store": {"stats.schema"},
    "stats": set(),
    "theory": {"stats"},
    "check": set(),
}
ONLY_FROM = {"cli": {"cli"}, "lab": {"cli", "lab"}}
"""Areas that only the named areas may import."""


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The gradprobe modules ``path`` imports (``from a import b`` counts as ``a.b`` where that
    is a module, else as ``a``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                out.add(full if full in known else mod)
    return {m for m in out if m.split(".")[0] == "gradprobe" and m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def area(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def allowed(src: str, dst: str) -> bool:
    if src == FACADE or dst == FACADE:
        return True
    a, b = area(src), area(dst)
    for only, users in ONLY_FROM.items():
        if b == only and a not in users:
            return False
    if dst in HELPERS or a == b or (src in HELPERS and dst in HELPERS):
        return True
    if src in HELPERS:  # helpers import only helpers
        return False
    rules = ALLOWED.get(a)
    if rules is None:
        return False
    if "*" in rules:
        return True
    sub = ".".join(dst.split(".")[1:3])  # e.g. "stats.schema"
    return b in rules or sub in rules


def path_of(mod: str) -> str:
    return str(modules()[mod].relative_to(SRC.parent))


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` (as a closed list of modules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n == FACADE:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m != FACADE and m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_parser_sees_every_kind_of_import(tmp_path):
    known = {"gradprobe.a", "gradprobe.b", "gradprobe.b.c", "gradprobe.d", "gradprobe.e"}
    f = tmp_path / "x.py"
    f.write_text("from . import a\nfrom .b import c\ndef f():\n    import gradprobe.d\n"
                 "    from gradprobe.e import thing\n")
    assert imports("gradprobe.x", f, known) == {"gradprobe.a", "gradprobe.b.c", "gradprobe.d",
                                                "gradprobe.e"}


def test_a_planted_cycle_and_arrow_are_found():
    g = {"gradprobe.store.run": {"gradprobe.capture.probe"},
         "gradprobe.capture.probe": {"gradprobe.store.run"}}
    assert find_cycle(g) is not None
    assert not allowed("gradprobe.store.run", "gradprobe.capture.probe")
    assert not allowed("gradprobe.capture.probe", "gradprobe.lab.zoo")
    assert not allowed("gradprobe.check.engine", "gradprobe.stats.eager")
    assert not allowed("gradprobe.diagnose.rules", "gradprobe.stats.eager")
    assert allowed("gradprobe.diagnose.rules", "gradprobe.stats.schema")
    assert allowed("gradprobe.cli.main", "gradprobe.lab.base")


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(path_of(m) for m in cycle)


def test_imports_follow_the_allowed_arrows():
    bad = [f"{path_of(src)} imports {path_of(dst)}"
           for src, dsts in sorted(graph().items()) for dst in sorted(dsts)
           if not allowed(src, dst)]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("mod", ["gradprobe.stats.schema", "gradprobe.store.run",
                                 "gradprobe.store.parts", "gradprobe.store.writer",
                                 "gradprobe.store.frames"])
def test_storage_side_imports_no_torch(mod):
    path = modules().get(mod)
    if path is None:
        pytest.skip(f"{mod} does not exist")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and not n.level}
    if mod == "gradprobe.store.writer":  # environment() names the torch version, lazily
        names.discard("torch")
    assert "torch" not in names, f"{path_of(mod)} imports torch"


EXPERIMENTS = "gradprobe.lab.experiments"


def experiment_imports(g: dict[str, set[str]]) -> list[str]:
    """``src imports dst`` for every experiment module importing another experiment module
    (they share helpers through ``gradprobe.lab.common`` instead)."""
    return [f"{src} imports {dst}" for src, dsts in sorted(g.items()) for dst in sorted(dsts)
            if src.startswith(EXPERIMENTS + ".") and dst.startswith(EXPERIMENTS + ".")]


def test_a_planted_experiment_import_is_found():
    g = {f"{EXPERIMENTS}.a": {f"{EXPERIMENTS}.b", "gradprobe.lab.common"},
         f"{EXPERIMENTS}.b": {"gradprobe.lab.common"}}
    assert experiment_imports(g) == [f"{EXPERIMENTS}.a imports {EXPERIMENTS}.b"]


def test_experiments_do_not_import_each_other():
    bad = experiment_imports(graph())
    assert not bad, "experiments share helpers through gradprobe/lab/common.py:\n" + "\n".join(bad)


REDUCTIONS = {"mean", "std", "var", "median", "average", "quantile", "percentile",
              "nanmean", "nanstd", "nanvar", "nanmedian"}
"""Calls that compute a statistic; figures read statistics from the experiment's results."""


def statistics_in_figures(source: str) -> list[str]:
    """``function: call`` for every reduction called in plot code: a function named ``plot*``
    or one that imports the figure styling (``gradprobe.report.style``), nested code included."""

    def draws(fn: ast.FunctionDef) -> bool:
        if fn.name.lstrip("_").startswith("plot"):
            return True
        return any(isinstance(n, ast.ImportFrom) and n.module == "gradprobe.report"
                   and any(a.name == "style" for a in n.names) for n in ast.walk(fn))

    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.FunctionDef) and draws(fn):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    if name in REDUCTIONS:
                        found.append(f"{fn.name}: {ast.unparse(node)}")
    return found


def test_a_planted_statistic_in_a_figure_is_found():
    src = ("def plot(r):\n    return r.tables['x'].mean()\n"
           "def _grid(r):\n    from gradprobe.report import style\n"
           "    def inner(f):\n        return np.std(f)\n    return inner\n"
           "def run(c):\n    return c.x.mean()\n")
    assert statistics_in_figures(src) == ["plot: r.tables['x'].mean()", "_grid: np.std(f)"]


def test_figures_compute_no_statistics():
    bad = [f"{path_of(m)}: {hit}" for m, p in modules().items() if m.startswith(EXPERIMENTS)
           for hit in statistics_in_figures(p.read_text(encoding="utf-8"))]
    assert not bad, "figures read statistics from the results, they do not compute them:\n" + \
        "\n".join(bad)


MAX_LINES = 500
"""Each module holds one concept a reader can keep in mind (issue 9): at most this many lines."""

LONG_MODULES: set[str] = {
    # Modules allowed over MAX_LINES while being split; remove an entry once its module is under
    # the limit (test_the_allow_list_is_not_stale says when). Empty: every module is under it.
}


def too_long(lengths: dict[str, int], allowed: set[str], limit: int = MAX_LINES) -> list[str]:
    """``module (n lines)`` for every module over ``limit`` that ``allowed`` does not list."""
    return [f"{m} ({n} lines)" for m, n in sorted(lengths.items()) if n > limit and m not in allowed]


def line_counts() -> dict[str, int]:
    return {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules().items()}


def test_a_planted_long_module_is_found():
    lengths = {"gradprobe.a": MAX_LINES, "gradprobe.b": MAX_LINES + 1, "gradprobe.c": 2000}
    assert too_long(lengths, {"gradprobe.c"}) == [f"gradprobe.b ({MAX_LINES + 1} lines)"]


def test_no_module_is_over_500_lines():
    bad = too_long(line_counts(), LONG_MODULES)
    assert not bad, (f"modules over {MAX_LINES} lines (split them along a seam: one concept per "
                     "file):\n" + "\n".join(bad))


def test_the_allow_list_is_not_stale():
    counts = line_counts()
    stale = sorted(m for m in LONG_MODULES if counts.get(m, 0) <= MAX_LINES)
    assert not stale, f"under {MAX_LINES} lines now (or gone): drop from LONG_MODULES: {stale}"
