"""fit(): reselect -> train one epoch -> evaluate on validation -> checkpoint (atomic).

A function, not a class tree. Everything random is drawn from generators seeded by
(seed, epoch), and the checkpoint holds models, optimiser, scheduler, the previous selection
and the metric history, so a run killed at any point resumes from its last checkpoint and ends
with the same ledgers and metrics as an uninterrupted one (seeded, CPU). A checkpoint is tied to
what it was trained on (`checkpoint_identity`: pool ids hash, overrides, config fingerprint) and
holds tensors and plain values only, read back with `torch.load(weights_only=True)`; one of
another pool or config, or one that is truncated, foreign or refused, is ignored with a warning.
On several processes (`dist`, training/distributed.py) the same loop trains on each process's
slice of every global batch; rank 0 alone resumes and writes.

The best checkpoint is chosen on the validation split only; the test set never enters here.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from webkd.pipeline.progress import tqdm

from webkd.pipeline.config import SelectionConfig, TrainConfig
from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import (BELOW_BUDGET, BELOW_CLASS_THRESHOLD, KNN_DISAGREE, LOW_CONFIDENCE,
                                    LOW_RELEVANCE, OFF_CLASS, OVERRIDE)
from webkd.pipeline.storage import atomic_path, atomic_write_json, read_json
from webkd.selection import policy
from webkd.selection.counts import collapsed_classes, kept_per_class
from webkd.selection.overrides import apply_overrides
from webkd.training.distributed import LOCAL, Dist
from webkd.training.methods import Method
from webkd.training.pool import Pool, pool_state

log = logging.getLogger(__name__)

# rejections a soft selection (selection.reject_weight > 0) still trains on, down-weighted
SOFT_REJECTIONS = [BELOW_CLASS_THRESHOLD, LOW_CONFIDENCE, KNN_DISAGREE, OFF_CLASS, BELOW_BUDGET]
# rejections trained on with the weight the selection gave them (selection.mode=soft)
WEIGHTED_REJECTIONS = [LOW_RELEVANCE]


def validation_targets(pool: Pool, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(rows, targets, class_group) that `metric` scores, as `fit` scores them: `val_agreement`,
    the teacher's top-1 on every scored validation row (no groups); `val_acc`, the query labels
    of the labelled ones (classes in one group count as equal)."""
    rows = pool.validation_rows
    if metric == "val_agreement":
        if pool.teacher_logits is None:
            raise ValueError("val_agreement needs the pool's cached teacher logits")
        return rows, np.asarray(pool.teacher_logits, np.float32)[rows].argmax(1).astype(np.int64), None
    rows = rows[pool.val_labels[rows] >= 0]
    return rows, pool.val_labels[rows].astype(np.int64), pool.class_group


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_val: float
    paths: RunPaths
    resumed_from: int | None = None
    seconds: float = 0.0
    kept_last: int = 0
    trained_on: dict[str, Any] = field(default_factory=dict)   # checkpoint_identity: the pool it used

    def summary(self) -> str:
        last = self.history[-1] if self.history else {}
        return (f"best validation score {self.best_val:.4f} at epoch {self.best_epoch}; last epoch kept "
                f"{last.get('kept', 0)} / {last.get('candidates', 0)}; {self.seconds:.0f}s"
                + (f" (resumed after epoch {self.resumed_from})" if self.resumed_from is not None else ""))


