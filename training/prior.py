"""[project] Prior correction of the deployed student: post-hoc logit adjustment for the class mix of
the web images it was distilled on (Menon et al. 2021, "Long-tail learning via logit adjustment").

A web pool found by class-name queries is not class-balanced in the teacher's eyes: on fashion-web
the teacher calls a third of the pool "Bag" and under 4% "Coat"; on the Tiny ImageNet pool whole
CIFAR-10 classes are rare. A student distilled on such a pool inherits the skew: where its
features are unsure it answers the frequent classes (fashion-web: 99% of Fashion-MNIST sneakers
predicted "Sandal", no coat recognised). The target, the teacher's own task, is taken as balanced
(`export.prior_correction.target: uniform`) or given as class shares.

- prior pi: the teacher's mean class probability (softmax of the mean teacher logits, T 1) over the
  rows the student trained on, each weighted by how much it trained: the sum over epochs of kept x
  weight from the decision ledgers (a resumed run has the same ledgers, so the same prior);
- deployed logits: z(x) + tau (log pi_target - log pi), one constant vector added to the logits (an
  Add in the ONNX graph, stored as the buffer `logit_offset` beside the weights);
- tau: a number, or `auto`, chosen on validation only: the value of `taus` with the highest
  class-balanced agreement with the teacher on the validation rows (the mean over the teacher's
  top-1 classes of the per-class agreement; plain agreement would reward copying the pool's skew),
  ties to the smaller tau. The test set plays no part.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from webkd.selection.scores import softmax

log = logging.getLogger(__name__)

PRIOR_FLOOR = 1e-4   # no class is taken rarer than this (log pi stays finite)
BASE = "base."       # the wrapped module's key prefix in the export's weights


def ledger_mass(ledgers: Sequence[Path], num_rows: int) -> np.ndarray:
    """(N,) how much each manifest row trained: the sum over the given ledgers of kept x weight."""
    import pyarrow.parquet as pq

    mass = np.zeros(num_rows, dtype=np.float64)
    for path in ledgers:
        t = pq.read_table(path, columns=["row", "kept", "weight"]).to_pydict()
        rows = np.asarray(t["row"], dtype=np.int64)
        w = np.asarray(t["kept"], dtype=np.float64) * np.nan_to_num(np.asarray(t["weight"], dtype=np.float64))
        ok = (rows >= 0) & (rows < num_rows)
        np.add.at(mass, rows[ok], w[ok])
    return mass


def trained_prior(teacher_logits: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """(K,) the teacher's class shares over the trained rows, weighted by `mass` (floored, sums to 1)."""
    mass = np.asarray(mass, dtype=np.float64)
    if mass.sum() <= 0:
        raise ValueError("no trained rows in the ledgers: the prior of the training images is undefined")
    rows = np.flatnonzero(mass > 0)
    p = (softmax(teacher_logits[rows]) * mass[rows, None]).sum(0) / mass[rows].sum()
    p = np.maximum(p, PRIOR_FLOOR)
    return p / p.sum()


def target_prior(target: str | Sequence[float], num_classes: int) -> np.ndarray:
    if isinstance(target, str):
        if target != "uniform":
            raise ValueError(f"export.prior_correction.target={target!r}: use `uniform` or a list of class shares")
        return np.full(num_classes, 1.0 / num_classes)
    t = np.asarray(target, dtype=np.float64)
    if t.shape != (num_classes,) or (t <= 0).any():
        raise ValueError(f"export.prior_correction.target: {num_classes} positive class shares expected, "
                         f"got {list(target)}")
    return t / t.sum()


def logit_offset(prior: np.ndarray, target: np.ndarray, tau: float) -> np.ndarray:
    return tau * (np.log(target) - np.log(prior))


