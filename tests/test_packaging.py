"""The built wheel: everything under one `webkd` namespace, nothing else at top level, and an
install of it into a fresh virtual environment runs `webkd --help`."""
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked files, so the checkout gets no build/ folder and nothing
    untracked (runs, caches) can slip into the wheel."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("webkd-*.whl")
    return whl


def test_wheel_holds_only_the_webkd_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"webkd"}, f"top-level entries besides webkd: {sorted(top - {'webkd'})}"
    for layer in ("pipeline", "selection", "training", "flows"):
        assert f"webkd/{layer}/__init__.py" in names
    # package data travels: shipped configs, the demo teacher, the gallery page assets
    assert any(n.startswith("webkd/flows/configs/") and n.endswith(".yaml") for n in names)
    assert any(n.startswith("webkd/flows/assets/") and n.endswith(".safetensors") for n in names)
    assert "webkd/selection/gallery_assets/app.js" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "webkd = webkd.flows.__main__:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_wheel_installs_into_a_fresh_venv_and_runs(wheel, tmp_path):
    """A fresh venv gets the wheel (no dependencies resolved: they come from this environment's
    site-packages through a .pth line, as the registry is not the point here); its `webkd` runs
    from the installed copy, in a folder that has no source checkout, and finds its package data
    (gallery assets, shipped configs) by package name."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = Path(sysconfig.get_paths()["purelib"])
    (Path(site) / "deps.pth").write_text(f"{deps}\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # the editable install of this checkout (in deps) must not answer: only the wheel's copy
    code = ("import webkd.flows.__main__ as m, webkd.pipeline.config as c, sys; print(c.__file__); "
            "from webkd.selection.gallery import page_asset; assert 'WEBKD' in page_asset('app.js'); "
            "from webkd.flows import demo, cifar; assert demo.CONFIG.exists() and cifar.CONFIG.exists(); "
            "sys.argv = ['webkd', '--help']; m.main()")
    run = subprocess.run([str(py), "-s", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(env_dir) in run.stdout.splitlines()[0], run.stdout.splitlines()[0]
    assert "usage: webkd" in run.stdout
    cli = subprocess.run([str(env_dir / "bin" / "webkd"), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0 and "usage: webkd" in cli.stdout, cli.stderr[-2000:]
