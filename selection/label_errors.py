"""Likely label errors of a run: confident learning over the teacher's probabilities.

The score is confident learning's (Northcutt, Jiang and Chuang, "Confident Learning: Estimating
Uncertainty in Dataset Labels", JAIR 2021), the rule cleanlab's `find_label_issues` builds its
confident joint with, in numpy:

- the given label of a row is its web query's class (`web_class`, after human corrections); rows
  whose query maps to no class (off-class) have no given label and are never flagged;
- per-class thresholds t_j = the mean teacher probability of class j over the rows labelled j;
- a row's confident class is the class j with p_j >= t_j of highest p_j (none when no class
  reaches its threshold); the row is a likely label error when its confident class is not its
  given label (an off-diagonal entry of the confident joint);
- flagged rows are ranked by the normalized margin max_{j != y} p_j - p_y (cleanlab's
  `normalized_margin` ranking, sign flipped so that higher = more likely wrong), and the
  confident class is the suggested label (cleanlab/cleanlab#337: suggest, do not only flag).

The probabilities are the softmax of the teachers' cached logits (mean over teachers of the
run's classes, `features/<key>.logits.npy`) when every manifest row has them, else rebuilt from
the ledger's teacher top-2 (p1, p2 on their classes, the rest spread evenly), which ranks the
same rows on the same rule with a coarser p_y.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelErrors:
    flagged: np.ndarray       # (N,) bool: confident class differs from the given label
    score: np.ndarray         # (N,) float: max_{j != y} p_j - p_y where flagged, NaN elsewhere
    suggested: np.ndarray     # (N,) int64: the confident class where flagged, -1 elsewhere
    thresholds: np.ndarray    # (K,) per-class thresholds t_j (inf for a class no row is labelled with)
    source: str               # "teacher logits" | "ledger top-2"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def probs_from_top2(t1: np.ndarray, p1: np.ndarray, t2: np.ndarray, p2: np.ndarray, k: int) -> np.ndarray:
    """(N, K) probabilities from a ledger's teacher top-2 (rows without a teacher: uniform)."""
    n = len(t1)
    t1, t2 = np.asarray(t1, np.int64), np.asarray(t2, np.int64)
    p1 = np.nan_to_num(np.asarray(p1, np.float64), nan=1.0 / max(k, 1))
    p2 = np.nan_to_num(np.asarray(p2, np.float64), nan=1.0 / max(k, 1))
    rest = np.clip(1.0 - p1 - p2, 0.0, None) / max(k - 2, 1)
    p = np.repeat(rest[:, None], k, axis=1)                          # (N, K)
    rows = np.arange(n)
    ok1, ok2 = (t1 >= 0) & (t1 < k), (t2 >= 0) & (t2 < k) & (t2 != t1)
    p[rows[ok1], t1[ok1]] = p1[ok1]
    p[rows[ok2], t2[ok2]] = p2[ok2]
    none = ~ok1
    p[none] = 1.0 / max(k, 1)
    return p


def confident_learning(probs: np.ndarray, labels: np.ndarray, source: str = "teacher logits") -> LabelErrors:
    """Likely label errors (see the module docstring). probs (N, K), labels (N,) int, -1 = none."""
    p = np.asarray(probs, np.float64)                                # (N, K)
    y = np.asarray(labels, np.int64)                                 # (N,)
    n, k = p.shape
    has = (y >= 0) & (y < k)
    thr = np.full(k, np.inf)
    for j in range(k):
        m = has & (y == j)
        if m.any():
            thr[j] = p[m, j].mean()
    above = p >= thr[None, :]                                        # (N, K)
    conf_class = np.where(above.any(axis=1), np.where(above, p, -np.inf).argmax(axis=1), -1)
    flagged = has & (conf_class >= 0) & (conf_class != y)
    yc = np.clip(y, 0, k - 1)
    p_y = p[np.arange(n), yc]
    other = p.copy()
    other[np.arange(n), yc] = -np.inf
    margin = other.max(axis=1) - p_y                                 # (N,)
    return LabelErrors(flagged=flagged, score=np.where(flagged, margin, np.nan),
                       suggested=np.where(flagged, conf_class, -1).astype(np.int64), thresholds=thr,
                       source=source)
