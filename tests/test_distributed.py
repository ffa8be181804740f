"""DDP training (issue 13 item 3) with real `webkd distill --no-flow --nproc 2` processes (gloo
on CPU) on real photos:

- two processes with the same global batch train as one: the same per-step losses, the same
  selection ledgers (per-epoch reselection with the student in the loop, soft weights) and the
  same final weights, within float tolerance. The student is `cnn_tiny` with GroupNorm (no batch
  statistics: with BatchNorm each process normalises with its own half-batch, as torch DDP does,
  and the losses differ by design; training/distributed.py);
- a 2-process run whose rank 0 is SIGKILLed after its 2nd `last.pt` (WEBKD_KILL_AT_WRITE) stops
  with one line, leaves no process behind, and the same command resumes to the weights and
  metrics of the uninterrupted 2-process run;
- the user's mistakes are one line, exit code 2.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.storage import KILL_AT_WRITE

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "pants"]
STEP = re.compile(r"epoch (\d+) step (\d+) loss (\S+)")
EPOCHS = 3


@pytest.fixture(scope="module")
def scenario(clothing, tmp_path_factory):
    """Real photos in query folders, a teacher weights file, a config (3 epochs of 3 steps of 8 rows)."""
    from conftest import write_query_folder
    from webkd.pipeline.config import ModelSpec
    from webkd.training.models import build_model

    root = tmp_path_factory.mktemp("ddp")
    names = list(clothing.class_names)
    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:14] for c in CLASSES])
    write_query_folder(root / "web", clothing.images[idx], clothing.labels[idx], names)
    torch.manual_seed(3)
    teacher = build_model(ModelSpec(name="cnn_tiny"), 2).state_dict()
    teacher = {k: v * 30 if k.startswith("classifier") else v for k, v in teacher.items()}  # confident targets
    torch.save(teacher, root / "teacher.pt")
    cfg = {"seed": 1, "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32,
                               "val_fraction": 0.25},
           "teachers": [{"key": "t", "name": "cnn_tiny", "weights": str(root / "teacher.pt")}],
           "student": {"key": "s", "name": "cnn_tiny", "kwargs": {"norm": "group"}},
           "selection": {"mode": "soft"},
           "train": {"method": "kd", "epochs": EPOCHS, "batch_size": 8, "steps_per_epoch": 3, "lr": 0.1,
                     "method_args": {"kd": {"temperature": 1.0, "ce_weight": 0.5}}},
           "export": {"onnx": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _distill(root: Path, run: str, *extra: str, kill_at: str | None = None,
             launcher: tuple[str, ...] = ()) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop(KILL_AT_WRITE, None)
    if kill_at:
        env[KILL_AT_WRITE] = kill_at
    p = subprocess.run([sys.executable, *(launcher or ("-m", "webkd.flows")), "-v", "distill", "--no-flow",
                        str(root / "cfg.yaml"), f"run_dir={root / run}", *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def _steps(out: str) -> dict[tuple[int, int], float]:
    return {(int(e), int(s)): float(v) for e, s, v in STEP.findall(out)}


def _student(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(RunPaths(run).last_checkpoint, weights_only=True)["student"]


def _kept(run: Path) -> list[list[bool]]:
    import pyarrow.parquet as pq

    return [pq.read_table(p, columns=["kept"])["kept"].to_pylist() for _, p in RunPaths(run).ledgers()]


@pytest.fixture(scope="module")
def two(scenario):
    rc, out = _distill(scenario, "two", "--nproc", "2")
    assert rc == 0, out
    return scenario / "two", out


def test_two_processes_train_as_one(scenario, two):
    rc, out1 = _distill(scenario, "one")
    assert rc == 0, out1
    run2, out2 = two
    one, dual = _steps(out1), _steps(out2)
    assert len(one) == EPOCHS * 3 and sorted(one) == sorted(dual), (out1, out2)
    a = np.array([one[k] for k in sorted(one)])
    b = np.array([dual[k] for k in sorted(one)])
    np.testing.assert_allclose(b, a, rtol=1e-4)
    assert len(set(np.round(a, 4))) > 3                     # the losses move: a trajectory, not a constant
    assert _kept(run2) == _kept(scenario / "one") and len(_kept(run2)) == EPOCHS
    s1, s2 = _student(scenario / "one"), _student(run2)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-5)
    h1 = json.loads((scenario / "one" / "metrics.json").read_text())["history"]
    h2 = json.loads((run2 / "metrics.json").read_text())["history"]
    assert [h["seen"] for h in h2] == [h["seen"] for h in h1] == [24] * EPOCHS
    np.testing.assert_allclose([h["loss"] for h in h2], [h["loss"] for h in h1], rtol=1e-4)
    assert (run2 / "export" / "student.safetensors").exists()


@pytest.mark.slow   # two more 2-process runs: ~30 s each on 2 loaded cores
def test_killed_two_process_run_resumes_to_the_same_weights(scenario, two):
    run2, out2 = two
    killed = scenario / "killed"
    rc, out = _distill(scenario, "killed", "--nproc", "2", kill_at="last.pt@2")
    assert rc == 2, out
    assert "training process 0 of 2 was killed (SIGKILL)" in out and "Traceback" not in out, out
    assert torch.load(RunPaths(killed).last_checkpoint, weights_only=True)["epoch"] == 1
    assert not (killed / "export").exists()
    rc, out = _distill(scenario, "killed", "--nproc", "2")
    assert rc == 0, out
    assert "resuming after epoch 1" in out, out
    assert sorted(_steps(out)) == [(2, s) for s in range(3)]       # only the epoch that was left
    s_full, s_resumed = _student(run2), _student(killed)
    for k in s_full:
        torch.testing.assert_close(s_resumed[k], s_full[k], rtol=1e-6, atol=1e-7)
    h_full = json.loads((run2 / "metrics.json").read_text())["history"]
    h_res = json.loads((killed / "metrics.json").read_text())["history"]
    np.testing.assert_allclose([h["loss"] for h in h_res], [h["loss"] for h in h_full], rtol=1e-6)
    assert _kept(killed) == _kept(run2)


@pytest.mark.slow   # one more 2-process run
def test_torchrun_ranks_train_as_nproc(scenario, two):
    """`torchrun --nproc-per-node 2 -m webkd.flows distill --no-flow` (the multi-machine way, here on
    one machine): rank 0 curates, trains with rank 1 and exports; the same steps and weights as --nproc 2."""
    run2, out2 = two
    rc, out = _distill(scenario, "torchrun", launcher=("-m", "torch.distributed.run", "--standalone",
                                                       "--nproc-per-node", "2", "-m", "webkd.flows"))
    assert rc == 0, out
    got, want = _steps(out), _steps(out2)
    assert sorted(got) == sorted(want), out
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], rtol=1e-6)
    s2, st = _student(run2), _student(scenario / "torchrun")
    for k in s2:
        torch.testing.assert_close(st[k], s2[k], rtol=1e-6, atol=1e-7)
    assert (scenario / "torchrun" / "export" / "student.safetensors").exists()
    assert out.count("epoch 2: loss") == 1, out             # one rank reports (rank 1 logs warnings only)


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "0"], "train.nproc"),
    (["--nproc", "3"], "train.batch_size=8 is not a multiple of train.nproc=3"),
    (["--nproc", "2", "device=cuda"], "NCCL) needs GPUs and none is visible"),
    (["--nproc", "32", "train.batch_size=64"], "train.nproc=32: the pool has only 24 training row(s)"),
])
def test_mistakes_are_one_line(scenario, tmp_path, capsys, extra, message):
    from webkd.flows.__main__ import main

    if "device=cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["distill", "--no-flow", str(scenario / "cfg.yaml"), f"run_dir={tmp_path / 'run'}", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert message in err[-1] and err[-1].startswith("webkd distill: ") and not any("Traceback" in e for e in err), err
    if "32" not in extra:          # config mistakes: before any work
        assert len(err) == 1 and not (tmp_path / "run").exists(), err
