"""One ingest round commits atomically (issue 12, item 4): a real `run_ingest` process is killed
with SIGKILL after each of its writes in turn (`WEBKD_KILL_AT_WRITE=N`, counted by
pipeline/storage), re-run, and its run directory must equal that of an uninterrupted run: no
doubled quarantine rows, no lost or repeated records, no leftover staging files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from webkd.pipeline.storage import KILL_AT_WRITE

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "pants", "shoes"]

INGEST = """
import sys
from webkd.pipeline.config import IngestConfig, RunPaths
from webkd.pipeline.ingest import run_ingest
run_ingest([f"folder:{sys.argv[1]}"], RunPaths(sys.argv[2]), IngestConfig(min_side=8), workers=1)
"""


@pytest.fixture(scope="module")
def web(clothing, tmp_path_factory) -> Path:
    """Real photos in query folders, plus a copy under another query (a duplicate row) and a
    broken file (a quarantine row): both kinds of quarantine rows a re-run could double."""
    from conftest import write_query_folder

    names = list(clothing.class_names)
    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:4] for c in CLASSES])
    root = tmp_path_factory.mktemp("commit") / "web"
    files = write_query_folder(root, clothing.images[idx], clothing.labels[idx], names)
    (root / "pants" / "copy_of_a_dress.jpg").write_bytes(files[0].read_bytes())
    (root / "shoes" / "broken.jpg").write_bytes(files[1].read_bytes()[:200])
    return root


def _ingest(web: Path, run: Path, kill_at: int | None = None) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(KILL_AT_WRITE, None)
    if kill_at is not None:
        env[KILL_AT_WRITE] = str(kill_at)
    return subprocess.run([sys.executable, "-c", INGEST, str(web), str(run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120).returncode


def _state(run: Path) -> dict:
    """Everything ingest leaves in a run directory, file names and table contents."""
    out = {"files": sorted(p.name for p in run.iterdir())}
    for name in ("manifest.parquet", "quarantine.parquet", "ingest_state.parquet"):
        out[name] = pq.read_table(run / name).to_pylist() if (run / name).exists() else None
    return out


def _grow(web: Path, clothing, n: int = 3) -> None:
    """A second round's new files: more photos, one more copy, one more broken file."""
    from conftest import write_query_folder

    names = list(clothing.class_names)
    idx = np.flatnonzero(clothing.labels == names.index("dress"))[10:10 + n]
    files = write_query_folder(web, clothing.images[idx], clothing.labels[idx], names, prefix="more")
    (web / "shoes" / "copy_of_more.jpg").write_bytes(files[0].read_bytes())
    (web / "dress" / "broken2.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 50)


@pytest.mark.parametrize("round_killed", [0, 1])
def test_sigkill_after_every_write_resumes_to_the_same_run(web, clothing, tmp_path, round_killed):
    src = tmp_path / "web"
    import shutil

    shutil.copytree(web, src)   # each parametrization grows its own copy
    first = tmp_path / "first"
    assert _ingest(src, first) == 0
    ref = tmp_path / "ref"
    shutil.copytree(first, ref)
    if round_killed == 1:
        _grow(src, clothing)
        assert _ingest(src, ref) == 0
    expected = _state(ref)
    assert expected["quarantine.parquet"] and {r["reason"] for r in expected["quarantine.parquet"]} >= {"duplicate"}

    killed_at = []
    for n in range(1, 40):
        run = tmp_path / f"kill{n}"
        if round_killed == 0:
            rc = _ingest(src, run, kill_at=n)
        else:
            shutil.copytree(first, run)
            rc = _ingest(src, run, kill_at=n)
        if rc == 0:       # fewer than n writes: every kill point was covered
            assert _state(run) == expected
            break
        assert rc == -signal.SIGKILL, rc
        killed_at.append(n)
        assert _ingest(src, run) == 0, f"re-run after a kill at write {n} failed"
        got = _state(run)
        assert got == expected, f"kill after write {n}: run directory differs from an uninterrupted run"
    assert len(killed_at) >= 7, killed_at   # 3 staged files + commit + 3 renames + commit removal
