"""Per-sample signals for curation: the KD^3 teacher share, combined predictions, confidences,
the teacher's top-2, and k-NN agreement of teacher pseudo-labels.

Pure numpy on whole arrays (torch tensors are accepted and converted), so the results do not
depend on batching or row order. Methods spec: ../shared/docs/methods.md §1.3 (a)-(b).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def as_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """numpy view/copy of an array-like or a (CPU/GPU, grad-tracking) torch tensor, without
    importing torch here."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------------------------
# (a) teacher share
# --------------------------------------------------------------------------------------------
def teacher_share_progress(progress: float) -> float:
    """KD^3 teacher share in progress form [project]: alpha = 1 - exp(-5 (1.5 pi - 1)^2) for
    pi <= 0.5, else 0. With pi = (e+1)/240 this is the official epoch schedule."""
    if not 0.0 <= progress <= 1.0 + 1e-9:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if progress > 0.5:
        return 0.0
    return 1.0 - math.exp(-5.0 * (1.5 * progress - 1.0) ** 2)


def teacher_share(epoch: int, total: int = 240) -> float:
    """KD^3 teacher share at epoch e of `total` (official `helper/util.py`, total=240):
    alpha_e = 1 - exp(-5 ((e+1)/160 - 1)^2) for e < 120, else 0.

    For other totals the constants scale with the run (160 = 2/3 total, 120 = total/2), i.e.
    `teacher_share_progress((e + 1) / total)`; alpha(1) = 0.9924, alpha(119) = 0.2684.
    """
    if total < 1 or epoch < 0:
        raise ValueError(f"need epoch >= 0 and total >= 1, got epoch={epoch}, total={total}")
    if 2 * (epoch + 1) > total:  # e + 1 > total/2, i.e. e >= 120 at total 240
        return 0.0
    return 1.0 - math.exp(-5.0 * ((epoch + 1) / (total * 2.0 / 3.0) - 1.0) ** 2)


# --------------------------------------------------------------------------------------------
# (b) combined prediction
# --------------------------------------------------------------------------------------------
def combine_logits(teacher_logits: Any, student_logits: Any | None, alpha: float) -> Any:
    """z_bar = alpha * z_T + (1 - alpha) * z_S; the teacher alone when there is no student yet.

    Works on numpy arrays and torch tensors alike (plain arithmetic); exact at alpha 1 and 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits is None or alpha == 1.0:
        return teacher_logits
    if alpha == 0.0:
        return student_logits
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ in shape")
    return alpha * teacher_logits + (1.0 - alpha) * student_logits  # (N, K)


def softmax(logits: Any) -> np.ndarray:
    """Numerically stable softmax over the last axis, float64 numpy."""
    z = as_numpy(logits)  # (N, K)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def prediction(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """(argmax int64 (N,), max softmax probability float64 (N,)); ties go to the lower class."""
    p = softmax(logits)  # (N, K)
    pred = p.argmax(axis=1)
    return pred, p[np.arange(len(pred)), pred]


def top2(logits: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two most probable classes and their probabilities: (top1, top2, p1, p2).
    With a single class, top2 is -1 and p2 0."""
    p = softmax(logits)  # (N, K)
    n, k = p.shape
    order = np.argsort(-p, axis=1, kind="stable")[:, :2]  # (N, 2)
    rows = np.arange(n)
    t1 = order[:, 0]
    if k < 2:
        return t1, np.full(n, -1, dtype=np.int64), p[rows, t1], np.zeros(n)
    t2 = order[:, 1]
    return t1, t2, p[rows, t1], p[rows, t2]


def knn_agreement(pseudo_labels: np.ndarray, neighbor_labels: np.ndarray, neighbors: np.ndarray,
                  k: int | None = None) -> np.ndarray:
    """Share of each row's neighbours whose label equals the row's own pseudo-label.

    `neighbors` (N, k') holds row indices into `neighbor_labels` (e.g. the teacher's argmax per
    row), best first. -1 (faiss's "no neighbour") and the row itself are ignored, then the first
    `k` remaining neighbours are used (all when k is None). Rows with none left get NaN.
    """
    nb = np.asarray(neighbors, dtype=np.int64)  # (N, k')
    y = np.asarray(pseudo_labels)
    src = np.asarray(neighbor_labels)
    if nb.ndim != 2 or nb.shape[0] != len(y):
        raise ValueError(f"neighbors must be (N, k) with N={len(y)}, got {nb.shape}")
    if nb.size and nb.max() >= len(src):
        raise ValueError(f"neighbour id {int(nb.max())} out of range for {len(src)} rows")
    valid = (nb >= 0) & (nb != np.arange(len(y))[:, None])  # (N, k')
    if k is not None:
        valid &= np.cumsum(valid, axis=1) <= k
    same = valid & (src[np.where(valid, nb, 0)] == y[:, None])  # (N, k')
    count = valid.sum(axis=1)
    out = np.full(len(y), np.nan)
    has = count > 0
    out[has] = same.sum(axis=1)[has] / count[has]
    return out
