"""training/unic.py: module-level properties of methods.md §5.5 on real PACS images, with two
teachers of different tasks (10 and 7 classes), as in the UNIC benchmark."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from webkd.pipeline.config import ModelSpec, RunPaths, SelectionConfig, TrainConfig
from webkd.training import losses
from webkd.training.export import count_parameters
from webkd.training.loop import fit, load_checkpoint
from webkd.training.methods import method_from_models
from webkd.training.pool import Pool
from webkd.training.models import build_model, freeze
from webkd.training.unic import UNIC


@pytest.fixture(scope="module")
def pacs_pool(pacs32):
    rng = np.random.default_rng(2)
    idx = rng.choice(len(pacs32.labels), 48, replace=False)
    return pacs32.images[idx], pacs32.labels[idx]


def _x(images):
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def _setup(images, seed=0, **kw):
    torch.manual_seed(seed)
    student = build_model(ModelSpec(name="cnn_tiny"), 10)
    teachers = [freeze(build_model(ModelSpec(name="cnn_tiny"), 10)),
                freeze(build_model(ModelSpec(name="cnn_small", kwargs={"width": 6}), 7))]
    return student, teachers, method_from_models("unic", student, teachers, _x(images[:4]), **kw)


def _batch(x, seed=0):
    return {"x": x, "labels": torch.full((len(x),), -1), "index": torch.arange(len(x)),
            "generator": torch.Generator().manual_seed(seed)}


def test_ladder_output_is_the_sum_of_its_heads(pacs_pool):
    images, _ = pacs_pool
    student, teachers, m = _setup(images, tokens=("cls", "patch"))
    x = _x(images[:6])
    feats = student(x).features
    for t in range(2):
        manual = sum(h(f.mean(dim=(2, 3))) for h, f in zip(m.heads[f"cls_{t}"], feats))
        assert torch.allclose(m.ladder(feats, "cls", t), manual, atol=1e-6)
        grid = tuple(teachers[t](x).features[-1].shape[-2:])
        patch = m.ladder(feats, "patch", t, grid)
        assert patch.shape == (6, grid[0] * grid[1], m.heads[f"patch_{t}"][0][-1].out_features)
    head = m.heads["cls_0"][0]
    assert head[0].out_features == 2 * head[-1].out_features        # hidden width 2·D_t
    assert torch.count_nonzero(head[0].bias) == 0 and head[0].weight.std() < 0.03


def test_first_batch_initialises_the_statistics(pacs_pool):
    images, _ = pacs_pool
    student, teachers, m = _setup(images)
    x = _x(images[:16])
    assert not bool(m.stats_ready)
    m.train()
    m(_batch(x), student, teachers, 0.0)
    emb = teachers[0](x).embedding
    # progress 0: momentum 1, so after the step the EMA equals this batch's statistics
    assert bool(m.stats_ready)
    assert torch.allclose(m.standardizers["cls_0"].mean, emb.mean(0), atol=1e-5)
    assert torch.allclose(m.standardizers["cls_0"].std, emb.std(0), atol=1e-5)
    # ... and the first targets were standardised with them, not with (0, 1)
    t_hat = m.standardize("cls_0", emb, 0.0)
    assert t_hat.mean(0).abs().max() < 1e-4


def test_teacher_dropping_keeps_the_worst_fitted_teacher_at_module_level(pacs_pool):
    images, _ = pacs_pool
    student, teachers, m = _setup(images)
    x = _x(images[:24])
    m.train()
    dropped = 0
    for seed in range(20):
        out = m(_batch(x, seed), student, teachers, 0.3)
        ell, flags = out["teacher_losses"], out["teacher_flags"]
        worst = ell.argmax(1)
        assert (flags[torch.arange(len(x)), worst] == 1).all()
        assert (flags.sum(1) >= 1).all() and not flags.requires_grad
        dropped += int((flags == 0).sum())
        expected = losses.combine_teachers(ell, flags)
        assert torch.allclose(out["loss_unic"].detach(), expected, atol=1e-6)
    assert dropped > 0     # p = 0.5 drops the other teacher sometimes
    _, _, keep_all = _setup(images, drop_p=0.0)
    out = keep_all(_batch(x), student, teachers, 0.3)
    assert (out["teacher_flags"] == 1).all()


def test_head_is_a_probe_on_the_detached_embedding(pacs_pool):
    images, _ = pacs_pool
    student, teachers, m = _setup(images)
    out = m(_batch(_x(images[:8])), student, teachers, 0.5)
    out["loss_head"].sum().backward()
    assert student.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.stem.parameters())   # no label signal into the encoder
    assert all(p.grad is None for p in m.parameters())


def test_statistics_are_saved_and_restored_with_the_checkpoint(pacs_pool, tmp_path):
    images, labels = pacs_pool
    student, teachers, m = _setup(images)
    n = len(images)
    with torch.no_grad():
        t_logits = teachers[0](_x(images)).logits.numpy()               # curation: the 10-class teacher
    pool = Pool(pixels=images, ids=[f"p{i}" for i in range(n)], split=np.array(["train"] * 40 + ["val"] * 8, object),
                status=np.array(["ok"] * n, object), labels=np.full(n, -1), web_labels=[None] * n,
                web_class=np.full(n, -1), val_labels=np.r_[np.full(40, -1), labels[40:] % 10],
                teacher_logits=t_logits)
    paths = RunPaths(tmp_path / "run")
    fit(student, teachers, m, pool, TrainConfig(method="unic", epochs=1, batch_size=16, lr=0.01),
        SelectionConfig(mode="none"), paths, seed=0)
    ck = load_checkpoint(paths.last_checkpoint)
    sd = ck["method"]
    assert bool(sd["stats_ready"])
    for key in ("cls_0", "cls_1"):
        assert not torch.equal(sd[f"standardizers.{key}.mean"], torch.zeros_like(sd[f"standardizers.{key}.mean"]))
        assert torch.equal(sd[f"standardizers.{key}.std"], m.standardizers[key].std)
    _, _, fresh = _setup(images, seed=5)
    fresh.load_state_dict(sd)
    assert bool(fresh.stats_ready)
    assert torch.equal(fresh.standardizers["cls_1"].mean, m.standardizers["cls_1"].mean)


def test_projectors_are_not_exported(pacs_pool):
    images, _ = pacs_pool
    student, teachers, m = _setup(images, tokens=("cls", "patch"))
    deployed = m.deploy(student, teachers)
    assert count_parameters(deployed) == count_parameters(student)
    assert not any("heads" in k or "standardizers" in k for k in deployed.state_dict())
    assert m.deploy_info() == {"head": "student"}
    x = _x(images[:4])
    with torch.no_grad():
        assert torch.equal(deployed.eval()(x), student.eval()(x).logits)


def test_single_teacher_is_the_plain_mean_and_bad_configs_fail(pacs_pool):
    images, _ = pacs_pool
    student, teachers, _ = _setup(images)
    m = UNIC.from_models(student, teachers[:1], _x(images[:4]), drop_p=0.5)
    out = m(_batch(_x(images[:8])), student, teachers[:1], 0.5)
    assert torch.allclose(out["loss_unic"].detach(), out["teacher_losses"][:, 0])
    with pytest.raises(ValueError, match="tokens"):
        UNIC.from_models(student, teachers[:1], _x(images[:4]), tokens=("nope",))
    with pytest.raises(ValueError, match="built for 1 teacher"):
        m(_batch(_x(images[:8])), student, teachers, 0.5)
