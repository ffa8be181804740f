"""Damaged state never stops every later run (issue 12, item 8), on real files:

- records a user owns (`registry.json`, `overrides.json`) keep their last good copy beside them
  (`<name>.bak`, written with every change); a truncated one fails with one line naming the file
  and the command that restores it, and after that command everything works again;
- in a finished run, a truncated `metrics.json` is written again from the checkpoint's history, and
  a truncated final ledger makes the run train again from scratch (seeded: the same ledger, the
  same metrics), instead of a JSON / Parquet error on every re-run.

(A truncated or foreign `last.pt` is tests/test_checkpoints.py; damaged cache sidecars are
tests/test_cache_integrity.py.)
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.storage import backup_path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "pants"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*argv: str) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "webkd.flows", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _restore_command(line: str) -> list[str]:
    """The `cp BAK FILE` the one-line error proposes."""
    assert "restore the last good copy with `cp " in line, line
    return shlex.split(line.split("`")[1])


def test_truncated_overrides_store_is_one_line_and_its_last_good_copy_restores_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    a, b = "a" * 64, "b" * 64
    assert _cli("override", str(run), "--accept", a)[0] == 0
    assert _cli("override", str(run), "--reject", b, "--note", "wrong class")[0] == 0
    store = RunPaths(run).overrides
    assert json.loads(backup_path(store).read_text()) == json.loads(store.read_text())
    _truncate(store)

    rc, out = _cli("override", str(run))
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in out, out
    assert str(store) in lines[0] and "not valid JSON" in lines[0]
    cmd = _restore_command(lines[0])
    assert cmd == ["cp", str(backup_path(store)), str(store)]
    subprocess.run(cmd, check=True)
    rc, out = _cli("override", str(run))
    assert rc == 0 and f"accept {a}" in out and f"reject {b}" in out and "2 override(s)" in out


def test_truncated_registry_is_one_line_and_its_last_good_copy_restores_it(tmp_path):
    from webkd.flows.__main__ import _user_error
    from webkd.training.registry import Registry, RegistryError, load_registry, save_registry

    path = RunPaths(tmp_path / "run").registry
    reg = Registry(champion="v0001", entries=[{"version": "v0001", "kind": "distill", "export": "students/v0001"}])
    save_registry(path, reg)
    reg.entries.append({"version": "v0002", "kind": "refresh", "export": "students/v0002"})
    save_registry(path, reg)
    _truncate(path, 0.6)
    with pytest.raises(RegistryError) as exc:
        load_registry(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and _user_error(exc.value)   # the CLI prints it as one line
    subprocess.run(_restore_command(msg), check=True)
    assert [e["version"] for e in load_registry(path).entries] == ["v0001", "v0002"]

    # no good copy beside it: the line says to fix it or move it aside, never a traceback
    backup_path(path).write_text("{")
    _truncate(path, 0.3)
    with pytest.raises(RegistryError, match=r"move it aside \(mv "):
        load_registry(path)


@pytest.fixture
def finished_run(clothing, tmp_path):
    from conftest import write_query_folder

    names = list(clothing.class_names)
    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:10] for c in CLASSES])
    write_query_folder(tmp_path / "web", clothing.images[idx], clothing.labels[idx], names)
    import torch

    from webkd.pipeline.config import ModelSpec
    from webkd.training.models import build_model, save_weights

    torch.manual_seed(0)   # a teacher with fixed weights: training again from scratch is the same run
    teacher = save_weights(build_model(ModelSpec(name="cnn_tiny"), num_classes=len(CLASSES)),
                           tmp_path / "teacher.safetensors")
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 1,
           "data": {"sources": [f"folder:{tmp_path / 'web'}"], "classes": CLASSES, "image_size": 32,
                    "val_fraction": 0.25},
           "teachers": [{"key": "t", "name": "cnn_tiny", "weights": str(teacher)}],
           "student": {"key": "s", "name": "cnn_tiny"},
           "train": {"method": "kd", "epochs": 2, "batch_size": 8}, "export": {"onnx": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    rc, out = _cli("distill", "--no-flow", str(tmp_path / "cfg.yaml"))
    assert rc == 0, out[-3000:]
    return tmp_path / "cfg.yaml", RunPaths(tmp_path / "run")


def test_damaged_metrics_and_final_ledger_of_a_finished_run_are_rebuilt(finished_run):
    cfg, paths = finished_run
    metrics = json.loads(paths.metrics.read_text())
    ledger = pq.read_table(paths.ledger(1))
    weights = (paths.export_dir / "student.safetensors").read_bytes()
    assert len(metrics["history"]) == 2 and "final" in metrics

    _truncate(paths.metrics)
    rc, out = _cli("distill", "--no-flow", str(cfg))
    assert rc == 0 and "Traceback" not in out, out[-3000:]
    assert "resuming after epoch 1" in out                             # nothing trained again
    assert f"{paths.metrics} is damaged" in out
    fixed = json.loads(paths.metrics.read_text())
    assert json.dumps(fixed["history"]) == json.dumps(metrics["history"])
    assert fixed["final"]["val_acc"] == metrics["final"]["val_acc"]

    _truncate(paths.ledger(1))
    rc, out = _cli("distill", "--no-flow", str(cfg))
    assert rc == 0 and "Traceback" not in out, out[-3000:]
    assert "resuming" not in out and "epoch_001.parquet it stands on is damaged" in out
    again = pq.read_table(paths.ledger(1))                           # the same ledger, written anew (NaN == NaN)
    assert again.schema.equals(ledger.schema) and json.dumps(again.to_pylist()) == json.dumps(ledger.to_pylist())
    assert json.dumps(json.loads(paths.metrics.read_text())["history"]) == json.dumps(metrics["history"])
    assert (paths.export_dir / "student.safetensors").read_bytes() == weights
