"""selection/scores.py: the KD^3 teacher-share schedule and combined predictions
(methods.md §1.6 item 1), confidences, top-2, k-NN agreement."""
from __future__ import annotations

import math

import numpy as np
import pytest

from webkd.selection import scores as sc


def _official(e: int) -> float:
    """helper/util.py of the official KD^3 code, written out literally (240 epochs)."""
    return 1 - math.exp(-5 * ((e + 1) / 160 - 1) ** 2) if e < 120 else 0.0


def test_schedule_golden_values():
    assert sc.teacher_share(1) == pytest.approx(0.9924, abs=5e-5)
    assert sc.teacher_share(119) == pytest.approx(0.2684, abs=5e-5)
    assert round(sc.teacher_share(1), 4) == 0.9924 and round(sc.teacher_share(119), 4) == 0.2684
    assert all(sc.teacher_share(e) == 0.0 for e in range(120, 300))


def test_schedule_equals_official_code_and_progress_form():
    for e in range(240):
        assert sc.teacher_share(e, 240) == pytest.approx(_official(e), abs=1e-12)
        assert sc.teacher_share_progress((e + 1) / 240) == pytest.approx(_official(e), abs=1e-12)
    for total in (10, 20, 40):  # a short project run uses the same curve over its own length
        for e in range(total):
            assert sc.teacher_share(e, total) == pytest.approx(sc.teacher_share_progress((e + 1) / total), abs=1e-12)
        assert sc.teacher_share(total // 2, total) == 0.0 and sc.teacher_share(total // 2 - 1, total) > 0.2


def test_schedule_non_increasing():
    epochs = [sc.teacher_share(e) for e in range(240)]
    assert all(a >= b for a, b in zip(epochs, epochs[1:]))
    grid = [sc.teacher_share_progress(p) for p in np.linspace(0, 1, 1001)]
    assert all(a >= b for a, b in zip(grid, grid[1:]))
    assert grid[0] == pytest.approx(1 - math.exp(-5)) and grid[-1] == 0.0
    assert sc.teacher_share_progress(0.5) == pytest.approx(1 - math.exp(-5 * 0.25 ** 2))
    assert sc.teacher_share_progress(0.5 + 1e-9) == 0.0


def test_schedule_rejects_bad_input():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            sc.teacher_share_progress(bad)
    with pytest.raises(ValueError):
        sc.teacher_share(-1)
    with pytest.raises(ValueError):
        sc.teacher_share(0, total=0)


def test_combine_logits_endpoints_and_mix():
    rng = np.random.default_rng(0)
    zt, zs = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    np.testing.assert_array_equal(sc.combine_logits(zt, zs, 1.0), zt)   # z_bar = z_T at alpha 1
    np.testing.assert_array_equal(sc.combine_logits(zt, zs, 0.0), zs)   # z_bar = z_S at alpha 0
    np.testing.assert_array_equal(sc.combine_logits(zt, None, 0.3), zt)  # no student yet: teacher alone
    np.testing.assert_allclose(sc.combine_logits(zt, zs, 0.25), 0.25 * zt + 0.75 * zs)
    with pytest.raises(ValueError):
        sc.combine_logits(zt, zs[:, :3], 0.5)
    with pytest.raises(ValueError):
        sc.combine_logits(zt, zs, 1.2)


def test_combine_logits_on_torch_tensors():
    torch = pytest.importorskip("torch")
    zt, zs = torch.randn(5, 3), torch.randn(5, 3, requires_grad=True)
    out = sc.combine_logits(zt, zs, 0.4)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, 0.4 * zt + 0.6 * zs)
    pred, conf = sc.prediction(out)  # grad-tracking tensors convert without error
    assert pred.shape == (5,) and np.all((conf > 1 / 3 - 1e-9) & (conf <= 1))


def test_prediction_and_top2():
    z = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 0.0]])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    pred, conf = sc.prediction(z)
    np.testing.assert_array_equal(pred, [0, 2, 0])            # a tie goes to the lower class
    np.testing.assert_allclose(conf, p.max(1))
    t1, t2, p1, p2 = sc.top2(z)
    np.testing.assert_array_equal(t1, [0, 2, 0])
    np.testing.assert_array_equal(t2, [1, 0, 1])
    np.testing.assert_allclose(p1, p.max(1))
    np.testing.assert_allclose(p2, np.sort(p, 1)[:, -2])
    big = sc.softmax(np.array([[1000.0, 0.0]]))                 # stable for large logits
    assert np.isfinite(big).all() and big[0, 0] == pytest.approx(1.0)
    t1, t2, p1, p2 = sc.top2(np.zeros((2, 1)))
    assert (t2 == -1).all() and (p1 == 1).all() and (p2 == 0).all()


def test_knn_agreement():
    labels = np.array([0, 0, 1, 1, 2])
    neighbors = np.array([
        [0, 1, 2, 3],      # self ignored: neighbours 1 (0), 2 (1), 3 (1) -> 1/3 agree with 0
        [0, -1, -1, -1],   # only row 0 (label 0): 1/1
        [3, 4, 1, -1],     # 1/3
        [3, -1, -1, -1],   # only itself: NaN
        [2, 3, 0, 1],      # 0/4
    ])
    got = sc.knn_agreement(labels, labels, neighbors)
    np.testing.assert_allclose(got, [1 / 3, 1.0, 1 / 3, np.nan, 0.0])
    np.testing.assert_allclose(sc.knn_agreement(labels, labels, neighbors, k=1), [1.0, 1.0, 1.0, np.nan, 0.0])
    with pytest.raises(ValueError, match="out of range"):
        sc.knn_agreement(labels, labels, neighbors + 10)
    with pytest.raises(ValueError):
        sc.knn_agreement(labels, labels, neighbors[:3])
