"""Per-sample signals for curation: the KD^3 teacher share, combined predictions, confidences,
the teacher's top-2, k-NN agreement of teacher pseudo-labels, and [project] the relevance score
of the class-balanced / soft selection modes (teacher OOD score + k-NN agreement + web query prior).

Pure numpy on whole arrays (torch tensors are accepted and converted), so the results do not
depend on batching or row order. Methods spec: ../shared/docs/methods.md §1.3 (a)-(b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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


def log_softmax(logits: Any) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, float64 numpy."""
    z = as_numpy(logits)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


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


# --------------------------------------------------------------------------------------------
# [project] relevance: modes balanced / soft (selection/budgets.py)
# --------------------------------------------------------------------------------------------
def ood_score(logits: Any, kind: str = "energy", temperature: float = 1.0) -> np.ndarray:
    """Teacher in-distribution score that does not saturate like max softmax (higher = more
    in-distribution): `energy` T logsumexp(z / T) (the negative free energy), `max_logit` max z."""
    z = as_numpy(logits)  # (N, K)
    if kind == "max_logit":
        return z.max(axis=1)
    if kind != "energy":
        raise ValueError(f"unknown OOD score {kind!r}; expected 'energy' or 'max_logit'")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    y = z / temperature
    m = y.max(axis=1, keepdims=True)
    return temperature * (m[:, 0] + np.log(np.exp(y - m).sum(axis=1)))


def teacher_student_kl(teacher_logits: Any, student_logits: Any) -> np.ndarray:
    """(N,) KL(p_T || p_S) >= 0 at temperature 1, computed stably in log space: how far the student
    is from the teacher on each row (0 where they agree exactly)."""
    lt, ls = log_softmax(teacher_logits), log_softmax(student_logits)
    return np.maximum((np.exp(lt) * (lt - ls)).sum(axis=1), 0.0)


def robust_z(x: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """(x - median) / (1.4826 MAD) with median and MAD of x[ref] (all rows when ref is None);
    the standard deviation when the MAD is 0, and 1 when that is 0 too."""
    x = np.asarray(x, dtype=np.float64)
    r = x if ref is None else x[np.asarray(ref, dtype=bool)]
    if r.size == 0:
        return np.zeros_like(x)
    med = float(np.median(r))
    scale = 1.4826 * float(np.median(np.abs(r - med)))
    if not scale > 0:
        scale = float(r.std())
    return (x - med) / (scale if scale > 0 else 1.0)


def query_prior(web_class: np.ndarray | None, teacher_top1: np.ndarray) -> np.ndarray:
    """g (N,) in {-1, 0, 1}: +1 where the web query maps to the teacher's top-1 class, -1 where
    the query is off-class (web_class -1), 0 otherwise (in-class query the teacher disagrees
    with, or no query information at all)."""
    t1 = np.asarray(teacher_top1, dtype=np.int64)
    if web_class is None:
        return np.zeros(len(t1))
    wc = np.asarray(web_class, dtype=np.int64)
    if wc.shape != t1.shape:
        raise ValueError(f"web_class has {wc.shape} rows, teacher_top1 {t1.shape}")
    return (wc == t1).astype(np.float64) - (wc < 0).astype(np.float64)


@dataclass
class Relevance:
    """The relevance score R and its parts, every array (N,) row-aligned."""

    score: np.ndarray      # R
    ood: np.ndarray        # s: the raw teacher OOD score (energy or max logit)
    ood_z: np.ndarray      # robust_z(s) over the candidates (before the clip)
    knn_agree: np.ndarray  # a in [0, 1], NaN when off or without neighbours
    prior: np.ndarray      # g in {-1, 0, 1} (0 when the prior is off)


def relevance(teacher_logits: Any, kind: str = "energy", temperature: float = 1.0,
              candidates: np.ndarray | None = None, neighbors: np.ndarray | None = None, knn_weight: float = 0.0,
              knn_k: int | None = None, web_class: np.ndarray | None = None,
              query_weight: float = 0.0, clip: float | None = 3.0, knn_source: str = "teacher",
              ood_weight: float = 1.0) -> Relevance:
    """Relevance of each row to the teacher's task, from the teacher alone (no student):

        R_i = ood_weight * clip(robust_z(s)_i, -clip, clip) + knn_weight * (2 a_i - 1) + query_weight * g_i

    - s = `ood_score(z_T, kind, temperature)`, standardised by the median and MAD of the
      candidate rows (`robust_z`), so R is in "robust standard deviations" whatever the logit
      scale, and clipped to [-clip, clip] (None: not clipped) so that a teacher that is
      confidently wrong with huge logits on off-class images cannot outvote the other terms;
    - a_i = share of the row's first `knn_k` FAISS neighbours (itself and -1 left out) whose
      label equals the row's teacher top-1 (`knn_agreement`): the neighbour's teacher top-1
      (knn_source "teacher"), or the class its web query maps to (knn_source "query": an image
      among off-class queries scores low even where the teacher is sure of it); a row without
      neighbours gets the neutral 2a - 1 = 0. Only when knn_weight > 0 (then `neighbors` is
      required, and `web_class` for knn_source "query");
    - g_i = `query_prior(web_class, top-1 of z_T)`: +1 query = teacher top-1, -1 off-class query,
      0 otherwise. Only when query_weight > 0 (then `web_class` is required).

    Deterministic and independent of row order (given neighbours re-indexed with the rows).
    """
    zt = as_numpy(teacher_logits)  # (N, K)
    if zt.ndim != 2:
        raise ValueError(f"teacher logits must be (N, K), got {zt.shape}")
    n = len(zt)
    cand = np.ones(n, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    s = ood_score(zt, kind, temperature)
    sz = robust_z(s, cand)
    t1 = zt.argmax(axis=1)
    agree = np.full(n, np.nan)
    score = ood_weight * (sz if clip is None else np.clip(sz, -clip, clip))
    if knn_weight > 0:
        if neighbors is None:
            raise ValueError("relevance.knn_weight > 0 needs neighbours (N, k) from the FAISS index")
        if knn_source == "query":
            if web_class is None:
                raise ValueError("relevance.knn_source=query needs web_class (the web query's teacher class)")
            labels = np.asarray(web_class, dtype=np.int64)
        elif knn_source == "teacher":
            labels = t1
        else:
            raise ValueError(f"unknown knn_source {knn_source!r}; expected 'teacher' or 'query'")
        agree = knn_agreement(t1, labels, neighbors, k=knn_k)
        score += knn_weight * np.nan_to_num(2.0 * agree - 1.0, nan=0.0)
    prior = np.zeros(n)
    if query_weight > 0:
        if web_class is None:
            raise ValueError("relevance.query_weight > 0 needs web_class (the web query's teacher class)")
        prior = query_prior(web_class, t1)
        score += query_weight * prior
    return Relevance(score=score, ood=s, ood_z=sz, knn_agree=agree, prior=prior)
