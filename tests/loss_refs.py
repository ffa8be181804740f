"""Reference loss forms the tests check `training/losses.py` against (not used in training):
DKD (what RLD reduces to), soft CE, two-hot targets, UNIC's official batch-level aggregation,
KD³'s pool_to_match; and the benchmarks' label-noise helpers, loaded from bench/label_noise.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from webkd.training import losses as L

_spec = importlib.util.spec_from_file_location("bench_label_noise",
                                               Path(__file__).resolve().parent.parent / "bench" / "label_noise.py")
label_noise = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(label_noise)
noise_matrix, inject_label_noise = label_noise.noise_matrix, label_noise.inject_label_noise


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample CE against target distributions: −Σ_k t_k·log p_k. ``targets`` is (B, K)."""
    L._check_logits(logits, targets)
    return -(targets.detach() * F.log_softmax(logits, dim=1)).sum(dim=1)  # (B,)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
             alpha: float = 1.0, beta: float = 8.0, T: float = 4.0) -> Tensor:
    """Zhao et al., CVPR 2022 (DKD); follows mdistiller `mdistiller/distillers/DKD.py`: α·TCKD + β·NCKD.

    Written independently of the RLD code (non-target classes are gathered, not masked) so that
    it serves as the reference in the "RLD equals DKD when the teacher is correct" test.
    """
    L._check_logits(student_logits, teacher_logits)
    B, K = student_logits.shape
    L._check_labels(labels, B, K)
    teacher_logits = teacher_logits.detach()
    y = labels.long()[:, None]                                            # (B, 1)
    ps, pt = F.softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1)  # (B, K)
    ps_y, pt_y = ps.gather(1, y), pt.gather(1, y)                         # (B, 1)
    tckd = L._binary_kl(torch.cat([pt_y, 1 - pt_y], 1), torch.cat([ps_y, 1 - ps_y], 1))  # (B,)
    others = torch.arange(K, device=y.device)[None, :].expand(B, K)
    others = others[others != y].view(B, K - 1)                           # (B, K-1)
    zs_nt, zt_nt = student_logits.gather(1, others), teacher_logits.gather(1, others)
    nckd = L.kd_loss(zs_nt, zt_nt, T=T) / T**2                              # (B,) plain KL
    return (alpha * tckd + beta * nckd) * T**2                            # (B,)


def pool_to_match(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """KD³ `KDDD/models/util.py`: adaptive-avg-pool the larger of two (B, C, H, W) maps to the smaller size."""
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"feature maps must be (B, C, H, W); got {tuple(a.shape)} and {tuple(b.shape)}")
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if tuple(a.shape[2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)  # (B, C_a, h, w)
    if tuple(b.shape[2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)  # (B, C_b, h, w)
    return a, b


def two_hot_targets(teacher_logits: Tensor) -> Tensor:
    """Jeong & Chung, ICLR 2025 (self-distillation with partial labels) §5: t = ½(e_s₁ + e_s₂), (B, K)."""
    pair = L.top2_classes(teacher_logits)                                    # (B, 2)
    return torch.zeros_like(teacher_logits).scatter_(1, pair, 0.5)         # (B, K)


def combine_teachers_batch(losses: Tensor, flags: Tensor) -> Tensor:
    """Official UNIC batch loss (`modeling/teacher_dropping.py` aggregate_losses): Σ a·ℓ / Σ a over all pairs."""
    a = flags.detach().to(losses.dtype)
    return (a * losses).sum() / a.sum().clamp_min(1)                        # scalar
