"""training/mixskd.py: module-level properties of methods.md §4.5 on real clothing photos
(the loss-level ones, items 1-3 and 7, are in tests/test_losses.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from webkd.pipeline.config import ModelSpec
from webkd.training.export import count_parameters, load_student, save_export
from webkd.training.methods import build_method, method_from_models
from webkd.training.mixskd import MixSKD
from webkd.training.models import build_model

K = 10  # clothing classes


@pytest.fixture(scope="module")
def photos(clothing):
    rng = np.random.default_rng(1)
    idx = rng.choice(len(clothing.labels), 8, replace=False)
    x = torch.from_numpy(clothing.images[idx]).permute(0, 3, 1, 2).float() / 255   # (8, 3, 64, 64)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1), torch.from_numpy(clothing.labels[idx]).long()


def _student(name: str = "cnn_small", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelSpec(name=name, kwargs=kw), K)


def _batch(x, y, seed=0):
    return {"x": x, "labels": y, "index": torch.arange(len(x)), "generator": torch.Generator().manual_seed(seed)}


def test_branches_are_separate_copies_of_the_later_stages():
    s = _student(width=8)
    m = MixSKD(s)
    assert len(s.stages) == 3 and len(m.branches) == 2            # S-1 branches for S stages
    assert [len(b) for b in m.branches] == [2, 1]                 # branch k copies stages k+1..S
    student_ids = {id(p) for p in s.parameters()}
    assert not student_ids & {id(p) for p in m.parameters()}      # separately parameterised
    reset, copied = m.branches[1][0], MixSKD(s, branch_init="copy").branches[1][0]
    w = s.stages[2][0][0].weight
    assert not torch.equal(reset[0][0].weight, w) and torch.equal(copied[0][0].weight, w)
    assert method_from_models("mixskd", s, []).num_stages == build_method("mixskd", student=s).num_stages == 3


def test_shapes_h_gets_S_times_C_channels_and_every_A_has_the_shape_of_F_S(photos):
    x, _ = photos
    s = _student("resnet_narrow", width=4)
    m = MixSKD(s)
    assert len(m.branches) == 3
    c = s.feature_channels[-1]
    assert m.self_teacher.conv.in_channels == 4 * c               # concat of A^1..A^4
    feats, logits = m.exits(s, x)
    f4 = s(x).features[-1]
    assert all(a.shape == f4.shape for a in feats) and all(z.shape == (len(x), K) for z in logits)


@pytest.mark.parametrize("mixcls", [True, False])
def test_self_teacher_gets_gradients_only_with_the_mixup_classification_term(photos, mixcls):
    x, y = photos
    s = _student(width=8)
    m = MixSKD(s, mixcls_weight=1.0 if mixcls else 0.0)
    terms = m(_batch(x, y), s, [], 0.3)
    assert ("loss_mixcls" in terms) == mixcls
    sum(v for k, v in terms.items() if k.startswith("loss")).mean().backward()
    grads = [p.grad for p in m.self_teacher.parameters()]
    if mixcls:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert all(g is None or g.abs().sum() == 0 for g in grads)
    # branches and the backbone are trained either way
    assert all(p.grad is not None for p in m.branch_fcs.parameters())
    assert s.classifier.weight.grad is not None and s.classifier.weight.grad.abs().sum() > 0


def test_lambda_one_is_clean_training(photos):
    """alpha = 0 gives λ = 1: x̃ = x, so L_fea = 0 and every branch consistency term is 0."""
    x, y = photos
    s = _student(width=8)
    m = MixSKD(s, alpha=0.0, dis_weight=0.0)
    terms = m(_batch(x, y), s, [], 0.3)
    assert torch.allclose(terms["loss_fea"], torch.zeros(len(x)), atol=1e-10)
    m_no_h = MixSKD(s, alpha=0.0, dis_weight=0.0, mixcls_weight=0.0, logit_weight=1.0)
    feats, logits = m_no_h.exits(s, torch.cat([x, x]))
    for z in logits:  # clean and "mixed" halves agree, so the branch KL terms vanish
        assert torch.allclose(z[: len(x)], z[len(x):], atol=1e-5)


def test_adversarial_mode_negates_the_feature_gradient_of_the_discriminator_loss(photos):
    x, _ = photos
    s = _student(width=8)
    joint, adv = MixSKD(s, discriminator="joint"), MixSKD(s, discriminator="adversarial")
    adv.discriminators.load_state_dict(joint.discriminators.state_dict())
    with torch.no_grad():
        base = joint.exits(s, x)[0]
    grads, d_grads = [], []
    for m in (joint, adv):
        maps = [a.clone().requires_grad_(True) for a in base]
        real, fake = [a[:4] for a in maps], [a[4:] for a in maps]
        m.discriminator_loss(real, fake).sum().backward()
        grads.append(torch.cat([a.grad.flatten() for a in maps]))
        d_grads.append(torch.cat([p.grad.flatten() for p in m.discriminators.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[1], -grads[0], atol=1e-7)
    assert torch.allclose(d_grads[1], d_grads[0], atol=1e-7)    # the discriminators still minimise


def test_export_is_the_backbone_and_equals_exit_S(photos, tmp_path):
    x, y = photos
    s = _student(width=8)
    m = MixSKD(s)
    opt = torch.optim.SGD(list(s.parameters()) + list(m.parameters()), lr=0.05)
    for step in range(2):
        terms = m(_batch(x, y, step), s, [], 0.5)
        opt.zero_grad()
        sum(v for k, v in terms.items() if k.startswith("loss")).mean().backward()
        opt.step()
    s.eval(), m.eval()
    deployed = m.deploy(s, []).eval()
    assert count_parameters(deployed) == count_parameters(s) < count_parameters(s) + count_parameters(m)
    with torch.no_grad():
        exit_s = m.exits(s, x)[1][-1]
        assert torch.allclose(deployed(x), exit_s, atol=1e-6)
        assert torch.allclose(m.predict(s, [], x), exit_s, atol=1e-6)
    meta = {"student_spec": s.spec.model_dump(mode="json"), "student_num_classes": K,
            "classes": [str(i) for i in range(K)], "deploy": m.deploy_info()}
    res = save_export(deployed, tmp_path / "export", meta, x, onnx=False)
    assert res.parameters == count_parameters(s)
    loaded = load_student(tmp_path / "export")
    with torch.no_grad():
        assert torch.allclose(loaded(x), exit_s, atol=1e-6)
