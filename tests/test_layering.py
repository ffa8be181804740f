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
