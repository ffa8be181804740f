"""An export is complete or absent, and a refresh never adopts a partial one (issue 12, item 6),
with real processes killed by SIGKILL at a named write (`WEBKD_KILL_AT_WRITE=NAME[@K]`):

- a distill killed right after the student's weights are written leaves no export/ at all;
- an old-style partial export/ (weights, no student.json) is not adopted by the refresh's plan,
  and with a champion it is repaired from the registry;
- a distill killed between archiving its export under students/<v>/ and registering it does not
  leave an orphan: the re-run registers that same version.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.storage import KILL_AT_WRITE

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "pants"]

DISTILL_AND_REGISTER = """
import sys
from webkd.flows.checks import check_run
from webkd.flows.stages import distill, refresh
from webkd.pipeline.config import load_config
cfg = check_run(load_config(sys.argv[1], []))
print("version", refresh.register_distilled(cfg, distill.distill(cfg))["version"])
"""


@pytest.fixture
def cfg_path(clothing, tmp_path) -> Path:
    from conftest import write_query_folder

    names = list(clothing.class_names)
    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:8] for c in CLASSES])
    write_query_folder(tmp_path / "web", clothing.images[idx], clothing.labels[idx], names)
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 1,
           "data": {"sources": [f"folder:{tmp_path / 'web'}"], "classes": CLASSES, "image_size": 32,
                    "val_fraction": 0.25},
           "teachers": [{"key": "t", "name": "cnn_tiny"}], "student": {"key": "s", "name": "cnn_tiny"},
           "train": {"method": "kd", "epochs": 1, "batch_size": 8}, "export": {"onnx": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


def _run(argv: list[str], kill_at: str | None = None) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop(KILL_AT_WRITE, None)
    if kill_at:
        env[KILL_AT_WRITE] = kill_at
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def _plan(cfg_path: Path):
    from webkd.flows.stages.refresh import refresh_plan
    from webkd.pipeline.config import load_config

    return refresh_plan(load_config(str(cfg_path), []))


def test_killed_export_is_absent_and_a_partial_one_is_not_adopted(cfg_path):
    from webkd.training.registry import export_complete, load_registry

    run = RunPaths(cfg_path.parent / "run")
    rc, out = _run(["-m", "webkd.flows", "distill", "--no-flow", str(cfg_path)], kill_at="student.safetensors")
    assert rc == -signal.SIGKILL, out
    assert not run.export_dir.exists(), sorted(p.name for p in run.export_dir.iterdir())

    run.export_dir.mkdir()   # what an export killed there left before: weights and nothing else
    shutil.copy(run.export_stage / "student.safetensors", run.export_dir / "student.safetensors")
    plan = _plan(cfg_path)
    assert load_registry(run.registry).entries == [], "a partial export was adopted"
    assert plan["train"] and plan["champion"] is None

    rc, out = _run(["-m", "webkd.flows", "distill", "--no-flow", str(cfg_path)])
    assert rc == 0, out
    assert export_complete(run.export_dir) and not run.export_stage.exists()
    assert {"student.safetensors", "student.json", "model_card.md", "student_predictions.parquet"} <= \
        {p.name for p in run.export_dir.iterdir()}


def test_kill_between_archive_and_registry_leaves_no_orphan(cfg_path):
    from webkd.training.registry import MARKER, export_complete, load_registry

    run = RunPaths(cfg_path.parent / "run")
    rc, out = _run(["-c", DISTILL_AND_REGISTER, str(cfg_path)], kill_at="export@2")   # 2nd: students/<v>/export
    assert rc == -signal.SIGKILL, out
    assert [p.name for p in run.students_dir.iterdir()] == ["v0001"] and not run.registry.exists()

    rc, out = _run(["-c", DISTILL_AND_REGISTER, str(cfg_path)])
    assert rc == 0, out
    assert "version v0001" in out, out
    reg = load_registry(run.registry)
    assert [e["version"] for e in reg.entries] == ["v0001"] and reg.champion == "v0001"
    assert sorted(p.name for p in run.students_dir.iterdir()) == ["v0001"], "orphan left in students/"

    (run.export_dir / "student.json").unlink()          # a partial export/ beside a champion: repaired
    _plan(cfg_path)
    assert export_complete(run.export_dir)
    assert json.loads((run.export_dir / MARKER).read_text())["version"] == "v0001"
    assert [e["version"] for e in load_registry(run.registry).entries] == ["v0001"]
