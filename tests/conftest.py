"""Shared fixtures: real image data from ../shared/data, written as real files."""
from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect state of tests (cache records, the database of CLI flow runs) stays out of the project's
# .prefect/; one folder per user, so its database is migrated once, not in every session
os.environ.setdefault("PREFECT_HOME", os.path.join(tempfile.gettempdir(), f"webkd-test-prefect-{os.getuid()}"))

# every process a test starts inherits this: what still carries it when the session ends was left
# behind (pytest_sessionfinish below); PYTEST_CURRENT_TEST alone would also match other sessions'
SESSION_ENV = "WEBKD_TEST_SESSION"
os.environ[SESSION_ENV] = f"{os.getpid()}-{secrets.token_hex(4)}"

import procs  # noqa: E402
from webkd.flows.prefect_env import local_defaults  # noqa: E402
from webkd.pipeline import datasets  # noqa: E402

local_defaults()  # the CLI's Prefect defaults, for flows called in-process


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    spin-waiting made each conv ~100x slower; the setting is restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def clothing() -> datasets.ImageSet:
    try:
        return datasets.load_clothing()
    except datasets.DataNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pacs32() -> datasets.ImageSet:
    try:
        return datasets.load_pacs(size=32)
    except datasets.DataNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pacs_jpeg():
    """(list of real JPEG byte strings, ImageSet metadata) for PACS at 64 px."""
    try:
        return datasets.pacs_jpeg_bytes()
    except datasets.DataNotFound as exc:
        pytest.skip(str(exc))


def write_query_folder(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                       fmt: str = "JPEG", prefix: str = "img") -> list[Path]:
    """Write images as real files into <root>/<query>/<prefix>_<i>.<ext> (folder: source layout)."""
    from PIL import Image

    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    out = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = root / class_names[int(lab)]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{prefix}_{i:05d}.{ext}"
        Image.fromarray(img).save(p, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        out.append(p)
    return out


def clothing_web(root: Path, clothing: datasets.ImageSet, per_query: dict[str, int], seed: int) -> Path:
    """Real clothing photos as <root>/web/<query>/c<i>.jpg, `per_query[q]` drawn (seeded) from query q."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, n in per_query.items():
        k = clothing.class_names.index(name)
        for i in rng.choice(np.flatnonzero(clothing.labels == k), n, replace=False):
            p = root / "web" / name / f"c{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(clothing.images[i]).save(p, quality=90)
    return root / "web"


def tiny_teacher(root: Path, num_classes: int) -> Path:
    """An untrained `cnn_small` width-8 teacher (seed 0) saved as <root>/teacher.safetensors."""
    import torch

    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.training.models import build_model, save_weights

    torch.manual_seed(0)
    teacher = build_model(ModelSpec(name="cnn_small", kwargs={"width": 8}, preprocess=PreprocessSpec(size=32)),
                          num_classes=num_classes)
    return save_weights(teacher, root / "teacher.safetensors")


@pytest.fixture
def query_folder_factory(tmp_path):
    def make(images, labels, class_names, name="web", fmt="JPEG", prefix="img"):
        root = tmp_path / name
        write_query_folder(root, images, labels, class_names, fmt=fmt, prefix=prefix)
        return root
    return make


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (fresh SQLite database) shared by every flow test; the first
    start migrates the database, which takes up to a minute on a loaded 2-core machine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _left_behind(session) -> dict[int, bytes]:
    """Live processes started by this session: carrying its token, or a PREFECT_HOME under its tmp."""
    found = procs.scan({SESSION_ENV: os.environ[SESSION_ENV]})
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)      # only if a test made one (never created here)
    if base is not None:
        found.update(procs.scan(env_prefix=("PREFECT_HOME", str(base) + os.sep)))
    return found


@pytest.hookimpl(trylast=True)           # after the runner tore down the session fixtures
def pytest_sessionfinish(session, exitstatus):
    """A session leaves no process behind: what it started and is still running a few seconds
    after the last test (a watchdog stopping servers takes up to ~6 s) is listed, killed, and
    fails the session. One /proc scan when there is nothing to find."""
    if not os.path.isdir("/proc"):
        return
    server = sys.modules.get("prefect.server.api.server")
    for s in list(getattr(server, "SubprocessASGIServer", type("_", (), {"_instances": {}}))._instances.values()):
        s.stop()                          # in-process temporary servers: stopped at exit anyway
    found = _left_behind(session)
    for _ in range(3):                    # a process spawned by the last test a few ms ago was seen to be
        if found:                         # missed by the first /proc scan: look again before concluding
            break
        time.sleep(0.2)
        found = _left_behind(session)
    left = procs.wait_gone(lambda: _left_behind(session), timeout_s=10) if found else {}
    if not left:
        return
    lines = [f"left behind: {procs.describe(pid, cmd)} (started in {procs.env_of(pid, 'PYTEST_CURRENT_TEST') or '?'})"
             for pid, cmd in sorted(left.items())]
    procs.kill(left)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_sep("=", f"{len(left)} process(es) left behind by this test session (killed now)", red=True)
        for line in lines:
            tr.write_line(line)
    else:
        print("\n".join(lines), file=sys.stderr)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
