"""One writer per run directory (issue 12, item 2), with real processes: a second writer fails at
once with one line naming the holder (pid, host, start time) and a non-zero exit code, no
traceback; a lock left by a process killed with SIGKILL is taken over; two `webkd ingest` runs
started together on one run directory leave the same manifest as one run."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from webkd.pipeline.paths import RunPaths

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "pants"]

HOLD = """
import sys, time
from webkd.pipeline.storage import run_lock
with run_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def setup(clothing, tmp_path_factory) -> Path:
    from conftest import write_query_folder

    names = list(clothing.class_names)
    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:12] for c in CLASSES])
    root = tmp_path_factory.mktemp("lock")
    write_query_folder(root / "web", clothing.images[idx], clothing.labels[idx], names)
    cfg = {"run_dir": str(root / "run"),
           "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32},
           "teachers": [{"key": "t", "name": "cnn_tiny"}], "student": {"key": "s", "name": "cnn_tiny"},
           "train": {"method": "kd", "epochs": 1, "batch_size": 8}, "export": {"onnx": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")


def _webkd(*argv: str, wait: bool = True):
    p = subprocess.Popen([sys.executable, "-m", "webkd.flows", *argv], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def _hold(lock: Path, seconds: float = 120) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _one_line_naming(err: str, pid: int) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"pid {pid}" in err and socket.gethostname() in err and "started" in err, err


def test_second_writer_fails_at_once_naming_the_holder_then_takes_over_a_killed_one(setup, tmp_path):
    run = tmp_path / "run"
    lock = RunPaths(run).lock
    holder = _hold(lock)
    try:
        t0 = time.time()
        rc, _, err = _webkd("ingest", str(setup / "cfg.yaml"), f"run_dir={run}")
        assert rc != 0
        _one_line_naming(err, holder.pid)
        assert not (run / "manifest.parquet").exists()
        rc, _, err = _webkd("override", str(run), "--reject", "abc")
        assert rc != 0
        _one_line_naming(err, holder.pid)
        assert not (run / "overrides.json").exists()
        assert time.time() - t0 < 120, "a second writer must fail at once, not wait"
    finally:
        holder.send_signal(signal.SIGKILL)   # dies holding it: the holder file stays behind
        holder.wait()
    assert (lock.parent / (lock.name + ".json")).exists()
    rc, out, err = _webkd("ingest", str(setup / "cfg.yaml"), f"run_dir={run}")
    assert rc == 0, err
    assert "taking over the lock" in err and f"pid {holder.pid}" in err, err
    assert pq.read_table(run / "manifest.parquet").num_rows == 24
    assert not (lock.parent / (lock.name + ".json")).exists()   # released at the end


def test_two_ingests_at_once_lose_nothing(setup, tmp_path):
    ref = tmp_path / "ref"
    rc, _, err = _webkd("ingest", str(setup / "cfg.yaml"), f"run_dir={ref}")
    assert rc == 0, err
    run = tmp_path / "run"
    a = _webkd("ingest", str(setup / "cfg.yaml"), f"run_dir={run}", wait=False)
    b = _webkd("ingest", str(setup / "cfg.yaml"), f"run_dir={run}", wait=False)
    outputs = [p.communicate(timeout=300) for p in (a, b)]
    results = [(p.returncode, out, err) for p, (out, err) in zip((a, b), outputs)]
    assert any(rc == 0 for rc, _, _ in results), results
    for (rc, _, err), other in zip(results, (b, a)):
        if rc != 0:   # the one that came second: one line naming the other
            _one_line_naming(err, other.pid)
    got = pq.read_table(run / "manifest.parquet").to_pydict()
    want = pq.read_table(ref / "manifest.parquet").to_pydict()
    assert got["id"] == want["id"] and got["uri"] == want["uri"]
    assert pq.read_table(run / "quarantine.parquet").num_rows == pq.read_table(ref / "quarantine.parquet").num_rows


def test_distill_no_flow_refuses_a_run_directory_in_use(setup, tmp_path):
    run = tmp_path / "run"
    holder = _hold(RunPaths(run).lock)
    try:
        rc, _, err = _webkd("distill", "--no-flow", str(setup / "cfg.yaml"), f"run_dir={run}")
        assert rc != 0
        _one_line_naming(err, holder.pid)
        assert not (run / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
