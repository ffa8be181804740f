"""training/pll.py: the PLL two-hot objective (methods.md §3) on real images; the target and loss
properties (§3.6) are in tests/test_losses.py, the label refinement in tests/test_refine.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from webkd.pipeline.config import ModelSpec
from webkd.training import losses
from webkd.training.models import build_model, freeze
from webkd.training.pll import PLL


@pytest.fixture(scope="module")
def setup(clothing):
    rng = np.random.default_rng(5)
    idx = rng.choice(len(clothing.labels), 10, replace=False)
    x = torch.from_numpy(clothing.images[idx]).permute(0, 3, 1, 2).float() / 255   # real 64 px photos
    torch.manual_seed(0)
    return x, build_model(ModelSpec(name="cnn_tiny"), 10), [freeze(build_model(ModelSpec(name="cnn_tiny"), 10))]


def _batch(x):
    return {"x": x, "labels": torch.full((len(x),), -1), "index": torch.arange(len(x)),
            "generator": torch.Generator().manual_seed(0)}


@pytest.mark.parametrize("form", ["paper", "gce"])
def test_loss_is_the_two_hot_loss_on_the_teachers_top2(setup, form):
    x, student, teachers = setup
    student.eval()
    out = PLL(form=form)(_batch(x), student, teachers, 0.3)
    with torch.no_grad():
        pair = losses.top2_classes(teachers[0](x).logits)
        zs = student(x).logits
    ref = losses.two_hot_ce(zs, pair) if form == "paper" else losses.gce_loss(zs, pair, 0.7)
    assert torch.allclose(out["loss_pll"].detach(), ref, atol=1e-6)
    if form == "paper":
        assert (out["loss_pll"] >= math.log(2) - 1e-6).all()      # two-hot CE >= ln 2
    else:
        assert ((out["loss_pll"] >= 0) & (out["loss_pll"] < 1 / 0.7)).all()
    student.train()


def test_label_free_by_default_and_teacher_frozen(setup):
    x, student, teachers = setup
    assert not PLL.needs_labels and PLL.needs_teacher
    out = PLL(ce_weight=0.5)(_batch(x), student, teachers, 0.3)
    assert (out["loss_ce"] == 0).all()                              # no labels: the CE part is 0
    sum(out.values()).sum().backward()
    assert all(p.grad is None for p in teachers[0].parameters())
    with pytest.raises(ValueError, match="form"):
        PLL(form="both")
