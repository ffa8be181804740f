"""KD^3 at module level (methods.md §1.6 items 6 and 9, and the deployed path)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from webkd.pipeline.config import ModelSpec, PreprocessSpec
from webkd.training.methods import KD3, KD3Head, build_method
from webkd.training.models import build_model, freeze

PRE = PreprocessSpec(size=32, channels=3)


def _models(seed=0):
    torch.manual_seed(seed)
    teacher = freeze(build_model(ModelSpec(name="cnn_small", preprocess=PRE), num_classes=7))
    student = build_model(ModelSpec(name="cnn_tiny", preprocess=PRE), num_classes=7)
    return student, teacher


def _batch(pacs32, n=8, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pacs32.labels), n, replace=False)
    x = torch.from_numpy(pacs32.images[idx]).permute(0, 3, 1, 2).float() / 255   # (B, 3, 32, 32) real images
    return {"x": x, "labels": torch.from_numpy(pacs32.labels[idx]), "index": torch.arange(n),
            "generator": torch.Generator().manual_seed(seed)}


def _kd3(student, teacher, x, **kw):
    return KD3.from_models(student, [teacher], x, **kw)


def test_step_keeps_teacher_bit_identical_and_routes_gradients(pacs32):
    student, teacher = _models()
    batch = _batch(pacs32)
    method = _kd3(student, teacher, batch["x"])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    params = list(student.parameters()) + list(method.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    student.train(), method.train()
    terms = method(batch, student, [teacher], 0.3)
    assert set(terms) == {"loss_feat", "loss_md"}
    for v in terms.values():
        assert v.shape == (8,) and torch.isfinite(v).all()
    loss = sum(terms.values()).mean()
    opt.zero_grad()
    loss.backward()
    # P gets a non-zero gradient through the teacher's frozen W_T ...
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.projector.parameters())
    # ... the student's own classifier gets none, the teacher none at all
    assert student.classifier.weight.grad is None or student.classifier.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # W_T and BN stats included
    assert not teacher.training


def test_teacher_side_term_sends_no_gradient_to_student(pacs32):
    student, teacher = _models()
    batch = _batch(pacs32)
    method = _kd3(student, teacher, batch["x"])
    student.train(), method.train()
    # isolate the teacher-side NT-Xent: zero the student-side head so only E_T's term remains
    with_t = _kd3(student, teacher, batch["x"])
    with_t.load_state_dict(method.state_dict())
    no_t = _kd3(student, teacher, batch["x"], teacher_side_term=False)
    no_t.load_state_dict(method.state_dict())

    def student_grads(m):
        student.zero_grad()
        b = dict(batch, generator=torch.Generator().manual_seed(1))
        m(b, student, [teacher], 0.3)["loss_md"].sum().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in student.parameters()]

    g_with, g_without = student_grads(with_t), student_grads(no_t)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_with, g_without))
    assert with_t.embed_teacher.weight.grad is not None and with_t.embed_teacher.weight.grad.abs().sum() > 0


def test_deployed_head_is_the_training_path_and_predicts_through_teacher_classifier(pacs32):
    student, teacher = _models()
    batch = _batch(pacs32)
    method = _kd3(student, teacher, batch["x"])
    student.eval(), method.eval()
    deployed = method.deploy(student, [teacher]).eval()
    assert isinstance(deployed, KD3Head)
    with torch.no_grad():
        z_pred = method.predict(student, [teacher], batch["x"])
        z_dep = deployed(batch["x"])
        g = deployed.aligned(student(batch["x"]).features[-1])
        z_manual = teacher.classifier(g.mean(dim=(2, 3)))
    assert torch.allclose(z_pred, z_dep) and torch.allclose(z_dep, z_manual)
    # the deployed classifier is a copy of W_T: same values, not the same tensor
    assert torch.equal(deployed.classifier.weight, teacher.classifier.weight)
    assert deployed.classifier.weight.data_ptr() != teacher.classifier.weight.data_ptr()


def test_without_mixdistribution_only_the_feature_term_remains(pacs32):
    student, teacher = _models()
    batch = _batch(pacs32)
    method = _kd3(student, teacher, batch["x"], mixdist=False)
    assert set(method(batch, student, [teacher], 0.1)) == {"loss_feat"}


def test_build_method_fails_fast():
    with pytest.raises(ValueError, match="valid"):
        build_method("kd4")
    with pytest.raises(ValueError, match="unknown argument"):
        build_method("kd", temprature=3)
    with pytest.raises(ValueError, match="needs argument"):
        build_method("kd3")
    assert isinstance(build_method("kd3", student_channels=4, teacher_channels=8, student_dim=4, teacher_dim=8), KD3)
