"""bench/scale.py end to end at tiny sizes (300 and 600 real images, local runner, the smallest
encoder): one row per measured stage in the results JSON, with the command, commit, machine and
setup, IVF-PQ reached through a recorded override; a second run with the same options measures
nothing again (no stage process is started), and a run with another setup is refused."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _stamp(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("scale*")} if folder.exists() else {}


@pytest.fixture
def scale(monkeypatch):
    """bench/scale.py as a module; the environment and sys.path it touches are restored afterwards."""
    from webkd.pipeline import datasets

    try:
        datasets.find_file(datasets.TINYIMAGENET_FILE)
        datasets.find_file(datasets.CIFAR10_FILE)
    except datasets.DataNotFound as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_bench_records_rows_and_skips_them_on_a_rerun(scale, tmp_path, monkeypatch):
    results, out = tmp_path / "scale.json", tmp_path / "out"
    argv = ["--sizes", "300", "600", "--runners", "local", "--stages", "ingest", "pixels", "features", "index",
            "--encoder", "cnn_tiny", "--shard-images", "150", "--set", "index.ivfpq_min=300",
            "--out", str(out), "--results", str(results)]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo_results = _stamp(ROOT / "bench" / "results")
    assert scale.main(argv) == 0

    res = json.loads(results.read_text())
    got = {(r["size"], r["runner"], r["phase"], r["stage"]) for r in res["rows"]}
    want = {(n, "local", "full", s) for n in (300, 600) for s in ("ingest", "pixels", "features", "index")}
    assert got == want | {(300, "-", "full", "generate"), (600, "-", "full", "generate")}
    rows = {(r["size"], r["stage"]): r for r in res["rows"]}
    for n in (300, 600):
        assert rows[(n, "ingest")]["records"] == n and rows[(n, "ingest")]["images"] == n
        assert rows[(n, "features")]["rows"] == n and rows[(n, "features")]["dim"] == 16
        assert rows[(n, "index")]["factory"].startswith("IVF") and ",PQ" in rows[(n, "index")]["factory"]
        assert 0 < rows[(n, "index")]["recall_at_10"] <= 1
        assert rows[(n, "generate")]["images"] == n and rows[(n, "generate")]["shards"] == n // 150
        for stage in ("ingest", "pixels", "features", "index"):
            r = rows[(n, stage)]
            assert r["seconds"] > 0 and r["peak_mb"] > 0 and r["anon_peak_mb"] > 0 and not r.get("resumed")
    assert res["setup"]["overrides"] == ["index.ivfpq_min=300"] and res["setup"]["encoder"] == "cnn_tiny"
    assert res["command"].startswith("python bench/scale.py --sizes 300 600") and res["commit"]
    assert res["machine"]["cores"] == os.cpu_count() and res["machine"]["ram_gb"] > 0
    assert "local/ingest" in res["summary"]["growth"]
    assert results.with_suffix(".png").stat().st_size > 0
    assert _stamp(ROOT / "bench" / "results") == repo_results            # nothing written to bench/results/
    # the shards were generated once and the runs' tar sources are img2dataset-shaped
    assert sorted(p.name for p in out.glob("pool-*/*.tar")) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert len(list(out.glob("pool-*/*.parquet"))) == 4

    # the same command again: every row is recorded, no stage process starts
    def no_child(self, job, name):
        raise AssertionError(f"{name} ran again")

    monkeypatch.setattr(scale.Bench, "child", no_child)
    before = {(r["size"], r["stage"]): r["seconds"] for r in res["rows"]}
    assert scale.main(argv) == 0
    again = json.loads(results.read_text())
    assert {(r["size"], r["stage"]): r["seconds"] for r in again["rows"]} == before

    # another setup is refused instead of mixing its rows with these
    with pytest.raises(SystemExit, match="another setup"):
        scale.main([*argv[:-4], "--encoder", "cnn_small", "--out", str(out), "--results", str(results)])
