"""One-way layers: flows -> training -> selection -> pipeline. Only flows/ imports Prefect."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["pipeline", "selection", "training", "flows"]  # each may import only layers to its left


def _top(module: str) -> str:
    """The layer (or third-party package) a module name belongs to: `webkd.training.loop` ->
    `training`; a bare `training.loop` (the pre-namespace spelling) -> `training` too."""
    parts = module.split(".")
    return parts[1] if parts[0] == "webkd" and len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(_top(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(_top(node.module))
    return mods


def _package_files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_layers_import_only_to_their_right():
    bad = []
    for i, pkg in enumerate(LAYERS):
        forbidden = set(LAYERS[i + 1:])
        for f in _package_files(pkg):
            for m in _imports(f) & forbidden:
                bad.append(f"{f.relative_to(ROOT)} imports {m}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_prefect_only_in_flows():
    bad = [f"{f.relative_to(ROOT)}" for pkg in LAYERS[:-1] for f in _package_files(pkg) if "prefect" in _imports(f)]
    assert not bad, "Prefect imported outside flows/: " + ", ".join(bad)


def test_init_files_stay_empty():
    for pkg in LAYERS:
        init = ROOT / pkg / "__init__.py"
        assert init.exists() and init.read_text().strip() == "", f"{init} should be empty"


def test_checker_sees_violations(tmp_path):
    """The walker itself must catch a violating import, or the tests above prove nothing."""
    f = tmp_path / "x.py"
    f.write_text("import prefect\nfrom webkd.training.loop import fit\nimport webkd.selection.policy\n"
                 "from . import sibling\n")
    assert _imports(f) == {"prefect", "training", "selection"}


def test_no_bare_layer_imports():
    """Every project import goes through the installed `webkd` namespace: a bare `import training`
    would load a second copy of the module from the working directory."""
    bad = []
    for f in sorted(ROOT.glob("*/**/*.py")):
        if ".venv" in f.parts or f.parts[len(ROOT.parts)] not in LAYERS + ["tests", "bench"]:
            continue
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            bad += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in LAYERS]
    assert not bad, "bare imports (use webkd.<layer>):\n" + "\n".join(bad)


def test_library_imports_without_prefect():
    import subprocess
    import sys

    code = ("import sys, importlib, pkgutil\n"
            "sys.modules['prefect'] = None\n"  # any import of prefect now raises ImportError
            "for pkg in ('webkd.pipeline', 'webkd.selection', 'webkd.training'):\n"
            "    p = importlib.import_module(pkg)\n"
            "    for m in pkgutil.iter_modules(p.__path__):\n"
            "        importlib.import_module(f'{pkg}.{m.name}')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# no import circles between modules
# --------------------------------------------------------------------------------------------
def _module_files(root: Path, packages: list[str], namespace: str = "webkd") -> dict[str, Path]:
    """`webkd.<package>.<module>` -> its file, for every .py file of the packages under `root`."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = [namespace, *f.relative_to(root).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions (both count).

    `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b`; relative
    imports are resolved against the importing module."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    """No two project modules import each other, directly or through others; imports inside
    functions count as much as module-level ones."""
    cycles = _cycles(_import_edges(_module_files(ROOT, LAYERS)))
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_checker_sees_a_circle(tmp_path):
    """A function-level circle a -> b -> c -> a and a relative import are seen; a one-way import is not."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from webkd.pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from .c import g\n")
    (tmp_path / "pkg" / "c.py").write_text("import os\n\ndef g():\n    import webkd.pkg.a\n")
    (tmp_path / "pkg" / "d.py").write_text("from webkd.pkg.a import x\n")
    modules = _module_files(tmp_path, ["pkg"])
    edges = _import_edges(modules)
    assert edges["webkd.pkg.b"] == {"webkd.pkg.c"} and edges["webkd.pkg.d"] == {"webkd.pkg.a"}
    assert _cycles(edges) == [["webkd.pkg.a", "webkd.pkg.b", "webkd.pkg.c"]]
