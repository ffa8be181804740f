"""Prior correction (training/prior.py): the prior from the ledgers, tau chosen on class-balanced
validation agreement, and the corrected student through export, ONNX, load_student and a warm start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import clothing_web, tiny_teacher
from webkd.training import prior

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "longsleeve", "pants", "shoes", "t-shirt"]


def test_trained_prior_weights_rows_by_their_training_mass():
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]))
    mass = np.array([3.0, 1.0, 0.0])          # row 0 trained 3 times, row 2 never
    p = prior.trained_prior(logits, mass)
    np.testing.assert_allclose(p, (3 * np.array([0.9, 0.1]) + np.array([0.2, 0.8])) / 4)
    with pytest.raises(ValueError, match="no trained rows"):
        prior.trained_prior(logits, np.zeros(3))


def test_ledger_mass_sums_kept_times_weight_over_epochs(tmp_path):
    import pyarrow as pa

    for e, (kept, w) in enumerate([([True, False, True], [1.0, 1.0, 0.5]), ([True, True, False], [0.25, 1.0, 1.0])]):
        pq.write_table(pa.table({"row": [0, 1, 2], "kept": kept, "weight": w}), tmp_path / f"e{e}.parquet")
    np.testing.assert_allclose(prior.ledger_mass([tmp_path / "e0.parquet", tmp_path / "e1.parquet"], 3),
                               [1.25, 1.0, 0.5])


def test_auto_tau_undoes_a_skew_that_follows_the_prior():
    """A student whose logits carry log pi of a skewed training mix: tau 1 removes it exactly, and the
    class-balanced agreement (not the plain one, which rewards the skew) finds it."""
    rng = np.random.default_rng(0)
    K, n = 4, 4000
    ref = rng.integers(0, K, n)                           # the teacher's top-1 on validation rows
    pi = np.array([0.55, 0.25, 0.15, 0.05])
    clean = rng.normal(0, 1.0, (n, K)) + 1.5 * np.eye(K)[ref]
    skewed = clean + np.log(pi)
    target = prior.target_prior("uniform", K)
    c = prior.choose_tau(skewed, ref, pi, target, "auto", [0.5, 1.0, 2.0])
    assert c.tau == 1.0
    assert c.scores[1.0][1] > c.scores[0.0][1] + 0.05
    np.testing.assert_allclose(skewed + c.offset, clean + np.log(0.25), atol=1e-12)
    # a balanced student and a uniform prior: every tau ties, the smallest (0, off) wins
    c0 = prior.choose_tau(clean, ref, np.full(K, 0.25), target, "auto", [0.5, 1.0])
    assert c0.tau == 0.0 and set(c0.scores) == {0.0, 0.5, 1.0}
    # a fixed tau is taken as given, with tau 0 scored beside it
    c2 = prior.choose_tau(skewed, ref, pi, target, 0.5, [])
    assert c2.tau == 0.5 and set(c2.scores) == {0.0, 0.5}


def test_target_prior_and_config_errors_are_one_line():
    from webkd.pipeline.config import ConfigError, build_config

    np.testing.assert_allclose(prior.target_prior([2, 1, 1], 3), [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="3 positive class shares"):
        prior.target_prior([1, 1], 3)
    with pytest.raises(ConfigError) as err:
        build_config({"data": {"sources": ["folder:/x"], "classes": ["a", "b"]},
                      "student": {"name": "cnn_tiny"}}, ["export.prior_correction.tau=-1"])
    assert "tau" in str(err.value) and "Traceback" not in str(err.value)


def test_prior_corrected_module_adds_the_offset_and_keeps_the_base_weights():
    base = torch.nn.Linear(3, 2)
    m = prior.PriorCorrected(base, np.array([0.5, -1.0]))
    x = torch.randn(4, 3)
    torch.testing.assert_close(m(x), base(x) + torch.tensor([[0.5, -1.0]]))
    state = m.state_dict()
    assert set(prior.unwrap_state(state)) == set(base.state_dict())
    plain = base.state_dict()
    assert prior.unwrap_state(plain) is plain


# ------------------------------------------------------------------------------------------------
# a real distill with the correction on: the export, ONNX, load_student and a warm start agree
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrected_run(tmp_path_factory, clothing):
    root = tmp_path_factory.mktemp("prior")
    clothing_web(root, clothing, dict(zip(CLASSES, (40, 10, 10, 30, 10))), seed=1)   # a skewed pool
    tiny_teacher(root, len(CLASSES))
    cfg = {"name": "prior", "seed": 0,
           "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32, "val_fraction": 0.25},
           "teachers": [{"key": "t", "name": "cnn_small", "kwargs": {"width": 8},
                         "weights": str(root / "teacher.safetensors"), "preprocess": {"size": 32}}],
           "student": {"name": "cnn_tiny", "preprocess": {"size": 32}},
           "selection": {"mode": "none"},
           "train": {"method": "kd", "method_args": {}, "epochs": 2, "batch_size": 16},
           "export": {"prior_correction": {"tau": 1.0}}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = root / "run"
    r = subprocess.run([sys.executable, "-m", "webkd.flows", "distill", "--no-flow", str(root / "cfg.yaml"),
                        f"run_dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return root, run, env


def test_export_carries_the_ledger_prior_and_its_offset(corrected_run):
    from webkd.pipeline.features import load_features
    from webkd.pipeline.paths import RunPaths

    _, run, _ = corrected_run
    meta = json.loads((run / "export" / "student.json").read_text())
    info = meta["prior_correction"]
    assert info["tau"] == 1.0
    # the prior, recomputed here from the ledgers of epochs 0..best and the teacher's cached logits
    best = meta["metrics"]["best_epoch"]
    mass = np.zeros(len(pq.read_table(run / "manifest.parquet")), np.float64)
    for e in range(best + 1):
        t = pq.read_table(RunPaths(run).ledger(e)).to_pydict()
        np.add.at(mass, np.asarray(t["row"]), np.asarray(t["kept"], float) * np.asarray(t["weight"]))
    logits = load_features(RunPaths(run), "t").logits.astype(np.float64)
    z = logits[mass > 0] - logits[mass > 0].max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    expect = (p * mass[mass > 0, None]).sum(0) / mass.sum()
    np.testing.assert_allclose(info["prior"], expect, atol=1e-5)
    np.testing.assert_allclose(info["offset"], np.log(1 / len(CLASSES)) - np.log(expect), atol=1e-4)
    assert {"prior_tau", "val_balanced_agreement", "val_balanced_agreement_uncorrected"} <= set(meta["metrics"])
    assert "## Prior correction" in (run / "export" / "model_card.md").read_text()


def test_onnx_and_load_student_are_the_best_checkpoint_plus_the_offset(corrected_run):
    import onnxruntime as ort

    from webkd.pipeline.config import ModelSpec
    from webkd.training.export import load_student
    from webkd.training.models import build_model

    _, run, _ = corrected_run
    meta = json.loads((run / "export" / "student.json").read_text())
    x = torch.rand(6, 3, 32, 32)
    loaded = load_student(run / "export")
    assert isinstance(loaded, prior.PriorCorrected)
    student = build_model(ModelSpec.model_validate({**meta["student_spec"], "weights": None}),
                          num_classes=len(CLASSES)).eval()
    student.load_state_dict(torch.load(run / "checkpoints" / "best.pt", weights_only=True)["student"])
    with torch.no_grad():
        plain = student(x).logits
        torch.testing.assert_close(loaded(x), plain + torch.tensor(meta["prior_correction"]["offset"]),
                                   atol=1e-4, rtol=1e-4)
    sess = ort.InferenceSession(str(run / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(["logits"], {"image": x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, loaded(x).detach().numpy(), atol=1e-4)


def test_a_warm_start_from_a_corrected_export_reads_the_plain_weights(corrected_run):
    root, run, env = corrected_run
    run2 = root / "warm"
    r = subprocess.run([sys.executable, "-m", "webkd.flows", "distill", "--no-flow", str(root / "cfg.yaml"),
                        f"run_dir={run2}", f"train.warm_start={run / 'export'}", "train.epochs=1",
                        "export.prior_correction.tau=0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((run2 / "export" / "student.json").read_text())
    assert "prior_correction" not in meta


class _Pool:
    """What prior.correct reads of a training.pool.Pool."""

    def __init__(self, logits, candidates, val_rows, size=8):
        self.teacher_logits, self.candidates = logits, np.asarray(candidates)
        self.validation_rows = np.asarray(val_rows, dtype=np.int64)
        self.pixels = np.zeros((len(candidates), size, size, 3), np.uint8)

    def __len__(self):
        return len(self.candidates)


def test_correct_without_ledger_rows_or_teacher_logits_says_so(caplog):
    from types import SimpleNamespace

    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    cfg = SimpleNamespace(tau=1.0, taus=[], target="uniform")
    logits = np.log(np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]))
    pool = _Pool(logits, [True, True, True, False], [3])
    with caplog.at_level("WARNING"):
        deployed, choice = prior.correct(base, pool, [], cfg, torch.device("cpu"))
    assert "every training candidate" in caplog.text
    np.testing.assert_allclose(choice.prior, [1.9 / 3, 1.1 / 3])   # the three candidates, once each
    assert isinstance(deployed, prior.PriorCorrected)
    caplog.clear()
    with caplog.at_level("WARNING"):
        same, none = prior.correct(base, _Pool(None, [True], []), [], cfg, torch.device("cpu"))
    assert same is base and none is None and "exported uncorrected" in caplog.text