def balanced_agreement(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present in `ref` of the share of their rows where pred == ref."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    per = [float((pred[ref == k] == k).mean()) for k in range(num_classes) if (ref == k).any()]
    return float(np.mean(per)) if per else float("nan")


@dataclass
class Choice:
    tau: float
    prior: np.ndarray
    target: np.ndarray
    scores: dict[float, tuple[float, float]] = field(default_factory=dict)  # tau -> (agreement, balanced)

    @property
    def offset(self) -> np.ndarray:
        return logit_offset(self.prior, self.target, self.tau)

    def info(self) -> dict[str, Any]:
        """What the export's metadata and the model card record."""
        return {"tau": self.tau, "prior": [round(float(v), 6) for v in self.prior],
                "target": [round(float(v), 6) for v in self.target],
                "offset": [round(float(v), 6) for v in self.offset],
                "val": {f"{t:g}": {"agreement": a, "balanced_agreement": b} for t, (a, b) in self.scores.items()}}


def choose_tau(val_logits: np.ndarray, val_teacher: np.ndarray, prior: np.ndarray, target: np.ndarray,
               tau: float | str, taus: Sequence[float]) -> Choice:
    """The tau to deploy: the given number, or (`auto`) the one of `taus` with the highest
    class-balanced validation agreement, ties to the smaller tau. Both agreements are recorded
    for every tau tried (tau 0 always: the uncorrected student)."""
    K = prior.size
    grid = sorted({0.0, *map(float, taus)} if tau == "auto" else {0.0, float(tau)})
    scores = {}
    for t in grid:
        pred = (np.asarray(val_logits, dtype=np.float64) + logit_offset(prior, target, t)).argmax(1)
        scores[t] = (float((pred == val_teacher).mean()) if len(pred) else float("nan"),
                     balanced_agreement(pred, val_teacher, K))
    if tau == "auto":
        best = max(grid, key=lambda t: (np.nan_to_num(scores[t][1], nan=-1.0), -t))
    else:
        best = float(tau)
    return Choice(tau=best, prior=prior, target=target, scores=scores)


class PriorCorrected(nn.Module):
    """deployed(x) + logit_offset: the exported module when the correction is on."""

    def __init__(self, base: nn.Module, offset: np.ndarray | torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("logit_offset", torch.as_tensor(np.asarray(offset), dtype=torch.float32).reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.logit_offset


def unwrap_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An export's weights as the uncorrected deployed module's (warm starts read these)."""
    if "logit_offset" not in state:
        return state
    return {k[len(BASE):]: v for k, v in state.items() if k.startswith(BASE)}


def correct(deployed: nn.Module, pool, ledgers: Sequence[Path], cfg, device: torch.device,
            batch_size: int = 512) -> tuple[nn.Module, Choice | None]:
    """(the module to deploy, the choice) for `export.prior_correction` `cfg` (tau 0: `deployed`
    unchanged, no choice). `pool` is the run's training.pool.Pool; `ledgers` the run's decision
    ledgers up to the last epoch trained."""
    if cfg.tau == 0:
        return deployed, None
    if pool.teacher_logits is None:
        log.warning("export.prior_correction: no teacher logits over the run's classes (teachers of other tasks, "
                    "or no feature cache): the student is exported uncorrected")
        return deployed, None
    from webkd.training.loop import predict_logits

    K = pool.teacher_logits.shape[1]
    mass = ledger_mass(ledgers, len(pool))
    if mass.sum() <= 0:   # no ledger rows (none written yet): every training candidate once
        log.warning("export.prior_correction: the ledgers name no trained rows; the prior is taken over every "
                    "training candidate")
        mass = np.asarray(pool.candidates, dtype=np.float64)
    prior = trained_prior(pool.teacher_logits, mass)
    target = target_prior(cfg.target, K)
    rows = pool.validation_rows
    if cfg.tau == "auto" and not len(rows):
        raise ValueError("export.prior_correction.tau=auto chooses on validation rows, and the pool has none: "
                         "set data.val_fraction > 0 or give tau a number")
    with torch.no_grad():
        logits = predict_logits(lambda x: deployed(x), pool.pixels, rows, device, batch_size) if len(rows) \
            else np.zeros((0, K))
    choice = choose_tau(logits, pool.teacher_logits[rows].argmax(1), prior, target, cfg.tau, cfg.taus)
    if choice.tau == 0:
        return deployed, choice
    return PriorCorrected(deployed, choice.offset).to(device).eval(), choice
