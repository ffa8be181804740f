"""bench/seed_methods.py runs end to end at toy sizes (--smoke: one seed, one epoch, small sets).

Slow: it needs the Fashion-MNIST teacher (trained and cached in .cache/ on the first run, about
20 minutes on 2 CPU cores) and runs every table once. `pytest -m slow tests/test_bench_seed_methods.py`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_seed_methods_bench_smoke(tmp_path, clothing, pacs32):
    spec = importlib.util.spec_from_file_location("seed_methods", ROOT / "bench" / "seed_methods.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--smoke", "--out", str(tmp_path)])
    assert set(out) == {"rld", "pll", "mixskd", "unic"}
    assert "RLD (β=" in out["rld"] and "PLL-refined labels" in out["rld"]
    assert "PLL two-hot, paper form" in out["pll"] and "60% noise" in out["pll"]
    assert "MixSKD" in out["mixskd"] and "UNIC student, both teachers" in out["unic"]
    assert (tmp_path / "results.json").exists() and (tmp_path / "tables.md").exists()
    assert (tmp_path / "web_run" / "labels.parquet").exists()    # the refine stage ran on the web pool
