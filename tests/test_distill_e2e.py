"""End to end: distill a tiny student on real images with `webkd distill`, check the ledger,
the export (safetensors, ONNX parity, model card), and that a run killed with SIGKILL resumes to
the same ledgers and metrics as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from webkd.pipeline.paths import RunPaths, ledger_name
from webkd.pipeline.records import KEEP_REASONS, LEDGER_REASONS, REJECT_REASONS

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "longsleeve", "pants", "shoes", "t-shirt"]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, clothing, pacs_jpeg):
    """~200 real photos under query folders + PACS images as off-class queries; a saved teacher."""
    from PIL import Image

    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.training.models import build_model, save_weights

    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    for name in CLASSES + ["hat"]:
        k = clothing.class_names.index(name)
        for i in rng.choice(np.flatnonzero(clothing.labels == k), 30, replace=False):
            p = root / "web" / name / f"c{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(clothing.images[i]).save(p, quality=90)
    blobs, meta = pacs_jpeg
    for i in rng.choice(len(blobs), 30, replace=False):
        p = root / "web" / meta.class_names[int(meta.labels[i])] / f"pacs{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blobs[i])
    pre = PreprocessSpec(size=32)
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(name="cnn_small", kwargs={"width": 8}, preprocess=pre), num_classes=len(CLASSES))
    save_weights(teacher, root / "teacher.safetensors")
    cfg = {
        "name": "e2e", "seed": 3,
        "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32, "val_fraction": 0.2},
        "teachers": [{"key": "t", "name": "cnn_small", "kwargs": {"width": 8}, "weights": str(root / "teacher.safetensors"),
                      "preprocess": {"size": 32}}],
        "student": {"name": "cnn_tiny", "preprocess": {"size": 32}},
        "selection": {"knn": {"enabled": True, "k": 5, "min_agree": 0.2}},
        "train": {"method": "kd3", "epochs": 4, "batch_size": 32, "lr": 0.05},
        "index": {"near_dup_threshold": 0.999},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WEBKD_CACHE", None)
    return env


def _distill(scenario: Path, run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "webkd.flows", "distill", "--no-flow", str(scenario / "cfg.yaml"), f"run_dir={run}"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _checkpoint_epoch(run: Path) -> int:
    try:
        return int(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"])
    except Exception:
        return -1


def _ledgers(run: Path) -> dict[str, dict]:
    return {p.name: pq.read_table(p).to_pydict() for _, p in RunPaths(run).ledgers()}


def _assert_same_ledgers(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name])
        for col in a[name]:
            x, y = np.asarray(a[name][col]), np.asarray(b[name][col])
            same = np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else np.array_equal(x, y)
            assert same, f"{name}:{col} differs"


def test_distill_end_to_end_and_kill_resume(scenario):
    t0 = time.time()
    full = scenario / "run_full"
    p = _distill(scenario, full)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out

    # ---- ledger: one file per epoch, every manifest row, the documented reasons --------------
    ledgers = _ledgers(full)
    assert sorted(ledgers) == [ledger_name(e) for e in range(4)]
    manifest = pq.read_table(full / "manifest.parquet").to_pydict()
    for name, t in ledgers.items():
        assert t["id"] == manifest["id"]
        assert set(t["reason"]) <= set(KEEP_REASONS + REJECT_REASONS) == set(LEDGER_REASONS)
        assert not any(k and s == "val" for k, s in zip(t["kept"], t["split"]))
    assert all(np.isnan(v) or v == -1 for v in ledgers[ledger_name(0)]["student_conf"]) or \
        set(ledgers[ledger_name(0)]["student_pred"]) == {-1}        # teacher alone before training
    assert set(ledgers[ledger_name(2)]["student_pred"]) != {-1}      # student in the loop later

    # ---- export: weights, metadata, ONNX parity, model card ----------------------------------
    export = full / "export"
    for f in ("student.safetensors", "student.json", "student.onnx", "model_card.md"):
        assert (export / f).stat().st_size > 0, f
    meta = json.loads((export / "student.json").read_text())
    assert meta["deploy"]["head"] == "kd3" and meta["classes"] == CLASSES
    import onnxruntime as ort

    from webkd.training.export import load_student

    model = load_student(export)
    x = torch.from_numpy(np.load(full / "pixels" / "rgb32_squash.npy")[:16]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.InferenceSession(str(export / "student.onnx")).run(["logits"], {"image": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    card = (export / "model_card.md").read_text()
    assert "Data lineage" in card and "kd3" in card and "webkd distill" in card
    assert f"{meta['parameters']:,}" in card
    from test_flows import assert_reports_agree

    assert_reports_agree(full, out)     # inspect, model card, metrics.json, the CLI line: the same counts

    # ---- kill -9 mid-run, resume, same result ------------------------------------------------
    killed = scenario / "run_killed"
    p = _distill(scenario, killed)
    deadline = time.time() + 240
    while _checkpoint_epoch(killed) < 1 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    stopped_at = _checkpoint_epoch(killed)
    assert 1 <= stopped_at < 3, f"kill landed after epoch {stopped_at}: not a mid-run kill"
    assert not (killed / "export").exists()
    p = _distill(scenario, killed)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "resum" in out.lower()
    _assert_same_ledgers(_ledgers(killed), ledgers)
    m_full = json.loads((full / "metrics.json").read_text())
    m_killed = json.loads((killed / "metrics.json").read_text())
    assert m_killed["history"] == m_full["history"]
    assert m_killed["best_epoch"] == m_full["best_epoch"] and m_killed["best_val"] == m_full["best_val"]
