"""PLL two-hot label refinement as a curation step (Jeong & Chung, ICLR 2025; methods.md §3, §7.2).

Noisy web query labels -> refined labels, for consumers of hard labels (CE, RLD, MixSKD):

1. teacher probe W_0: a bias-free linear classifier on frozen teacher embeddings (the feature
   cache), trained with CE on the noisy query labels of the train split;
2. pairs {s₁, s₂}: W_0's top-2 classes per image (ties to the lower class index);
3. student probe W_1: trained once on the two-hot targets ½(e_s₁ + e_s₂), in the paper form
   −½(log p_s₁ + log p_s₂) (default) or the code form (GCE, q = 0.7); from zeros, or from W_0
   as the official code does;
4. y* = argmax W_1 φ(x) (never the teacher's argmax); `agree` = the query label is in the pair.

Both probes are selected on the validation split (the epoch with the best validation accuracy;
the test set never enters). SGD, momentum 0.9, batch 128, lr × 0.98 per epoch, weight decay
(SelfPLL `train_linear.py`; small-scale constants of methods.md §3.4).

`fit_linear_probe` also runs the baselines of the benchmark: CE on hard labels and the
multi-round self-distillation (CE against softmax(W_{r-1} φ)). The two-hot loss is written here
(one line) rather than imported, because `selection` may not import `training`
(tests check it equals `training.losses.two_hot_ce` / `gce_loss`).

`write_labels` stores the result as `labels.parquet` (RunPaths.labels): id, refined_label
(null where none), pair_1, pair_2, agree; the probes' validation accuracies, chosen epochs and
settings go into the file's schema metadata. `label_columns` reads it back, row-aligned, for
the decision ledger.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from webkd.pipeline.progress import tqdm

from webkd.pipeline.config import RefineConfig
from webkd.pipeline.storage import atomic_write_table

log = logging.getLogger(__name__)

ProbeLoss = Literal["ce", "soft", "paper", "gce"]

LABELS_SCHEMA = pa.schema([("id", pa.string()), ("refined_label", pa.int32()), ("pair_1", pa.int32()),
                           ("pair_2", pa.int32()), ("agree", pa.bool_())])


@dataclass
class Probe:
    """A bias-free linear probe (K, D) on (scaled) features, and how it was chosen."""

    weight: np.ndarray               # (K, D) float32
    mean: np.ndarray                 # (D,) feature shift applied before the probe
    scale: np.ndarray                # (D,) feature scale applied before the probe
    val_acc: float
    epoch: int
    history: list[float] = field(default_factory=list)   # validation accuracy per epoch

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, K) logits."""
        x = (np.asarray(features, np.float32) - self.mean) / self.scale
        return x @ self.weight.T


