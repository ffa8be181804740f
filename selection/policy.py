"""KD^3 dynamic instance selection -> `Selection(keep, weight, reason)`, per-class thresholds,
and the per-epoch decision ledger (`selection/epoch_<kkk>.parquet`).

Spec: ../shared/docs/methods.md §1.3(b) and §7 point 1. Once per (re-)selection, over the whole
pool: z_bar = alpha z_T + (1 - alpha) z_S, c = max softmax(z_bar), y_hat = argmax,
tau_k = p_cut beta_k / (2 - beta_k) with beta_k = n_k / max_j n_j, keep iff c > tau_{y_hat}.
Everything works on whole arrays, so the result does not depend on batch size or row order.

Rows that are not candidates (validation split, manifest status near_duplicate) are scored for
the ledger but never kept, and do not count in n_k: pass `split` and `status` to `select`, which
gives them the reasons `validation` / `near_duplicate`. `ledger_table` refuses a Selection that
keeps a validation row, so a ledger always shows what training used.

The per-step instance weight w_i (teacher-student disagreement) is computed in the training
step, not here: `weight` is 1.0 for kept rows and 0 for rejected ones, except in the [project]
mode soft (selection/budgets.py), where every eligible candidate gets its relevance weight in
[w_min, 1] and trains (reason `low_relevance` outside the budget share).

[project] Modes balanced / soft (selection/budgets.py) replace the thresholds by class-balanced
budgets on the teacher-only relevance score R (`selection.scores.relevance`): `threshold` is
NaN there, `class_budgets` holds n_c, and `relevance` holds R.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from webkd.pipeline.config import SelectionConfig
from webkd.pipeline.paths import ledgers_in
from webkd.pipeline.records import (BELOW_BUDGET, BELOW_CLASS_THRESHOLD, FALLBACK, KNN_DISAGREE, LOW_CONFIDENCE,
                                    LOW_RELEVANCE, NO_SELECTION, NOT_SAMPLED, OFF_CLASS, OK, SELECTED, VALIDATION)
from webkd.pipeline.storage import atomic_write_table
from webkd.selection.budgets import budget_keep, class_budgets, percentile_rank, soft_weights
from webkd.selection.scores import (as_numpy, combine_logits, knn_agreement, prediction, relevance, robust_z,
                                    teacher_share_progress, teacher_student_kl, top2)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")

LEDGER_SCHEMA = pa.schema([
    ("id", pa.string()), ("row", pa.int64()), ("epoch", pa.int32()), ("split", pa.string()),
    ("kept", pa.bool_()), ("weight", pa.float32()), ("reason", pa.string()),
    ("pseudo_label", pa.int32()), ("confidence", pa.float32()), ("threshold", pa.float32()),
    ("teacher_share", pa.float32()),
    ("teacher_top1", pa.int32()), ("teacher_top2", pa.int32()),
    ("teacher_p1", pa.float32()), ("teacher_p2", pa.float32()),
    ("student_pred", pa.int32()), ("student_conf", pa.float32()),
    ("web_label", pa.string()), ("web_class", pa.int32()), ("knn_agree", pa.float32()),
])
# Optional columns (PLL label refinement, selection/refine.py): present only when the run trains
# on refined labels. `ledger_table(..., label_columns=...)` appends them; readers accept both.
LABEL_FIELDS = [("refined_label", pa.int32()), ("label_pair_1", pa.int32()), ("label_pair_2", pa.int32()),
                ("label_agree", pa.bool_())]
LEDGER_SCHEMA_WITH_LABELS = pa.schema(list(LEDGER_SCHEMA) + [pa.field(n, t) for n, t in LABEL_FIELDS])


@dataclass
class Selection:
    """One selection over the pool; every array is (N,) and row-aligned with the manifest."""

    keep: np.ndarray            # bool
    weight: np.ndarray          # float32: 1.0 kept, 0 rejected
    reason: np.ndarray          # str (object): pipeline.records KEEP_REASONS or REJECT_REASONS
    pseudo_label: np.ndarray    # int64: argmax of the combined prediction
    confidence: np.ndarray      # float64: max softmax of the combined prediction
    threshold: np.ndarray       # float64: tau of the row's pseudo-label
    teacher_share: float        # alpha used
    teacher_top1: np.ndarray    # int64
    teacher_top2: np.ndarray    # int64 (-1 with a single class)
    teacher_p1: np.ndarray      # float64
    teacher_p2: np.ndarray      # float64
    student_pred: np.ndarray    # int64, -1 before the student exists
    student_conf: np.ndarray    # float64, NaN before the student exists
    knn_agree: np.ndarray       # float64, NaN when the k-NN check is off
    class_thresholds: np.ndarray  # (K,) float64 tau_k (NaN in modes balanced / soft)
    class_counts: np.ndarray      # (K,) int64 n_k over the candidates
    class_budgets: np.ndarray | None = None  # (K,) int64 n_c of modes balanced / soft
    relevance: np.ndarray | None = None      # (N,) float64 R of modes balanced / soft

    def __len__(self) -> int:
        return len(self.keep)

    def kept_per_class(self) -> np.ndarray:
        """(K,) number of kept rows per pseudo-label."""
        return np.bincount(self.pseudo_label[self.keep], minlength=len(self.class_thresholds))

    def summary(self) -> str:
        reasons, counts = np.unique(self.reason.astype(str), return_counts=True)
        parts = ", ".join(f"{r} {c}" for r, c in zip(reasons, counts))
        return f"kept {int(self.keep.sum())}/{len(self)} (alpha {self.teacher_share:.4f}): {parts}"


def class_thresholds(pseudo_labels: np.ndarray, num_classes: int, p_cut: float = 0.95,
                     tau_min: float = 0.0) -> np.ndarray:
    """tau_k = p_cut beta_k / (2 - beta_k), beta_k = n_k / max_j n_j, floored at tau_min.

    The most-predicted class gets p_cut, a class never predicted gets 0 (or tau_min).
    """
    counts = np.bincount(np.asarray(pseudo_labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    top = counts.max() if counts.size else 0
    beta = counts / top if top > 0 else np.zeros(num_classes)  # (K,)
    tau = p_cut * beta / (2.0 - beta)
    return np.maximum(tau, tau_min)


def exclusion_reasons(n: int, split: Sequence[str] | np.ndarray | None = None,
                      status: Sequence[str] | np.ndarray | None = None) -> np.ndarray:
    """(N,) str: "" for candidate rows, else why the row is out of the pool before scoring:
    `validation` (split val) before `near_duplicate` (or any other non-ok manifest status)."""
    out = np.full(n, "", dtype=object)
    if status is not None:
        st = np.asarray(status, dtype=object)
        if len(st) != n:
            raise ValueError(f"status has {len(st)} rows, logits {n}")
        bad = st != OK
        out[bad] = st[bad]
    if split is not None:
        sp = np.asarray(split, dtype=object)
        if len(sp) != n:
            raise ValueError(f"split has {len(sp)} rows, logits {n}")
        unknown = set(sp.tolist()) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split values {sorted(map(str, unknown))}; expected {SPLITS}")
        out[sp == "val"] = VALIDATION
    return out


def random_subset(candidates: np.ndarray, keep: float, seed: int) -> np.ndarray:
    """(N,) bool: round(keep * #candidates) candidates drawn without replacement by a numpy
    generator seeded with `seed` (selection.mode=random; the same subset on every call)."""
    rows = np.flatnonzero(candidates)
    n_keep = int(round(keep * len(rows)))
    out = np.zeros(len(candidates), dtype=bool)
    out[np.random.default_rng(seed).choice(rows, n_keep, replace=False)] = True
    return out


def _check_rows(name: str, arr: Any, n: int, dtype: Any) -> np.ndarray | None:
    if arr is None:
        return None
    a = np.asarray(arr, dtype=dtype)
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, logits {n}")
    return a


def select(teacher_logits: Any, student_logits: Any | None, progress: float, cfg: SelectionConfig,
           web_class: np.ndarray | None = None, neighbors: np.ndarray | None = None,
           previous_keep: np.ndarray | None = None, split: Sequence[str] | np.ndarray | None = None,
           status: Sequence[str] | np.ndarray | None = None) -> Selection:
    """KD^3 dynamic instance selection over the whole pool.

    teacher_logits / student_logits (N, K) numpy or torch; student None before training (the
    teacher alone decides). progress in [0, 1] drives alpha (cfg.mode "teacher": alpha 1).
    web_class (N,) int, -1 for off-class queries (needed by cfg.query_top2); neighbors (N, k)
    manifest rows from the FAISS index (needed by cfg.knn.enabled); previous_keep (N,) bool, the
    last selection (for cfg.fallback "previous"); split (N,) "train"/"val" and status (N,)
    manifest status exclude rows from the pool (see the module docstring).

    Reasons, first match wins: validation / near_duplicate (not candidates), low_confidence
    (c <= tau_min), below_class_threshold (c <= tau_y_hat), off_class, knn_disagree, else
    selected; with cfg.mode "none" every candidate is kept with reason `no_selection`. An empty selection falls back (reason `fallback`) to the previous kept set, or to
    every candidate.

    [project] cfg.mode balanced / soft (selection/budgets.py): R = `relevance(z_T, ...)` from
    cfg.relevance, pseudo-class = teacher top-1 (cfg.budget.refresh: argmax of z_bar with alpha >=
    refresh_alpha_min), plus with relevance.discrepancy_weight the clipped robust z of
    KL(p_T || p_S) when student logits are given (`teacher_student_kl`), and first match wins: validation / near_duplicate, off_class
    (cfg.query_top2), knn_disagree (cfg.knn.enabled), selected (inside the class budget n_c),
    else below_budget (balanced: weight 0) or low_relevance (soft: trained with its weight).
    Mode soft weights every eligible candidate w_min + (1 - w_min) u^power, selected rows included.
    """
    zt = as_numpy(teacher_logits)  # (N, K)
    if zt.ndim != 2:
        raise ValueError(f"teacher logits must be (N, K), got {zt.shape}")
    n, k = zt.shape
    zs = None if student_logits is None else as_numpy(student_logits)  # (N, K)
    if zs is not None and zs.shape != zt.shape:
        raise ValueError(f"student logits {zs.shape} and teacher logits {zt.shape} differ in shape")
    for name, z in (("teacher", zt), ("student", zs)):
        if z is not None and not np.isfinite(z).all():
            raise ValueError(f"{name} logits contain {int((~np.isfinite(z)).sum())} non-finite values")
    web_class = _check_rows("web_class", web_class, n, np.int64)
    previous_keep = _check_rows("previous_keep", previous_keep, n, bool)
    excl = exclusion_reasons(n, split, status)
    cand = excl == ""

    budgeted = cfg.mode in ("balanced", "soft")
    if budgeted:  # groups: the teacher's top-1, or (refresh) the mixed prediction with a floored share
        alpha = (1.0 if zs is None or not cfg.budget.refresh
                 else max(teacher_share_progress(progress), cfg.budget.refresh_alpha_min))
    else:
        alpha = 1.0 if zs is None or cfg.mode == "teacher" else teacher_share_progress(progress)
    zbar = combine_logits(zt, zs, alpha)  # (N, K)
    pred, conf = prediction(zbar)
    t1, t2, p1, p2 = top2(zt)
    if zs is not None:
        s_pred, s_conf = prediction(zs)
    else:
        s_pred, s_conf = np.full(n, -1, dtype=np.int64), np.full(n, np.nan)

    counts = np.bincount(pred[cand], minlength=k)
    tau = class_thresholds(pred[cand], k, cfg.p_cut, cfg.tau_min)  # (K,)
    thr = tau[pred]  # (N,)

    agree = np.full(n, np.nan)
    knn_bad = np.zeros(n, dtype=bool)
    if cfg.knn.enabled:
        if neighbors is None:
            raise ValueError("selection.knn.enabled needs neighbours (N, k) from the FAISS index")
        agree = knn_agreement(pred, zt.argmax(axis=1), neighbors, k=cfg.knn.k)
        knn_bad = np.nan_to_num(agree, nan=1.0) < cfg.knn.min_agree
    off = np.zeros(n, dtype=bool)
    if cfg.query_top2:
        if web_class is None:
            raise ValueError("selection.query_top2 needs web_class (the web query's teacher class)")
        off = (web_class < 0) | ((web_class != t1) & (web_class != t2))

    budgets = rel = None
    weight = None
    if budgeted:
        r = cfg.relevance
        rv = relevance(zt, r.score, r.temperature, candidates=cand, neighbors=neighbors, knn_weight=r.knn_weight,
                       knn_k=cfg.knn.k, web_class=web_class, query_weight=r.query_weight, clip=r.clip,
                       knn_source=r.knn_source, ood_weight=r.ood_weight)
        rel = rv.score
        if r.discrepancy_weight > 0 and zs is not None:  # the student in the loop: where it is furthest from the teacher
            d = robust_z(teacher_student_kl(zt, zs), cand)
            rel = rel + r.discrepancy_weight * (d if r.clip is None else np.clip(d, -r.clip, r.clip))
        if r.knn_weight > 0 and not cfg.knn.enabled:
            agree = rv.knn_agree
        eligible = cand & ~off & ~knn_bad
        budgets = class_budgets(pred, eligible, k, cfg.budget)
        core = budget_keep(rel, pred, eligible, budgets)
        tau = np.full(k, np.nan)
        thr = np.full(n, np.nan)
        reason = np.select([~cand, off, knn_bad, core], [excl, OFF_CLASS, KNN_DISAGREE, SELECTED],
                           BELOW_BUDGET if cfg.mode == "balanced" else LOW_RELEVANCE).astype(object)
        if cfg.mode == "soft":
            u = percentile_rank(rel, eligible, pred if cfg.soft.per_class else None)
            weight = soft_weights(u, cfg.soft).astype(np.float32)
    elif cfg.mode == "none":
        reason = np.where(cand, NO_SELECTION, excl).astype(object)
    elif cfg.mode == "random":
        reason = np.where(cand & random_subset(cand, cfg.random_keep, cfg.random_seed), SELECTED,
                          np.where(cand, NOT_SAMPLED, excl)).astype(object)
    else:
        reason = np.select(
            [~cand, conf <= cfg.tau_min, conf <= thr, off, knn_bad],
            [excl, LOW_CONFIDENCE, BELOW_CLASS_THRESHOLD, OFF_CLASS, KNN_DISAGREE],
            SELECTED).astype(object)
    keep = (reason == SELECTED) | (reason == NO_SELECTION)

    if cand.any() and not keep.any():
        if cfg.fallback == "previous" and previous_keep is not None and (previous_keep & cand).any():
            keep, source = previous_keep & cand, "the previous selection"
        else:
            keep, source = cand.copy(), "every candidate"
        reason[keep] = FALLBACK
        weight = None
        log.warning("selection kept nothing (alpha %.4f); falling back to %s (%d rows)", alpha, source,
                    int(keep.sum()))

    if weight is None:
        weight = keep.astype(np.float32)
    sel = Selection(keep=keep, weight=weight, reason=reason, pseudo_label=pred,
                    confidence=conf, threshold=thr, teacher_share=float(alpha), teacher_top1=t1,
                    teacher_top2=t2, teacher_p1=p1, teacher_p2=p2, student_pred=s_pred, student_conf=s_conf,
                    knn_agree=agree, class_thresholds=tau, class_counts=counts, class_budgets=budgets,
                    relevance=rel)
    kept = sel.kept_per_class()
    log.info("selection: %s", sel.summary())
    if budgets is not None:
        log.info("per class (k: n_k, budget, kept): %s",
                 "; ".join(f"{c}: {counts[c]}, {budgets[c]}, {kept[c]}" for c in range(k)))
        return sel
    log.info("per class (k: n_k, tau_k, kept): %s",
             "; ".join(f"{c}: {counts[c]}, {tau[c]:.4f}, {kept[c]}" for c in range(k)))
    return sel


# --------------------------------------------------------------------------------------------
# the decision ledger
# --------------------------------------------------------------------------------------------
def ledger_table(selection: Selection, ids: Sequence[str], rows: Sequence[int] | np.ndarray, epoch: int,
                 split: Sequence[str] | np.ndarray | None = None,
                 web_labels: Sequence[str | None] | None = None,
                 web_class: Sequence[int] | np.ndarray | None = None,
                 label_columns: dict[str, np.ndarray] | None = None) -> pa.Table:
    """The ledger of one epoch as a pyarrow Table with exactly LEDGER_SCHEMA (ARCHITECTURE.md).

    split defaults to "train" for every row. A validation row must have been excluded by
    `select(..., split=...)` (reason `validation`, not kept); anything else is an error, so the
    ledger never disagrees with what training used.

    label_columns (optional, from `selection.refine.label_columns`): refined_label,
    label_pair_1, label_pair_2, label_agree per row; the table then has
    LEDGER_SCHEMA_WITH_LABELS.
    """
    n = len(selection)
    split_arr = np.full(n, "train", dtype=object) if split is None else np.asarray(split, dtype=object)
    web_class_arr = np.full(n, -1, dtype=np.int64) if web_class is None else np.asarray(web_class, dtype=np.int64)
    labels = [None] * n if web_labels is None else list(web_labels)
    for name, col in (("ids", ids), ("rows", rows), ("split", split_arr), ("web_labels", labels),
                      ("web_class", web_class_arr)):
        if len(col) != n:
            raise ValueError(f"{name} has {len(col)} entries, the selection {n}")
    val = split_arr == "val"
    bad = val & (selection.keep | (selection.reason != VALIDATION))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} validation rows are kept or lack reason {VALIDATION!r} "
                         "(pass split= to select())")
    cols = {
        "id": [str(i) for i in ids], "row": np.asarray(rows, dtype=np.int64),
        "epoch": np.full(n, epoch, dtype=np.int32), "split": split_arr.astype(str),
        "kept": selection.keep.astype(bool), "weight": selection.weight.astype(np.float32),
        "reason": selection.reason.astype(str), "pseudo_label": selection.pseudo_label.astype(np.int32),
        "confidence": selection.confidence.astype(np.float32), "threshold": selection.threshold.astype(np.float32),
        "teacher_share": np.full(n, selection.teacher_share, dtype=np.float32),
        "teacher_top1": selection.teacher_top1.astype(np.int32), "teacher_top2": selection.teacher_top2.astype(np.int32),
        "teacher_p1": selection.teacher_p1.astype(np.float32), "teacher_p2": selection.teacher_p2.astype(np.float32),
        "student_pred": selection.student_pred.astype(np.int32),
        "student_conf": selection.student_conf.astype(np.float32),
        "web_label": labels, "web_class": web_class_arr.astype(np.int32),
        "knn_agree": selection.knn_agree.astype(np.float32),
    }
    schema = LEDGER_SCHEMA
    if label_columns is not None:
        missing = [n for n, _ in LABEL_FIELDS if n not in label_columns]
        if missing:
            raise ValueError(f"label_columns lacks {missing}")
        for name, _ in LABEL_FIELDS:
            if len(label_columns[name]) != n:
                raise ValueError(f"label column {name} has {len(label_columns[name])} entries, the selection {n}")
            cols[name] = np.asarray(label_columns[name])
        schema = LEDGER_SCHEMA_WITH_LABELS
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)


def _check_schema(table: pa.Table, where: str) -> None:
    if not (table.schema.equals(LEDGER_SCHEMA, check_metadata=False)
            or table.schema.equals(LEDGER_SCHEMA_WITH_LABELS, check_metadata=False)):
        raise ValueError(f"{where}: ledger schema differs from LEDGER_SCHEMA:\n{table.schema}")


def write_ledger(path: str | Path, table: pa.Table) -> Path:
    """Write one epoch's ledger atomically (Parquet)."""
    _check_schema(table, str(path))
    atomic_write_table(path, table)
    return Path(path)


def ledger_unchanged(path: str | Path, table: pa.Table) -> bool:
    """True when `path` already holds exactly this ledger (so it need not be written again)."""
    p = Path(path)
    if not p.exists():
        return False
    try:
        old = pq.read_table(p)
    except (OSError, ValueError, pa.ArrowException):
        return False
    if not old.schema.equals(table.schema, check_metadata=False):
        return False
    for name in table.column_names:  # NaN == NaN here (teacher-only rows have no student scores)
        a, b = old.column(name).to_numpy(zero_copy_only=False), table.column(name).to_numpy(zero_copy_only=False)
        same = np.array_equal(a, b, equal_nan=True) if a.dtype.kind == "f" else np.array_equal(a, b)
        if not same:
            return False
    return True


def read_ledger(path: str | Path) -> pa.Table:
    table = pq.read_table(path)
    _check_schema(table, str(path))
    return table


def read_ledgers(selection_dir: str | Path) -> list[tuple[int, pa.Table]]:
    """Every `epoch_<kkk>.parquet` in the folder as (epoch, table), sorted by epoch."""
    return [(e, read_ledger(p)) for e, p in ledgers_in(selection_dir)]
