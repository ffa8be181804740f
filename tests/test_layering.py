"""One-way layers: flows -> training -> selection -> pipeline. Only flows/ imports Prefect."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["pipeline", "selection", "training", "flows"]  # each may import only layers to its left


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
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
    f.write_text("import prefect\nfrom training.loop import fit\nfrom . import sibling\n")
    assert _imports(f) == {"prefect", "training"}


def test_library_imports_without_prefect():
    import subprocess
    import sys

    code = ("import sys, importlib, pkgutil\n"
            "sys.modules['prefect'] = None\n"  # any import of prefect now raises ImportError
            "for pkg in ('pipeline', 'selection', 'training'):\n"
            "    p = importlib.import_module(pkg)\n"
            "    for m in pkgutil.iter_modules(p.__path__):\n"
            "        importlib.import_module(f'{pkg}.{m.name}')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
