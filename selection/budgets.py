"""[project] Class-balanced budgets and soft relevance weights: selection.mode balanced / soft.

Both rank rows by the teacher-only relevance score R (`selection.scores.relevance`), computed on
the whole pool each time, so what is kept never feeds back on the kept set (unlike KD^3's
count-based thresholds, ../notes and BENCHMARKS.md's fashion-web section):

- groups: the pseudo-class of a row is the teacher's top-1, or with `budget.refresh` the argmax
  of z_bar = alpha z_T + (1 - alpha) z_S with alpha = max(KD^3 share, budget.refresh_alpha_min);
- budgets: a pseudo-class c with m_c eligible candidates keeps
  n_c = min(m_c, max(min_per_class, min(ceil(q m_c), cap))),
  cap = min(max_per_class, ceil(cap_median * median{ceil(q m_c) : m_c > 0})) (each optional),
  so a class with candidates is never emptied (min_per_class >= 1) and a catch-all class cannot
  take the pool; within a class the n_c highest R are kept, ties to the lower row. With
  budget.class_power beta < 1 the same total is shared out in proportion to m_c^beta instead
  (`shared_budgets`; beta 0: the same count for every pseudo-class, so the kept set does not
  inherit the teacher's class mix on the pool);
- soft weights: u = average-rank percentile of R in [0, 1] among the eligible candidates (over
  the pool, or within the pseudo-class with soft.per_class), w = w_min + (1 - w_min) u^power,
  non-decreasing in R.

Pure numpy on whole arrays; deterministic given the inputs.
"""
from __future__ import annotations

import math

import numpy as np

from webkd.pipeline.config import BudgetConfig, SoftConfig


def class_budgets(groups: np.ndarray, eligible: np.ndarray, num_classes: int, cfg: BudgetConfig) -> np.ndarray:
    """(K,) int64 n_c, the number of rows kept per pseudo-class (see the module docstring)."""
    m = np.bincount(np.asarray(groups, dtype=np.int64)[np.asarray(eligible, dtype=bool)],
                    minlength=num_classes)[:num_classes]
    if cfg.class_power < 1.0:
        return shared_budgets(m, cfg)
    want = np.array([math.ceil(cfg.keep * int(c) - 1e-9) for c in m], dtype=np.int64)  # ceil(q m_c)
    cap = np.iinfo(np.int64).max
    if cfg.max_per_class is not None:
        cap = min(cap, cfg.max_per_class)
    if cfg.cap_median is not None and (m > 0).any():
        cap = min(cap, math.ceil(cfg.cap_median * float(np.median(want[m > 0])) - 1e-9))
    return np.minimum(m, np.maximum(cfg.min_per_class, np.minimum(want, cap)))


def within_class_rank(score: np.ndarray, groups: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """(N,) int64: 0 for the most relevant eligible row of its group, 1 for the next, ...
    (ties to the lower row); -1 for rows that are not eligible."""
    score = np.asarray(score, dtype=np.float64)
    rows = np.flatnonzero(eligible)
    g = np.asarray(groups, dtype=np.int64)[rows]
    order = rows[np.lexsort((rows, -score[rows], g))]   # by group, then R descending, then row
    go = np.asarray(groups, dtype=np.int64)[order]
    start = np.r_[0, np.flatnonzero(np.diff(go)) + 1]    # first position of each group
    pos = np.arange(len(order)) - np.repeat(start, np.diff(np.r_[start, len(order)]))
    out = np.full(len(score), -1, dtype=np.int64)
    out[order] = pos
    return out


def budget_keep(score: np.ndarray, groups: np.ndarray, eligible: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """(N,) bool: the n_c most relevant eligible rows of each pseudo-class c."""
    rank = within_class_rank(score, groups, eligible)
    g = np.asarray(groups, dtype=np.int64)
    return (rank >= 0) & (rank < np.asarray(budgets)[g])


def percentile_rank(score: np.ndarray, eligible: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """(N,) u in [0, 1]: average rank of R among the eligible rows (of the row's group when
    `groups` is given), 0 the least and 1 the most relevant, equal R equal u; a group of one
    row gets 1. NaN for rows that are not eligible."""
    score = np.asarray(score, dtype=np.float64)
    elig = np.asarray(eligible, dtype=bool)
    out = np.full(len(score), np.nan)
    keys = np.zeros(len(score), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    for c in np.unique(keys[elig]):
        rows = np.flatnonzero(elig & (keys == c))
        v = score[rows]
        srt = np.sort(v)
        avg = (np.searchsorted(srt, v, "left") + np.searchsorted(srt, v, "right") - 1) / 2.0  # 0-based
        out[rows] = avg / (len(rows) - 1) if len(rows) > 1 else 1.0
    return out


def soft_weights(u: np.ndarray, cfg: SoftConfig) -> np.ndarray:
    """w = w_min + (1 - w_min) u^power in [w_min, 1]; 0 where u is NaN (not eligible)."""
    u = np.asarray(u, dtype=np.float64)
    w = cfg.w_min + (1.0 - cfg.w_min) * np.power(np.clip(np.nan_to_num(u, nan=0.0), 0.0, 1.0), cfg.power)
    return np.where(np.isnan(u), 0.0, w)


def shared_budgets(m: np.ndarray, cfg: BudgetConfig) -> np.ndarray:
    """(K,) int64 n_c for budget.class_power beta < 1: the total B = ceil(keep sum m_c) shared out in
    proportion to m_c^beta and water-filled, n_c = min(m_c, cap, max(min_per_class, ceil(s m_c^beta)))
    with the smallest s whose budgets reach B (or every candidate, when the caps leave less than B).
    beta 0 gives every class with candidates the same count L = s, except those with fewer than L
    (they keep all theirs and the others share what they leave). Monotone in s, so found by bisection;
    deterministic; at most B + K rows above the min_per_class floors (ceil rounds each class up)."""
    m = np.asarray(m, dtype=np.int64)
    total = math.ceil(cfg.keep * int(m.sum()) - 1e-9)
    cap = m if cfg.max_per_class is None else np.minimum(m, cfg.max_per_class)
    base = np.where(m > 0, np.power(np.maximum(m, 1).astype(np.float64), cfg.class_power), 0.0)

    def at(scale: float) -> np.ndarray:
        want = np.ceil(scale * base - 1e-9).astype(np.int64)
        return np.minimum(cap, np.maximum(np.minimum(cfg.min_per_class, m), want))

    lo, hi = 0.0, float(m.max(initial=0)) + 1.0      # at(hi): every class at its cap
    full = at(hi)
    if int(full.sum()) <= total:                       # the caps bind everywhere: keep what they allow
        return full
    for _ in range(100):
        mid = (lo + hi) / 2
        if int(at(mid).sum()) >= total:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-9:
            break
    return at(hi)
