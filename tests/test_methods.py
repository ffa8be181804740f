"""The METHODS registry drives these tests (timm `tests/test_models.py` style): every method is
built from tiny real models by its own `from_models` and takes one training step on a tiny batch
of real PACS images, with finite per-sample losses and the teachers left untouched; then it is
exported (safetensors + ONNX), reloaded by `load_student` and warm-started from that export.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from webkd.pipeline.config import ModelSpec
from webkd.training.losses import ce_loss
from webkd.training.method_base import Method
from webkd.training.export import load_student, save_export, warm_start
from webkd.training.methods import METHODS, build_method, method_from_models
from webkd.training.models import build_model, freeze

K = 7  # PACS classes

# Arguments a method needs beyond what its `from_models` derives (none today: a new method that
# needs some must add them here, which documents them).
REQUIRED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def real_batch(pacs32):
    """8 real PACS images (all four domains) as float RGB [0, 1] (8, 3, 32, 32), and labels."""
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(pacs32.domains == d), 2, replace=False) for d in range(4)])
    x = torch.from_numpy(pacs32.images[idx]).permute(0, 3, 1, 2).float() / 255
    return x, torch.from_numpy(pacs32.labels[idx]).long()


def _models(seed: int = 0):
    torch.manual_seed(seed)
    student = build_model(ModelSpec(name="cnn_tiny"), K)
    teachers = [freeze(build_model(ModelSpec(name="cnn_tiny"), K)),
                freeze(build_model(ModelSpec(name="cnn_small", kwargs={"width": 6}), K))]
    return student, teachers


def test_registry_lists_the_seed_methods():
    assert {"ce", "kd", "kd3", "rld", "pll", "mixskd", "unic"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.name == name, name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_takes_one_step_on_real_images(name, real_batch):
    x, labels = real_batch
    student, teachers = _models()
    method = method_from_models(name, student, teachers, x, **REQUIRED.get(name, {}))
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    student.train(), method.train()
    for t in teachers:
        t.train()  # frozen teachers must stay in eval mode whoever calls train()
    batch = {"x": x, "labels": labels, "index": torch.arange(len(x)), "generator": torch.Generator().manual_seed(0),
             "progress": 0.5}
    terms = method(batch, student, teachers, 0.5)   # the loop passes the configured teachers to every method
    loss_terms = {k: v for k, v in terms.items() if k.startswith("loss")}
    assert loss_terms, f"{name} returned no loss_* term"
    for k, v in loss_terms.items():
        assert v.shape == (len(x),), f"{name}.{k} is not per-sample: {tuple(v.shape)}"
        assert torch.isfinite(v).all(), f"{name}.{k} is not finite"
    per_sample = sum(loss_terms.values())
    opt.zero_grad()
    per_sample.mean().backward()
    opt.step()
    for t, sd in zip(teachers, before):
        assert not t.training
        for k, v in t.state_dict().items():
            assert torch.equal(v, sd[k]), f"{name} changed teacher tensor {k}"
        assert all(p.grad is None for p in t.parameters()), f"{name} sent a gradient to a teacher"
    changed = [k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(v, s_before[k])]
    assert changed, f"{name} did not train the student"
    # prediction and deployment: (B, K) logits from RGB [0, 1]
    student.eval(), method.eval()
    with torch.no_grad():
        logits = method.predict(student, teachers, x)
        deployed = method.deploy(student, teachers).eval()(x)
    assert logits.shape == (len(x), K) and torch.allclose(logits, deployed, atol=1e-5)
    assert isinstance(method.deploy_info(), dict) and "head" in method.deploy_info()


def test_build_method_fails_fast():
    with pytest.raises(ValueError, match="unknown method 'nope'.*valid"):
        build_method("nope")
    with pytest.raises(ValueError, match="unknown argument.*'betta'.*valid.*beta"):
        build_method("rld", betta=2.0)
    with pytest.raises(ValueError, match="needs argument.*student"):
        build_method("mixskd")
    with pytest.raises(ValueError, match="needs argument.*student_channels"):
        build_method("unic")
    with pytest.raises(ValueError, match="unknown argument"):
        build_method("ce", temperature=2.0)   # CE takes no arguments (nn.Module's *args do not count)
    assert build_method("ce").name == "ce"


def _one_step(method, student, teachers, x, labels) -> None:
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    student.train(), method.train()
    batch = {"x": x, "labels": labels, "index": torch.arange(len(x)), "generator": torch.Generator().manual_seed(0)}
    terms = method(batch, student, teachers, 0.5)
    opt.zero_grad()
    sum(v for k, v in terms.items() if k.startswith("loss")).mean().backward()
    opt.step()
    student.eval(), method.eval()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_exports_reloads_and_warm_starts(name, real_batch, tmp_path, one_thread):
    """One step, then save_export (ONNX included, dynamic height and width): `load_student` gives
    the exported logits, student.onnx matches torch at two sizes other than the training size,
    and a warm start from the export reproduces the deployed weights in a fresh student+method."""
    import onnxruntime as ort

    x, labels = real_batch
    student, teachers = _models()
    method = method_from_models(name, student, teachers, x, **REQUIRED.get(name, {}))
    _one_step(method, student, teachers, x, labels)
    deployed = method.deploy(student, teachers).eval()
    meta = {"method": name, "classes": [f"c{i}" for i in range(K)], "student_spec": student.spec.model_dump(mode="json"),
            "student_num_classes": K, "deploy": method.deploy_info()}
    res = save_export(deployed, tmp_path / "export", meta, x, onnx=True)
    assert res.onnx_max_abs_diff is not None and res.onnx_max_abs_diff < 1e-4
    with torch.no_grad():
        exported = deployed(x)
        torch.testing.assert_close(load_student(tmp_path / "export")(x), exported, rtol=0, atol=1e-6)
    session = ort.InferenceSession(str(tmp_path / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    for size in ((24, 24), (64, 48)):
        xs = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
        with torch.no_grad():
            want = deployed(xs).numpy()
        got = session.run(["logits"], {"image": xs.numpy()})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{name} at {size}")
    fresh, _ = _models(seed=1)
    again = method_from_models(name, fresh, teachers, x, **REQUIRED.get(name, {}))
    warm_start(fresh, again, tmp_path / "export")
    want_state = deployed.state_dict()
    got_state = again.deploy(fresh, teachers).state_dict()
    assert set(got_state) == set(want_state), name
    for k, v in want_state.items():
        assert torch.equal(got_state[k], v), f"{name}: warm start did not restore {k}"


def test_from_models_covers_every_required_argument():
    """Each method derives its model-dependent arguments itself; teacher-needing methods fail
    fast without teachers, naming what is missing."""
    student, teachers = _models()
    for name, cls in METHODS.items():
        assert isinstance(method_from_models(name, student, teachers, torch.rand(2, 3, 32, 32), **REQUIRED.get(name, {})), cls)
    with pytest.raises(ValueError, match="unknown method 'nope'.*valid"):
        method_from_models("nope", student, teachers)
    with pytest.raises(ValueError, match="unknown argument.*'betta'.*valid.*beta"):
        method_from_models("rld", student, teachers, betta=2.0)
    with pytest.raises(ValueError, match="needs argument.*student_channels"):
        method_from_models("kd3", student, [])


def test_method_flags_and_missing_labels(real_batch):
    """Methods say whether they need labels / a teacher; CE gives a row without a label 0 loss."""
    assert METHODS["rld"].needs_labels and METHODS["mixskd"].needs_labels and METHODS["ce"].needs_labels
    assert not METHODS["unic"].needs_labels and not METHODS["pll"].needs_labels
    assert METHODS["rld"].needs_teacher and METHODS["unic"].needs_teacher and not METHODS["mixskd"].needs_teacher
    x, labels = real_batch
    y = labels.clone()
    y[0] = -1
    assert ce_loss(torch.randn(len(x), K), y)[0] == 0


def test_kd_mixup_is_function_matching(real_batch):
    """kd mixup > 0: teacher and student see the same mixed view (one lambda per batch, from the
    batch generator); mixup 0 leaves the batch and the generator untouched."""
    from webkd.training import losses

    x, labels = real_batch
    student, teachers = _models()
    student.eval()
    plain, mixed = build_method("kd"), build_method("kd", mixup=1.0)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = plain({"x": x, "labels": labels, "generator": g}, student, teachers, 0.0)
    assert torch.equal(g.get_state(), state)
    g = torch.Generator().manual_seed(3)
    got = mixed({"x": x, "labels": labels, "generator": g}, student, teachers, 0.0)["loss_kd"]
    g = torch.Generator().manual_seed(3)
    lam = losses.sample_mixup_lambda(1.0, g)
    xm = losses.mixup(x, lam, losses.sample_permutation(len(x), g))
    t = torch.stack([m(xm).logits for m in teachers]).mean(0)
    want = 0.9 * losses.kd_loss(student(xm).logits, t, 4.0)
    torch.testing.assert_close(got, want)
    assert 0 < lam < 1 and not torch.allclose(got, out["loss_kd"])
    with pytest.raises(ValueError, match="mixup"):
        build_method("kd", mixup=-1.0)
