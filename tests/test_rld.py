"""training/rld.py: the RLD method module (methods.md §2) on real images; the loss-level
properties (§2.6: masks, golden values, degenerate masks, gradients) are in tests/test_losses.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from webkd.pipeline.config import ModelSpec
from webkd.training import losses
from webkd.training.models import build_model, freeze
from webkd.training.rld import RLD


@pytest.fixture(scope="module")
def setup(pacs32):
    rng = np.random.default_rng(4)
    idx = rng.choice(len(pacs32.labels), 12, replace=False)
    x = torch.from_numpy(pacs32.images[idx]).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)
    student = build_model(ModelSpec(name="cnn_tiny"), 7)
    teachers = [freeze(build_model(ModelSpec(name="cnn_tiny"), 7)), freeze(build_model(ModelSpec(name="cnn_tiny"), 7))]
    return x, torch.from_numpy(pacs32.labels[idx]).long(), student, teachers


def _batch(x, y):
    return {"x": x, "labels": y, "index": torch.arange(len(x)), "generator": torch.Generator().manual_seed(0)}


def test_terms_are_the_weighted_rld_parts_on_the_mean_teacher(setup):
    x, y, student, teachers = setup
    m = RLD(beta=4.0)
    student.eval()
    out = m(_batch(x, y), student, teachers, 0.5)
    with torch.no_grad():
        zt = torch.stack([t(x).logits for t in teachers]).mean(0)
        zs = student(x).logits
    total, parts = losses.rld_loss(zs, zt, y, 0.5, beta=4.0)
    for k in ("ce", "scd", "mcd"):
        assert torch.allclose(out[f"loss_{k}"].detach(), parts[k], atol=1e-6)
    assert torch.allclose(sum(out.values()).detach(), total, atol=1e-6)
    student.train()


def test_warmup_and_missing_labels(setup):
    x, y, student, teachers = setup
    m = RLD(warmup=0.25)
    start = m(_batch(x, y), student, teachers, 0.0)
    assert (start["loss_scd"] == 0).all() and (start["loss_mcd"] == 0).all() and (start["loss_ce"] > 0).all()
    half = m(_batch(x, y), student, teachers, 0.125)
    full = m(_batch(x, y), student, teachers, 0.5)
    # warm-up factor min(progress / warmup, 1): 0.5 at 1/8, 1 from 1/4 on (same student: same parts)
    assert torch.allclose(half["loss_mcd"] * 2, full["loss_mcd"], atol=1e-5)
    y2 = y.clone()
    y2[:3] = -1   # rows without a (refined) label contribute nothing
    out = m(_batch(x, y2), student, teachers, 0.5)
    assert all((v[:3] == 0).all() for v in out.values())


def test_teachers_receive_no_gradient(setup):
    x, y, student, teachers = setup
    out = RLD()(_batch(x, y), student, teachers, 1.0)
    sum(out.values()).sum().backward()
    assert all(p.grad is None for t in teachers for p in t.parameters())
    assert student.classifier.weight.grad is not None