# --------------------------------------------------------------------------------------------
# tensors from the pixel cache
# --------------------------------------------------------------------------------------------
def to_tensor(pixels: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (n, S, S, 3) rows -> float RGB in [0, 1], (n, 3, S, S)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels[rows]))       # (n, S, S, 3) uint8
    return x.to(device).permute(0, 3, 1, 2).float().div_(255.0)     # (n, 3, S, S)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                        draws: torch.Tensor | None = None) -> torch.Tensor:
    """Batched random-resized crop (+ horizontal flip) with one affine grid per image; `draws`:
    the (B, 5) uniforms to use (a process's slice of its global batch's), else drawn here."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator) if draws is None else draws      # (B, 5) on CPU
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)                                     # crop width, fraction
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)                                            # centre in [-1+w, 1-w]
    cy = (1 - h) * (2 * u[:, 3] - 1)
    flip = torch.where((u[:, 4] < 0.5) & hflip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


# --------------------------------------------------------------------------------------------
# evaluation and scoring
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(predict: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray, rows: np.ndarray,
                   device: torch.device, batch_size: int = 512, desc: str | None = None) -> np.ndarray:
    """Logits for the deterministic (full-image) view of `rows`, in blocks."""
    out = []
    it = range(0, len(rows), batch_size)
    for s in tqdm(it, desc=desc, leave=False, disable=desc is None or len(rows) < 4 * batch_size):
        out.append(predict(to_tensor(pixels, rows[s:s + batch_size], device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def val_metric_name(setting: str, method: Method, pool: Pool) -> str:
    """auto: agreement with the teacher for distillation methods (query labels of web images
    measure another task than the teacher's), accuracy on query labels otherwise."""
    if setting == "auto":
        return "val_agreement" if method.needs_teacher and pool.teacher_logits is not None else "val_acc"
    return {"agreement": "val_agreement", "query_acc": "val_acc"}[setting]


def validation_scores(logits: np.ndarray, rows: np.ndarray, pool: Pool) -> dict[str, float]:
    """val_acc: accuracy on the query-labelled validation rows (classes in one group count as
    equal); val_agreement: top-1 agreement with the (cached) teacher on every validation row."""
    nan = float("nan")
    if not len(rows):
        return {"val_acc": nan, "val_agreement": nan}
    acc = accuracy(logits, pool.val_labels[rows], pool.class_group)
    agree = nan
    if pool.teacher_logits is not None:
        agree = float((logits.argmax(1) == np.asarray(pool.teacher_logits)[rows].argmax(1)).mean())
    return {"val_acc": acc, "val_agreement": agree}


def accuracy(logits: np.ndarray, labels: np.ndarray, class_group: np.ndarray | None = None) -> float:
    """Top-1 accuracy over labelled rows (label >= 0); classes in one group count as equal."""
    m = labels >= 0
    if not m.any():
        return float("nan")
    pred = logits[m].argmax(1)
    lab = labels[m]
    if class_group is not None:
        pred, lab = class_group[pred], class_group[lab]
    return float((pred == lab).mean())


def _eval_mode(modules: list[nn.Module]):
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    return states


def _restore_mode(modules: list[nn.Module], states: list[bool]) -> None:
    for m, s in zip(modules, states):
        m.train(s)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, not a webkd checkpoint, or
    holding anything but tensors and plain values (refused unread by `weights_only=True`)."""


def _plain(obj: Any) -> Any:
    """Tensors and plain values only (what `torch.load(weights_only=True)` reads back): numpy
    arrays become tensors, numpy scalars Python numbers."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str):   # equal strings one object: pickle's memo (and so the bytes) then
        return sys.intern(obj)   # does not depend on whether a string was read back from a checkpoint
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Saved through a file object: torch.save given a path names the zip's records after that
    file (here the random temp name), so the same state gave other bytes in every run."""
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as fh:
        torch.save(_plain(state), fh)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by `fit`, read with `torch.load(weights_only=True)`: tensors and plain
    containers only, so a planted file cannot run code. Raises `CheckpointError` (one line) for a
    missing, truncated, foreign or refused file."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:   # UnpicklingError (objects refused), RuntimeError / EOFError (junk, truncated)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a readable webkd checkpoint ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("student"), dict) or not isinstance(ck.get("epoch"), int):
        raise CheckpointError(f"{path}: not a webkd checkpoint (no epoch and student state)")
    return ck


def checkpoint_identity(pool: Pool, overrides: dict[str, str] | None, run_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint was trained on: the pool (ids hash), the overrides and the run's config
    fingerprint (`training.pool.pool_state`, the registry's `trained_on`). A checkpoint is
    resumed only by a run with the same identity: a grown pool starts a new training."""
    return pool_state(list(pool.ids), overrides or {}, run_fingerprint, pool.relabels)


def _why_not(ck: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """None when `ck` belongs to this run; otherwise what differs."""
    before = ck.get("trained_on")
    if not isinstance(before, dict):
        return "it records no pool (an older or foreign checkpoint)"
    if before.get("config") != identity["config"]:
        return "it belongs to another run configuration"
    if before.get("ids_sha256") != identity["ids_sha256"]:
        return f"it was trained on another pool ({before.get('rows')} rows, now {identity['rows']})"
    if before.get("overrides_sha256") != identity["overrides_sha256"]:
        return "the overrides changed since it was written"
    return None


def _make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        milestones = [int(cfg.epochs * f) for f in (0.625, 0.75, 0.875)]  # 150/180/210 of 240
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def _scores_student(epoch: int, cfg: SelectionConfig) -> bool:
    """Whether this reselection needs the student's logits: the student-in-the-loop term (balanced /
    soft with discrepancy_weight > 0) from epoch 0 on; KD^3 and refreshed budgets after epoch 0."""
    if cfg.mode in ("balanced", "soft") and cfg.relevance.discrepancy_weight > 0:
        return True
    return epoch > 0 and (cfg.mode == "kd3" or (cfg.mode in ("balanced", "soft") and cfg.budget.refresh))


def reselect(epoch: int, progress: float, pool: Pool, method: Method, student: nn.Module,
             teachers: list[nn.Module], cfg: SelectionConfig, device: torch.device,
             previous_keep: np.ndarray | None, overrides: dict[str, str] | None,
             batch_size: int, dist: Dist = LOCAL) -> tuple[policy.Selection, np.ndarray]:
    """Score the whole pool (deterministic view, eval mode, no grad) and select.

    Epoch 0 is before training: the teacher alone decides. Returns the selection over all rows
    and the mask of rows to train on. Under DDP the scoring is shared out across the processes
    (`Dist.gather_rows`) and every process selects from the same logits.
    """
    n = len(pool)
    rows = np.arange(n)
    teacher_logits = pool.teacher_logits
    if teacher_logits is None and teachers:
        states = _eval_mode(teachers)
        teacher_logits = dist.gather_rows(lambda r: predict_logits(
            lambda x: torch.stack([t(x).logits.float() for t in teachers]).mean(0), pool.pixels, r, device,
            batch_size, desc="teacher scoring"), rows, batch_size)
        _restore_mode(teachers, states)
    student_logits = None
    if _scores_student(epoch, cfg):
        mods = [student, method]
        states = _eval_mode(mods)
        student_logits = dist.gather_rows(lambda r: predict_logits(
            lambda x: method.predict(student, teachers, x), pool.pixels, r, device, batch_size,
            desc="student scoring"), rows, batch_size)
        _restore_mode(mods, states)
    if teacher_logits is None:  # teacher-free methods: nothing to select with
        k = int(pool.labels.max()) + 1 if len(pool.labels) else 1
        teacher_logits = np.zeros((n, max(k, 1)), np.float32)
        sel_cfg = cfg.model_copy(update={"mode": "none"})
    else:
        sel_cfg = cfg
    sel = policy.select(np.asarray(teacher_logits, np.float32), student_logits, progress, sel_cfg,
                        web_class=pool.web_class, neighbors=pool.neighbors, previous_keep=previous_keep,
                        split=pool.split, status=pool.status)
    if overrides:  # forced keep / forced reject, reason "override" (validation rows untouched)
        sel.keep, sel.reason = apply_overrides(sel.keep, sel.reason, pool.ids, overrides)
        forced = sel.reason == OVERRIDE
        sel.weight = np.where(forced, sel.keep.astype(np.float32), sel.weight).astype(np.float32)
    train = sel.keep & (pool.split == "train")
    train |= (pool.split == "train") & np.isin(sel.reason, WEIGHTED_REJECTIONS) & (sel.weight > 0)
    if cfg.reject_weight > 0:  # soft selection: confidence rejections still count, down-weighted
        soft = ~sel.keep & (pool.split == "train") & np.isin(sel.reason, SOFT_REJECTIONS)
        sel.weight = np.where(soft, np.float32(cfg.reject_weight), sel.weight).astype(np.float32)
        train |= soft
    return sel, train


def warn_collapsed(epoch: int, sel: policy.Selection, split: np.ndarray, kept_start: np.ndarray | None,
                   class_names: list[str] | None = None) -> list[int]:
    """After a reselect: one warning line per class that lost (nearly) all its kept images since
    epoch 0 (`selection.counts.collapsed_classes`). Returns those classes."""
    if kept_start is None or epoch == 0:
        return []
    now = kept_per_class(sel.pseudo_label, sel.keep, split, len(sel.class_thresholds))
    out = collapsed_classes(kept_start, now).tolist()
    for c in out:
        name = class_names[c] if class_names and 0 <= c < len(class_names) else f"class {c}"
        log.warning("epoch %d: class %s lost (nearly) all its kept images: %d kept at epoch 0, %d now",
                    epoch, name, int(kept_start[c]), int(now[c]))
    return out


def _kept_at_start(path: Path, num_classes: int) -> np.ndarray | None:
    """Kept train rows per pseudo-label in the epoch-0 ledger (for a resumed run)."""
    if not path.exists():
        return None
    t = policy.read_ledger(path).select(["pseudo_label", "kept", "split"]).to_pydict()
    return kept_per_class(t["pseudo_label"], t["kept"], t["split"], num_classes)


def fit(student: nn.Module, teachers: list[nn.Module], method: Method, pool: Pool, train_cfg: TrainConfig,
        selection_cfg: SelectionConfig, paths: RunPaths, seed: int = 0, device: str | torch.device = "cpu",
        overrides: dict[str, str] | None = None, run_fingerprint: str = "",
        class_names: list[str] | None = None, dist: Dist = LOCAL) -> FitResult:
    """Distill `student` on the pool. Resumes from `paths.last_checkpoint` when it belongs to the
    same run: same `run_fingerprint` (e.g. a hash of the resolved config), same pool ids and
    overrides (`checkpoint_identity`); any other checkpoint, or one that is unreadable or not
    plain tensors, is ignored with a warning and training starts fresh. `class_names` name the
    classes in the warning about a class that lost its kept images. `dist`: this process's
    place in a DDP group (training/distributed.py); rank 0 alone reads the checkpoint to resume
    from and writes checkpoints, ledgers and metrics."""
    device = torch.device(device)
    t0 = time.time()
    torch.manual_seed(seed)
    student.to(device)
    method.to(device)
    for t in teachers:
        t.to(device)
    if method.needs_teacher and not teachers:
        raise ValueError(f"method {method.name!r} needs a teacher; configure `teachers:`")
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = _make_optimizer(params, train_cfg)
    sched = _make_scheduler(opt, train_cfg)

    history: list[dict[str, Any]] = []
    best_val, best_epoch, start, resumed_from = -1.0, -1, 0, None
    keep: np.ndarray | None = None            # the selection in force (candidates only)
    weights: np.ndarray | None = None
    last = paths.last_checkpoint
    identity = checkpoint_identity(pool, overrides, run_fingerprint)
    dist.barrier()                            # every process is up before rank 0 reads what to resume from
    resumed = None
    if dist.is_writer and last.exists():
        resumed = _resume(last, paths.best_checkpoint, identity, train_cfg.epochs, student, method, opt, sched,
                          device, paths)
    resumed = dist.share_start(resumed, [student, method, opt, sched])  # rank 0's decision and state
    if resumed is not None:
        history, best_val, best_epoch, keep, weights, resumed_from = resumed
        start = resumed_from + 1
        log.info("resuming after epoch %d from %s", resumed_from, last)

    val_rows = pool.validation_rows
    metric = val_metric_name(train_cfg.val_metric, method, pool)
    kept_start: np.ndarray | None = None      # kept train rows per class at epoch 0 (collapse warning)
    for epoch in range(start, train_cfg.epochs):
        progress = epoch / train_cfg.epochs
        # ---- reselect (epoch 0: before training, the teacher alone decides) -----------------
        if keep is None or epoch % selection_cfg.reselect_every == 0:
            sel, keep = reselect(epoch, (epoch + 1) / train_cfg.epochs, pool, method, student, teachers,
                                 selection_cfg, device, keep, overrides, train_cfg.eval_batch_size, dist)
            keep, weights = dist.broadcast_object((keep, sel.weight))   # one selection on every process
            if dist.is_writer:
                if epoch == 0:
                    kept_start = kept_per_class(sel.pseudo_label, sel.keep, pool.split, len(sel.class_thresholds))
                elif kept_start is None:
                    kept_start = _kept_at_start(paths.ledger(0), len(sel.class_thresholds))
                warn_collapsed(epoch, sel, pool.split, kept_start, class_names)
                policy.write_ledger(paths.ledger(epoch), policy.ledger_table(
                    sel, pool.ids, np.arange(len(pool)), epoch, pool.split, pool.web_labels, pool.web_class,
                    label_columns=pool.label_columns))
        rows = np.flatnonzero(keep)
        if method.needs_labels:
            rows = rows[pool.labels[rows] >= 0]
        # ---- train one epoch ---------------------------------------------------------------
        stats = train_one_epoch(student, teachers, method, pool, rows, weights, train_cfg, opt, epoch,
                                progress, seed, device, dist)
        sched.step()
        dist.broadcast_modules([student, method])    # (already equal: the same summed gradients everywhere)
        # ---- evaluate on validation -------------------------------------------------------
        mods = [student, method]
        states = _eval_mode(mods)
        val_logits = dist.gather_rows(lambda r: predict_logits(lambda x: method.predict(student, teachers, x),
                                                               pool.pixels, r, device, train_cfg.eval_batch_size),
                                      val_rows, train_cfg.eval_batch_size)
        _restore_mode(mods, states)
        scores = validation_scores(val_logits, val_rows, pool)
        score = scores[metric]
        record = {"epoch": epoch, "kept": int(len(rows)), "candidates": int(pool.candidates.sum()),
                  "val_rows": int(len(val_rows)), **scores, "val_metric": metric, "lr": opt.param_groups[0]["lr"], **stats}
        history.append(record)
        improved = (not math.isnan(score) and score > best_val) or best_epoch < 0
        if improved:
            best_val, best_epoch = (score if not math.isnan(score) else best_val), epoch
        if dist.is_writer:   # ---- checkpoint (rank 0 only) --------------------------------------
            if improved:
                _save_checkpoint(paths.best_checkpoint, {"epoch": epoch, "student": student.state_dict(),
                                                         "method": method.state_dict(), "val": scores,
                                                         "run_fingerprint": run_fingerprint, "trained_on": identity})
            _save_checkpoint(last, {"epoch": epoch, "student": student.state_dict(), "method": method.state_dict(),
                                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "history": history, "best_val": best_val, "best_epoch": best_epoch,
                                    "keep": keep, "weights": weights, "run_fingerprint": run_fingerprint,
                                    "trained_on": identity})
            _write_metrics(paths, history, best_epoch, best_val, identity)
        log.info("epoch %d: loss %.4f kept %d/%d val acc %.4f agreement %.4f", epoch, stats["loss"], len(rows),
                 record["candidates"], scores["val_acc"], scores["val_agreement"])
    if dist.is_writer and resumed_from is not None and not _metrics_match(paths.metrics, history):
        log.warning("%s is damaged or behind the checkpoint (a run killed between the two writes): "
                    "written again from the checkpoint's history", paths.metrics)
        _write_metrics(paths, history, best_epoch, best_val, identity)
    return FitResult(history=history, best_epoch=best_epoch, best_val=best_val, paths=paths,
                     resumed_from=resumed_from, seconds=time.time() - t0,
                     kept_last=history[-1]["kept"] if history else 0, trained_on=identity)


def _write_metrics(paths: RunPaths, history: list[dict[str, Any]], best_epoch: int, best_val: float,
                   identity: dict[str, Any]) -> None:
    """`metrics.json`: after every epoch, and again on a resume when the copy is damaged or behind last.pt."""
    atomic_write_json(paths.metrics, {"history": history, "best_epoch": best_epoch, "best_val": best_val,
                                      "trained_on": identity})


def _metrics_match(path: Path, history: list[dict[str, Any]]) -> bool:
    """Whether `metrics.json` holds this history (not damaged, not an epoch behind last.pt)."""
    m = read_metrics(path)
    return m is not None and json.dumps(m["history"], sort_keys=True, default=str) == \
        json.dumps(history, sort_keys=True, default=str)


def read_metrics(path: Path) -> dict[str, Any] | None:
    """`metrics.json` of a run, or None when absent or damaged (truncated, not an object)."""
    try:
        m = read_json(path, default=None)
    except (ValueError, OSError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("history"), list) else None


def _damaged_ledger(paths: RunPaths, upto: int) -> Path | None:
    """The first ledger of epochs 0..`upto` that cannot be read back (a checkpoint cannot rebuild it)."""
    for e, path in paths.ledgers():
        if e <= upto:
            try:
                policy.read_ledger(path)
            except Exception:   # truncated, not Parquet, wrong columns
                return path
    return None


def _resume(last: Path, best: Path, identity: dict[str, Any], epochs: int, student: nn.Module, method: Method,
            opt: torch.optim.Optimizer, sched, device: torch.device, paths: RunPaths):
    """(history, best_val, best_epoch, keep, weights, epoch) from `last` when it (and the best
    checkpoint beside it) belong to this run (`checkpoint_identity`); None, with a warning, for
    a checkpoint of another pool or config, or one that is unreadable, truncated or refused by
    `weights_only=True`, or when a ledger it stands on is damaged: training starts fresh (the
    same seeded run, so its ledgers are written again), with the models as they were."""
    try:
        ck = load_checkpoint(last, device)
        why = _why_not(ck, identity)
        if why is None and ck["epoch"] + 1 > epochs:
            why = f"it is past the configured {epochs} epochs"
        if why is None and (bad := _damaged_ledger(paths, int(ck["epoch"]))) is not None:
            why = f"the ledger {bad} it stands on is damaged (training again writes it anew)"
        if why is None:
            why = _why_not(load_checkpoint(best, device), identity)
            why = None if why is None else f"{best.name} beside it: {why}"
    except CheckpointError as exc:
        log.warning("ignoring %s, training from scratch: %s", last, exc)
        return None
    if why is not None:
        log.warning("ignoring %s, training from scratch: %s", last, why)
        return None
    before = [copy.deepcopy(m.state_dict()) for m in (student, method, opt, sched)]
    try:
        student.load_state_dict(ck["student"])
        method.load_state_dict(ck["method"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        keep = np.asarray(ck["keep"].cpu().numpy() if torch.is_tensor(ck["keep"]) else ck["keep"], bool)
        weights = np.asarray(ck["weights"].cpu().numpy() if torch.is_tensor(ck["weights"]) else ck["weights"],
                             np.float32)
        out = (list(ck["history"]), float(ck["best_val"]), int(ck["best_epoch"]), keep, weights, int(ck["epoch"]))
    except Exception as exc:   # a checkpoint with the right identity but the wrong content
        for m, state in zip((student, method, opt, sched), before):
            m.load_state_dict(state)
        log.warning("ignoring %s, training from scratch: its content does not fit this run (%s: %s)", last,
                    type(exc).__name__, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")
        return None
    return out


def train_one_epoch(student: nn.Module, teachers: list[nn.Module], method: Method, pool: Pool, rows: np.ndarray,
                    weights: np.ndarray, cfg: TrainConfig, opt: torch.optim.Optimizer, epoch: int,
                    progress: float, seed: int, device: torch.device, dist: Dist = LOCAL) -> dict[str, float]:
    """One pass over the kept rows. Per-sample loss terms are summed, weighted, reduced here.

    Under DDP (`dist`) every process walks the same global batches and trains on its slice of
    each (training/distributed.py: the same update as one process; a method's own randomness
    is drawn per process)."""
    student.train()
    method.train()
    for t in teachers:
        t.eval()
    g_order, g_aug, g_method = (_generator(seed, epoch, s) for s in range(3))
    if dist.rank:
        g_method = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, dist.rank]).generate_state(1)[0]))
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    buffers = list(student.buffers()) + list(method.buffers())
    order = rows[torch.randperm(len(rows), generator=g_order).numpy()] if len(rows) else rows
    if cfg.steps_per_epoch and len(rows) >= 2:  # a fixed step budget: further reshuffled passes, cut to length
        if cfg.steps_per_epoch == "candidates":    # the budget of one pass over every training candidate
            n_train = int((pool.candidates & (pool.split == "train")).sum())
            need = max(len(rows), -(-n_train // cfg.batch_size) * cfg.batch_size)
        else:
            need = cfg.steps_per_epoch * cfg.batch_size
        passes = [order] + [rows[torch.randperm(len(rows), generator=g_order).numpy()]
                            for _ in range(-(-need // len(rows)) - 1)]
        order = np.concatenate(passes)[:need]
    totals: dict[str, float] = {}
    n_seen = 0
    bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}", leave=False,
               disable=len(order) < 4 * cfg.batch_size)
    for step, s in enumerate(bar):
        b_all = order[s:s + cfg.batch_size]
        if len(b_all) < 2 * dist.world:  # BatchNorm and NT-Xent need two samples (on each process)
            continue
        mine = dist.shard(len(b_all))
        b = b_all[mine]
        u = torch.rand(len(b_all), 5, generator=g_aug)[mine]       # crop draws of the global batch, this slice
        x = random_resized_crop(to_tensor(pool.pixels, b, device), g_aug, cfg.crop_scale, hflip=cfg.hflip, draws=u)
        batch = {"x": x, "labels": torch.from_numpy(pool.labels[b]).to(device),
                 "index": torch.from_numpy(b).to(device), "generator": g_method,
                 "progress": progress}
        terms = method(batch, student, teachers, progress)
        per_sample = sum(v for k, v in terms.items() if k.startswith("loss"))       # (B,)
        w = torch.from_numpy(weights[b]).to(device=device, dtype=per_sample.dtype)  # (B,)
        loss = (w * per_sample).sum() / dist.all_sum(w.sum()).clamp_min(1e-8)  # this slice's part of the mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = dist.reduce_step(params, buffers, loss)   # DDP: gradients summed, BN statistics averaged
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at epoch {epoch}: { {k: v.mean().item() for k, v in terms.items()} }")
        opt.step()
        n_seen += len(b_all)
        for k, v in terms.items():
            if k.startswith("loss"):
                totals[k] = totals.get(k, 0.0) + float(v.detach().sum())
        totals["loss"] = totals.get("loss", 0.0) + float(loss) * len(b_all)
        if dist.is_writer:
            log.debug("epoch %d step %d loss %.9g", epoch, step, float(loss))
        bar.set_postfix(loss=f"{loss.item():.4f}", kept=f"{len(rows) / max(1, int(pool.candidates.sum())):.2f}")
    if dist.active and totals:   # the terms' sums over every process's slice
        keys = sorted(k for k in totals if k != "loss")
        summed = dist.all_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64)).tolist()
        totals.update(zip(keys, summed))
    if n_seen == 0:
        log.warning("epoch %d: fewer than %d kept rows, nothing to train on", epoch, 2 * dist.world)
    return {"loss": float("nan")} | {k: v / max(n_seen, 1) for k, v in totals.items()} | {"seen": n_seen}