def feature_scaling(features: np.ndarray, rows: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) for `mode`: "raw" leaves features as they are (the paper's unnormalised
    features); "standardize" z-scores each dimension with the statistics of `rows` (scale
    floored at 1% of the mean std)."""
    d = features.shape[1]
    if mode == "raw":
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    if mode != "standardize":
        raise ValueError(f"feature scaling must be 'raw' or 'standardize'; got {mode!r}")
    x = np.asarray(features[rows], np.float64)
    std = x.std(0)
    # floor near-constant dimensions (e.g. dead units) so they are not blown up to huge values
    return x.mean(0).astype(np.float32), np.maximum(std, 0.01 * std.mean() + 1e-12).astype(np.float32)


def two_hot_set_loss(logits: torch.Tensor, classes: torch.Tensor, form: str = "paper", q: float = 0.7) -> torch.Tensor:
    """Per-sample partial-label loss over a class set (B, k): paper −mean log p_c; gce mean (1 − p_c^q)/q."""
    logp = F.log_softmax(logits, dim=1).gather(1, classes)               # (B, k)
    if form == "paper":
        return -logp.mean(dim=1)                                          # (B,)
    return ((1 - logp.exp().pow(q)) / q).mean(dim=1)                      # (B,)


def _loss(logits: torch.Tensor, target: torch.Tensor, kind: str, q: float) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, target)
    if kind == "soft":
        return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    return two_hot_set_loss(logits, target, kind, q).mean()


def fit_linear_probe(features: np.ndarray, targets: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
                     val_labels: np.ndarray, num_classes: int, loss: ProbeLoss = "ce", *, epochs: int = 60,
                     batch_size: int = 128, lr: float = 0.05, lr_decay: float = 0.98, momentum: float = 0.9,
                     weight_decay: float = 5e-4, q: float = 0.7, init: np.ndarray | None = None,
                     scaling: tuple[np.ndarray, np.ndarray] | None = None, feature_mode: str = "standardize",
                     seed: int = 0, desc: str | None = None) -> Probe:
    """Train a bias-free linear probe W (K, D) on `features[train_rows]` and keep the epoch with
    the best validation accuracy (`val_labels[val_rows]`, earliest on ties).

    targets, by `loss`: "ce" hard labels (N,); "soft" distributions (N, K) (self-distillation);
    "paper"/"gce" class sets (N, k) (two-hot partial labels). `init` (K, D) starts from given
    weights (in the same feature scaling), else zeros.
    """
    train_rows, val_rows = np.asarray(train_rows), np.asarray(val_rows)
    if len(train_rows) == 0:
        raise ValueError("linear probe: no training rows (no image has a usable label)")
    mean, scale = scaling if scaling is not None else feature_scaling(features, train_rows, feature_mode)
    x_all = torch.from_numpy((np.asarray(features, np.float32) - mean) / scale)   # (N, D)
    tgt = torch.from_numpy(np.asarray(targets))
    tgt = tgt.float() if loss == "soft" else tgt.long()
    d = x_all.shape[1]
    w = torch.zeros(num_classes, d) if init is None else torch.tensor(init, dtype=torch.float32).clone()
    w.requires_grad_(True)
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    g = torch.Generator().manual_seed(seed)
    xv = x_all[torch.from_numpy(val_rows)] if len(val_rows) else None
    yv = np.asarray(val_labels)[val_rows] if len(val_rows) else None
    best = (-1.0, -1, w.detach().clone())
    history = []
    tr = torch.from_numpy(train_rows)
    quiet = desc is None or epochs * len(train_rows) < 2_000_000   # a bar only for long fits
    for epoch in tqdm(range(epochs), desc=desc, leave=False, disable=quiet):
        order = tr[torch.randperm(len(tr), generator=g)]
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            logits = x_all[b] @ w.t()                                    # (B, K)
            opt.zero_grad(set_to_none=True)
            _loss(logits, tgt[b], loss, q).backward()
            opt.step()
        sched.step()
        if xv is not None:
            with torch.no_grad():
                acc = float(((xv @ w.t()).argmax(1).numpy() == yv).mean())
        else:
            acc = float("nan")
        history.append(acc)
        if xv is None or acc > best[0]:
            best = (acc, epoch, w.detach().clone())
    acc, epoch, weight = best
    return Probe(weight=weight.numpy(), mean=mean, scale=scale, val_acc=acc, epoch=epoch, history=history)


def top2(logits: np.ndarray) -> np.ndarray:
    """(N, K) -> (N, 2) top-2 classes, ties to the lower class index (a stable sort)."""
    order = np.argsort(-np.asarray(logits, np.float64), axis=1, kind="stable")
    return order[:, :2].astype(np.int64)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@dataclass
class Refinement:
    """The result of one two-hot refinement round, row-aligned with the features."""

    refined_label: np.ndarray        # (N,) int64, -1 where no refined label is given
    pair: np.ndarray                 # (N, 2) int64, the teacher probe's top-2
    agree: np.ndarray                # (N,) bool, query label in the pair
    teacher: Probe
    student: Probe
    settings: dict[str, Any]

    def summary(self) -> str:
        n = len(self.refined_label)
        labelled = int((self.refined_label >= 0).sum())
        return (f"refined {labelled}/{n} rows; teacher probe val acc {self.teacher.val_acc:.4f} (epoch "
                f"{self.teacher.epoch}), two-hot probe val acc {self.student.val_acc:.4f} (epoch "
                f"{self.student.epoch}); query label in the top-2 pair for {int(self.agree.sum())} rows")


def refine_labels(features: np.ndarray, query_labels: np.ndarray, train_mask: np.ndarray, val_mask: np.ndarray,
                  num_classes: int, cfg: RefineConfig | None = None, val_labels: np.ndarray | None = None,
                  seed: int = 0, teacher: Probe | None = None) -> Refinement:
    """One PLL two-hot round on frozen features.

    features (N, D) frozen teacher embeddings; query_labels (N,) noisy labels (-1 off-class);
    train_mask / val_mask (N,) bool; val_labels (N,) labels scored on validation (default: the
    query labels, the only labels a web pool has). Returns refined labels for every row with a
    query label (all rows with `cfg.label_off_class`), the teacher pair and the agreement flag.
    `teacher`: an already fitted CE probe W_0 on the same rows (skips step 1; its feature scaling
    is reused).
    """
    cfg = cfg or RefineConfig()
    q_lab = np.asarray(query_labels, np.int64)
    val_labels = q_lab if val_labels is None else np.asarray(val_labels, np.int64)
    n = len(q_lab)
    if features.shape[0] != n:
        raise ValueError(f"features have {features.shape[0]} rows, labels {n}")
    if q_lab.max(initial=-1) >= num_classes:
        raise ValueError(f"query labels must lie in [-1, {num_classes}); got max {q_lab.max()}")
    train_rows = np.flatnonzero(np.asarray(train_mask, bool) & (q_lab >= 0))
    val_rows = np.flatnonzero(np.asarray(val_mask, bool) & (val_labels >= 0))
    if len(val_rows) == 0:
        log.warning("refine: no labelled validation rows; the probes keep their last epoch")
    scaling = (teacher.mean, teacher.scale) if teacher is not None else feature_scaling(features, train_rows, cfg.features)
    common = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, lr_decay=cfg.lr_decay,
                  momentum=cfg.momentum, weight_decay=cfg.weight_decay, q=cfg.q, scaling=scaling, seed=seed)
    if teacher is None:
        teacher = fit_linear_probe(features, q_lab, train_rows, val_rows, val_labels, num_classes, "ce",
                                   desc="refine: teacher probe", **common)
    pair = top2(teacher.logits(features))                                      # (N, 2)
    student = fit_linear_probe(features, pair, train_rows, val_rows, val_labels, num_classes, cfg.loss,
                               init=teacher.weight if cfg.init == "teacher" else None,
                               desc="refine: two-hot probe", **common)
    refined = student.logits(features).argmax(1).astype(np.int64)
    agree = (q_lab >= 0) & ((pair[:, 0] == q_lab) | (pair[:, 1] == q_lab))
    if not cfg.label_off_class:
        refined[q_lab < 0] = -1
    if cfg.drop_disagree:
        refined[~agree] = -1
    settings = {**cfg.model_dump(), "seed": seed, "train_rows": int(len(train_rows)), "val_rows": int(len(val_rows))}
    result = Refinement(refined_label=refined, pair=pair, agree=agree, teacher=teacher, student=student,
                        settings=settings)
    log.info("refine: %s", result.summary())
    return result


def write_labels(path: str | Path, ids: Sequence[str], result: Refinement, extra: dict[str, Any] | None = None) -> Path:
    """labels.parquet (atomically): id, refined_label (null where none), pair_1, pair_2, agree."""
    if len(ids) != len(result.refined_label):
        raise ValueError(f"{len(ids)} ids for {len(result.refined_label)} refined rows")
    refined = pa.array([int(v) if v >= 0 else None for v in result.refined_label], type=pa.int32())
    table = pa.table({"id": pa.array([str(i) for i in ids], pa.string()), "refined_label": refined,
                      "pair_1": pa.array(result.pair[:, 0], pa.int32()), "pair_2": pa.array(result.pair[:, 1], pa.int32()),
                      "agree": pa.array(result.agree.astype(bool), pa.bool_())}, schema=LABELS_SCHEMA)
    report = {"teacher_val_acc": result.teacher.val_acc, "teacher_epoch": result.teacher.epoch,
              "student_val_acc": result.student.val_acc, "student_epoch": result.student.epoch,
              "settings": result.settings, **(extra or {})}
    table = table.replace_schema_metadata({"webkd.refine": json.dumps(report, default=str)})
    atomic_write_table(path, table)
    return Path(path)


def read_labels_report(path: str | Path) -> dict[str, Any]:
    """The refinement report stored in labels.parquet's schema metadata."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"webkd.refine")
    return json.loads(raw) if raw else {}


def label_columns(path: str | Path, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """labels.parquet aligned to `ids`, as the ledger's optional label columns:
    refined_label, label_pair_1, label_pair_2 (int32, -1 where absent), label_agree (bool)."""
    t = pq.read_table(path).to_pydict()
    pos = {i: k for k, i in enumerate(t["id"])}
    idx = np.array([pos.get(str(i), -1) for i in ids], np.int64)
    hit = idx >= 0

    def col(name: str, fill: Any, dtype: Any) -> np.ndarray:
        vals = np.array([fill if v is None else v for v in t[name]], dtype=dtype)
        out = np.full(len(ids), fill, dtype=dtype)
        out[hit] = vals[idx[hit]]
        return out

    return {"refined_label": col("refined_label", -1, np.int32), "label_pair_1": col("pair_1", -1, np.int32),
            "label_pair_2": col("pair_2", -1, np.int32), "label_agree": col("agree", False, bool)}
