"""bench/cifar_tinyimagenet.py at a tiny scale on the real data: a 200-image Tiny ImageNet pool,
100 CIFAR-10 test images, a teacher trained 1 epoch on 500 CIFAR-10 images, two rows of 1 epoch;
the results file has the issue's shape and a second call skips the finished rows. Plus the
scenario's config (label_map keys are real Tiny ImageNet queries) and its data loaders."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from webkd.pipeline import datasets
from webkd.pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "flows" / "configs" / "cifar_tinyimagenet.yaml"


@pytest.fixture(scope="module")
def tiny_meta():
    try:
        return datasets.tinyimagenet_jpeg_bytes()[1]
    except datasets.DataNotFound as exc:
        pytest.skip(str(exc))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cifar_tinyimagenet", ROOT / "bench" / "cifar_tinyimagenet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_label_map_names_real_queries_and_cifar_classes(tiny_meta):
    raw = yaml.safe_load(CONFIG.read_text())
    queries = {datasets.safe_name(c) for c in tiny_meta.class_names}
    label_map = raw["data"]["label_map"]
    assert set(label_map) <= queries, sorted(set(label_map) - queries)
    assert raw["data"]["classes"] == datasets.CIFAR10_CLASSES
    mapped = {c for c in label_map.values() if c}
    assert {"automobile", "bird", "cat", "dog", "frog", "ship", "truck"} <= mapped
    assert label_map["sports car"] == "automobile" and label_map["tabby"] == "cat"
    assert "lion" not in label_map and "cougar" not in label_map     # ambiguous: left off-class
    cfg = load_config(CONFIG, ["teachers.0.weights=null"])
    assert cfg.teachers[0].name == "resnet_narrow" and cfg.student.name == "cnn_small"


def test_loaders_decode_the_containers(tiny_meta, monkeypatch, tmp_path):
    test = datasets.load_cifar10("test")
    assert test.images.shape == (10000, 32, 32, 3) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10 and test.class_names == datasets.CIFAR10_CLASSES
    assert len(tiny_meta.labels) == 60600 and len(tiny_meta.class_names) == 202 and tiny_meta.class_words
    with pytest.raises(ValueError, match="split"):
        datasets.load_cifar10("val")
    small, large = datasets.pool_subset(60600, 100), datasets.pool_subset(60600, 300)
    assert len(small) == 100 and set(small) <= set(large)          # a smaller pool is part of a larger one
    monkeypatch.setattr(datasets, "data_dirs", lambda data_dir=None: [tmp_path])
    with pytest.raises(datasets.DataNotFound, match="cifar10/cifar10_jpeg.npz not found"):
        datasets.load_cifar10("train")
    with pytest.raises(datasets.DataNotFound, match="tinyimagenet_32_jpeg.npz not found"):
        datasets.load_tinyimagenet()


def test_bench_tiny_scale_and_resume(tmp_path, monkeypatch, one_thread, tiny_meta):
    monkeypatch.setenv("WEBKD_CACHE", str(tmp_path / "cache"))
    bench = _bench()
    results = tmp_path / "cifar_tinyimagenet.json"
    argv = ["--pool-size", "200", "--test-size", "100", "--seeds", "0", "--epochs", "1", "--batch-size", "32",
            "--rows", "upper_bound,vanilla_kd", "--train-teacher", "--teacher-epochs", "1",
            "--teacher-train-size", "500", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data"),
            "--results", str(results)]
    out = bench.main(argv)
    web = tmp_path / "data" / "web_n200"
    assert sum(1 for _ in web.rglob("*.jpg")) == 200
    assert sum(1 for _ in (tmp_path / "data" / "test_n100").rglob("*.jpg")) == 100
    saved = json.loads(results.read_text())
    assert saved["rows"] == out["rows"] and set(saved["rows"]) == {"upper_bound", "vanilla_kd"}
    for row in saved["rows"].values():
        assert set(row) >= {"test_acc", "mean", "spread", "kept_fraction", "minutes"}
        assert len(row["test_acc"]) == 1 and 0 <= row["mean"] <= 100 and row["kept_fraction"] == 1.0
    assert saved["roles"] == {"upper_bound": "upper_bound", "vanilla_kd": "vanilla_kd"}
    assert saved["command"].startswith("python bench/cifar_tinyimagenet.py") and saved["commit"]
    rec = json.loads((tmp_path / "out" / "results.json").read_text())
    mtime = (tmp_path / "out" / "results.json").stat().st_mtime_ns
    # resume: every (row, seed) is recorded, so nothing trains again
    called = []
    monkeypatch.setattr(bench.distill_stages, "distill", lambda cfg: called.append(cfg) or None)
    again = bench.main(argv)
    assert not called and again["rows"] == out["rows"]
    assert (tmp_path / "out" / "results.json").stat().st_mtime_ns == mtime
    assert rec["results"]["upper_bound"][0]["seed"] == 0


def test_random_row_copies_the_size_of_a_selecting_row():
    bench = _bench()
    res = {"default": [{"seed": 0, "kept_fraction": 1.0}], "paper_kd3": [{"seed": 0, "kept_fraction": 0.42}]}
    assert bench.random_size(res, 0) == (0.42, "paper_kd3")       # a default that selects nothing is skipped
    assert bench.random_size(res, 1) == (0.42, "paper_kd3")       # the share is the config's: any seed's run
    res["default"] = [{"seed": 1, "kept_fraction": 0.5}]
    assert bench.random_size(res, 0) == (0.5, "default") == bench.random_size(res, 1)
    with pytest.raises(SystemExit, match="random_selection needs"):
        bench.random_size({"default": [{"seed": 0, "kept_fraction": 1.0}]}, 0)
    recs = {"vanilla_kd": [{"seed": 1, "test_acc": 0.5, "kept_fraction": 1.0, "seconds": 60},
                           {"seed": 0, "test_acc": 0.6, "kept_fraction": 1.0, "seconds": 120}]}
    s = bench.summarize(recs, ["vanilla_kd", "default"], {"vanilla_kd": "vanilla_kd", "default": "default"}, "cmd")
    assert s["rows"] == {"vanilla_kd": {"test_acc": [60.0, 50.0], "mean": 55.0, "spread": 7.07, "kept_fraction": 1.0,
                                        "minutes": 1.5, "seeds": [0, 1]}}
    assert s["roles"] == {"vanilla_kd": "vanilla_kd"} and s["command"] == "cmd"
