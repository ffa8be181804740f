"""Checkpoints belong to the pool they were trained on and never execute code (issue 12, items
1 and 3), with real `webkd distill --no-flow` processes on real photos:

- a source that grew is trained on: the old `last.pt` is not resumed, the ledgers cover the new
  pool, the export changes, and student.json / metrics.json / the model card name the pool used;
- a planted (code-running), truncated or foreign `last.pt` / `best.pt` is ignored with a warning
  and training starts fresh: never executed, never a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.storage import ids_sha256

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "pants"]


@pytest.fixture(scope="module")
def clothing_photos(clothing):
    names = list(clothing.class_names)
    return clothing, names


def _setup(root: Path, clothing, names, per_class: int = 10, epochs: int = 2) -> Path:
    from conftest import write_query_folder

    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:per_class] for c in CLASSES])
    write_query_folder(root / "web", clothing.images[idx], clothing.labels[idx], names)
    cfg = {"run_dir": str(root / "run"), "seed": 1,
           "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32, "val_fraction": 0.25},
           "teachers": [{"key": "t", "name": "cnn_tiny"}], "student": {"key": "s", "name": "cnn_tiny"},
           "train": {"method": "kd", "epochs": epochs, "batch_size": 8}, "export": {"onnx": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cfg.yaml"


def _distill(cfg: Path) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    p = subprocess.run([sys.executable, "-m", "webkd.flows", "distill", "--no-flow", str(cfg)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_grown_source_trains_on_the_new_pool(clothing_photos, tmp_path):
    clothing, names = clothing_photos
    cfg = _setup(tmp_path, clothing, names)
    run = RunPaths(tmp_path / "run")
    rc, out = _distill(cfg)
    assert rc == 0, out
    weights_before = _sha(run.export_dir / "student.safetensors")

    from conftest import write_query_folder   # the source grows by 8 photos

    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[20:24] for c in CLASSES])
    write_query_folder(tmp_path / "web", clothing.images[idx], clothing.labels[idx], names, prefix="new")
    rc, out = _distill(cfg)
    assert rc == 0, out
    assert "resuming" not in out, out
    assert "trained on another pool (20 rows, now 28)" in out, out
    ids = pq.read_table(run.manifest, columns=["id"])["id"].to_pylist()
    assert len(ids) == 28
    for _, ledger in run.ledgers():                          # every epoch decided over the new pool
        assert pq.read_table(ledger, columns=["id"])["id"].to_pylist() == ids
    assert _sha(run.export_dir / "student.safetensors") != weights_before
    meta = json.loads((run.export_dir / "student.json").read_text())
    assert meta["trained_on"]["rows"] == 28 and meta["trained_on"]["ids_sha256"] == ids_sha256(ids)
    metrics = json.loads(run.metrics.read_text())
    assert metrics["trained_on"]["ids_sha256"] == ids_sha256(ids) and len(metrics["history"]) == 2
    assert "pool: 28 records" in (run.export_dir / "model_card.md").read_text()

    rc, out = _distill(cfg)                                   # nothing changed: resumes, trains nothing
    assert rc == 0, out
    assert "resuming after epoch 1" in out, out


class _Payload:
    """Unpickling this writes a marker file: torch.load(weights_only=False) would run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


def _plant(path: Path, kind: str, marker: Path, good: Path) -> None:
    if kind == "malicious":            # torch's zip format, one entry runs code when unpickled
        torch.save({"epoch": 0, "student": {}, "x": _Payload(str(marker))}, path)
    elif kind == "malicious_pickle":   # a bare pickle (torch's legacy format)
        with open(path, "wb") as fh:
            pickle.dump({"epoch": _Payload(str(marker)), "student": {}}, fh)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":              # plain tensors, but no record of a pool: some other run's file
        torch.save({"epoch": 0, "student": {"w": torch.zeros(3)}, "method": {}}, path)
    elif kind == "same_identity_wrong_content":   # claims this run, holds other shapes
        ck = torch.load(good, weights_only=True)
        ck["student"] = {k: torch.zeros(1) for k in ck["student"]}
        torch.save(ck, path)


@pytest.mark.parametrize("which", ["last", "best"])
def test_planted_truncated_or_foreign_checkpoint_is_ignored(clothing_photos, tmp_path, which):
    clothing, names = clothing_photos
    cfg = _setup(tmp_path, clothing, names, per_class=8, epochs=1)
    run = RunPaths(tmp_path / "run")
    rc, out = _distill(cfg)
    assert rc == 0, out
    good = tmp_path / "good.pt"
    good.write_bytes(run.last_checkpoint.read_bytes())
    kinds = ["malicious", "malicious_pickle", "truncated", "foreign", "same_identity_wrong_content"] \
        if which == "last" else ["malicious"]
    for kind in kinds:
        marker = tmp_path / f"executed_{kind}"
        target = run.last_checkpoint if which == "last" else run.best_checkpoint
        _plant(target, kind, marker, good)
        rc, out = _distill(cfg)
        assert rc == 0, (kind, out)
        assert not marker.exists(), f"{kind}: the planted checkpoint ran code"
        assert "Traceback" not in out, (kind, out)
        assert "ignoring" in out and "training from scratch" in out, (kind, out)
        assert "resuming" not in out, (kind, out)
        assert "epoch 0: loss" in out, (kind, out)                   # trained again from epoch 0
        assert [h["epoch"] for h in json.loads(run.metrics.read_text())["history"]] == [0], kind
        torch.load(run.last_checkpoint, weights_only=True)        # what it wrote is plain again
        torch.load(run.best_checkpoint, weights_only=True)
