"""Distillation methods: one small nn.Module per method, and the literal METHODS dict.

Every method has one signature, `forward(batch, student, teachers, progress) -> dict` whose
`loss_*` entries are per-sample `(B,)` tensors (the loop sums them and applies selection
weights in one place). `batch` holds:

    x        (B, 3, S, S) float RGB in [0, 1], the augmented training view
    labels   (B,) long, hard labels (web query class or refined label), -1 unknown
    index    (B,) long, manifest rows
    generator  torch.Generator for the method's own randomness

A method also says how the deployed student predicts (`predict`) and what gets exported
(`deploy`): for KD^3 that is student -> projector -> GAP -> the teacher's frozen classifier.
The math lives in training/losses.py. CE, KD and KD^3 live here; the other families have their
own modules (`training/rld.py`, `training/pll.py`, `training/mixskd.py`, `training/unic.py`), all
built on `training/method_base.py`, and this file keeps the one literal `METHODS` dict.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from webkd.training import losses
from webkd.training.method_base import LogitsOnly, Method, mean_teacher_logits, probe, state_with_prefix, teacher_outputs
from webkd.training.mixskd import MixSKD
from webkd.training.pll import PLL
from webkd.training.rld import RLD
from webkd.training.unic import UNIC


_teacher_outputs = teacher_outputs          # older private names, kept for callers
_mean_teacher_logits = mean_teacher_logits
_ = LogitsOnly                              # still importable from here (its older location)


# --------------------------------------------------------------------------------------------
class CE(Method):
    """Cross-entropy on hard labels (web query labels or refined labels)."""

    name = "ce"
    needs_labels = True

    def forward(self, batch, student, teachers, progress):
        return {"loss_ce": losses.ce_loss(student(batch["x"]).logits, batch["labels"])}


class KD(Method):
    """Vanilla KD (Hinton et al., 2015): w_kd*T^2*KL(p_T||p_S) + w_ce*CE; w_ce = 0 on web images.

    The teacher runs online on the same augmented view as the student. `mixup` > 0 mixes every
    batch first (x <- lam x + (1 - lam) x[pi], one lam ~ Beta(mixup, mixup) per batch, from the
    batch generator): with it this is function matching (Beyer et al., CVPR 2022, "Knowledge
    distillation: a good teacher is patient and consistent"): teacher and student see the same
    mixed view, the teacher's output on it is the target."""

    name = "kd"
    needs_teacher = True

    def __init__(self, temperature: float = 4.0, kd_weight: float = 0.9, ce_weight: float = 0.0,
                 mixup: float = 0.0):
        super().__init__()
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        if mixup < 0:
            raise ValueError(f"kd: mixup is a Beta(alpha, alpha) parameter >= 0 (0 = off), got {mixup}")
        self.mixup = mixup

    def forward(self, batch, student, teachers, progress):
        x, lam, perm = batch["x"], 1.0, None                                  # (B, 3, S, S)
        if self.mixup > 0:
            lam = losses.sample_mixup_lambda(self.mixup, batch["generator"])
            perm = losses.sample_permutation(x.shape[0], batch["generator"], x.device)
            x = losses.mixup(x, lam, perm)                                    # (B, 3, S, S)
        teacher_logits = _mean_teacher_logits(_teacher_outputs(teachers, x))
        student_logits = student(x).logits
        out = {"loss_kd": self.kd_weight * losses.kd_loss(student_logits, teacher_logits, self.temperature)}
        if self.ce_weight > 0:
            out["loss_ce"] = self.ce_weight * (losses.ce_loss(student_logits, batch["labels"]) if perm is None
                                               else losses.mix_ce(student_logits, batch["labels"], perm, lam))
        return out


# --------------------------------------------------------------------------------------------
def _conv_bn_relu(c_in: int, c_out: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Projector(nn.Sequential):
    """KD^3's P: 1x1 (C_S -> C_T/f), 3x3 (C_T/f -> C_T/f), 1x1 (C_T/f -> C_T), each + BN + ReLU."""

    def __init__(self, c_student: int, c_teacher: int, factor: int = 2):
        mid = max(1, c_teacher // factor)
        super().__init__(*_conv_bn_relu(c_student, mid, 1), *_conv_bn_relu(mid, mid, 3),
                         *_conv_bn_relu(mid, c_teacher, 1))
        self.c_student, self.c_teacher, self.factor = c_student, c_teacher, factor


class KD3Head(nn.Module):
    """The deployed KD^3 student: backbone -> (pool to the teacher map size) -> P -> GAP -> W_T."""

    def __init__(self, student: nn.Module, projector: Projector, classifier: nn.Linear,
                 map_size: tuple[int, int] | None):
        super().__init__()
        self.student, self.projector, self.classifier = student, projector, classifier
        self.map_size = tuple(map_size) if map_size else None

    def aligned(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.map_size is not None and tuple(feature_map.shape[-2:]) != self.map_size:
            feature_map = F.adaptive_avg_pool2d(feature_map, self.map_size)  # (B, C_S, H_T, W_T)
        return self.projector(feature_map)                                   # (B, C_T, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.aligned(self.student(x).features[-1])
        return self.classifier(g.mean(dim=(2, 3)))                           # (B, K)


class KD3(Method):
    """KD^3 (Tang et al., ICCV 2023; code tangjialiang97/KD3 helper/loops.py): weighted feature
    alignment through the teacher's frozen classifier + MixDistribution contrastive term.

    L = mean_i w_i ||G_i - F_T,i||^2 / (CHW) + gamma * (NTX_S + NTX_T); no CE or KL term.
    """

    name = "kd3"
    needs_teacher = True
    deploy_head = "kd3"

    def __init__(self, student_channels: int, teacher_channels: int, student_dim: int, teacher_dim: int,
                 teacher_map_size: tuple[int, int] | None = None, student_map_size: tuple[int, int] | None = None,
                 projector_factor: int = 2, gamma: float = 0.001, temperature: float = 0.3,
                 embed_dim: int = 128, mixdist: bool = True, mix_alpha: float = 0.1,
                 teacher_side_term: bool = True, kd_weight: float = 0.0, kd_temperature: float = 4.0):
        super().__init__()
        self.projector = Projector(student_channels, teacher_channels, projector_factor)
        self.embed_student = nn.Linear(student_dim, embed_dim)   # E_S
        self.embed_teacher = nn.Linear(teacher_dim, embed_dim)   # E_T (trained by its own term only)
        self.gamma, self.temperature = gamma, temperature
        self.mixdist, self.mix_alpha, self.teacher_side_term = mixdist, mix_alpha, teacher_side_term
        # [project] optional logit KD on the shared-classifier logits (0 = the paper's KD^3)
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        # "larger map pooled to the smaller size first": the common size both maps are pooled to
        self.map_size = self._common(teacher_map_size, student_map_size)
        self._classifier: nn.Linear | None = None  # the teacher's, borrowed (not a parameter here)

    @classmethod
    def from_models(cls, student, teachers, sample=None, **user_args):
        """Channel counts, embedding dims and map sizes of the student and the first teacher."""
        if not teachers:
            return cls.build(**user_args)
        s, (t, *_) = probe(student, teachers, sample)
        derived = {"student_channels": s.features[-1].shape[1], "teacher_channels": t.features[-1].shape[1],
                   "student_dim": s.embedding.shape[1], "teacher_dim": t.embedding.shape[1],
                   "teacher_map_size": tuple(t.features[-1].shape[-2:]),
                   "student_map_size": tuple(s.features[-1].shape[-2:])}
        return cls.build(**{**derived, **user_args})

    @staticmethod
    def _common(a, b):
        if a is None or b is None:
            return tuple(a or b) if (a or b) else None
        return (min(a[0], b[0]), min(a[1], b[1]))

    def _head(self, student: nn.Module, teachers: list[nn.Module]) -> KD3Head:
        return KD3Head(student, self.projector, teachers[0].classifier, self.map_size)

    def forward(self, batch, student, teachers, progress):
        x = batch["x"]                                                      # (B, 3, S, S)
        t_out = _teacher_outputs(teachers[:1], x)[0]
        head = self._head(student, teachers)
        s_out = student(x)
        g = head.aligned(s_out.features[-1])                                # (B, C_T, h, w)
        f_t = t_out.features[-1]
        if tuple(f_t.shape[-2:]) != tuple(g.shape[-2:]):
            f_t = F.adaptive_avg_pool2d(f_t, g.shape[-2:])                  # (B, C_T, h, w)
        z_s = head.classifier(g.mean(dim=(2, 3)))                           # (B, K) through frozen W_T
        w = losses.instance_weights(z_s, t_out.logits)                      # (B,) in [0.5, 1), no grad
        out = {"loss_feat": w * losses.feature_alignment_loss(g, f_t)}
        if self.kd_weight > 0:
            out["loss_kd"] = self.kd_weight * losses.kd_loss(z_s, t_out.logits, self.kd_temperature)
        if self.mixdist and self.gamma > 0:
            x_mix = losses.mix_distribution(x, batch["generator"], alpha=self.mix_alpha)
            s_mix = student(x_mix)
            ntx = losses.nt_xent(F.normalize(self.embed_student(s_out.embedding), dim=1),
                                 F.normalize(self.embed_student(s_mix.embedding), dim=1), self.temperature)
            if self.teacher_side_term:
                t_mix = _teacher_outputs(teachers[:1], x_mix)[0]
                ntx = ntx + losses.nt_xent(
                    F.normalize(self.embed_teacher(t_out.embedding.detach()), dim=1),
                    F.normalize(self.embed_teacher(t_mix.embedding.detach()), dim=1), self.temperature)
            out["loss_md"] = self.gamma * ntx
        return out

    def predict(self, student, teachers, x):
        return self._head(student, teachers)(x)

    def deploy(self, student, teachers):
        head = self._head(student, teachers)
        return KD3Head(student, head.projector, copy.deepcopy(head.classifier), head.map_size)

    def deploy_info(self):
        p = self.projector
        return {"head": self.deploy_head, "student_channels": p.c_student, "teacher_channels": p.c_teacher,
                "projector_factor": p.factor, "map_size": list(self.map_size) if self.map_size else None}

    @classmethod
    def load_deployed(cls, student, meta):
        info = meta["deploy"]
        projector = Projector(info["student_channels"], info["teacher_channels"], info["projector_factor"])
        classifier = nn.Linear(info["teacher_channels"], len(meta["classes"]))   # the teacher's, copied
        return KD3Head(student, projector, classifier, tuple(info["map_size"]) if info.get("map_size") else None)

    def load_deployed_state(self, student, state):
        super().load_deployed_state(student, state)
        projector = state_with_prefix(state, "projector.")
        if projector:
            self.projector.load_state_dict(projector)


METHODS: dict[str, type[Method]] = {
    "ce": CE,
    "kd": KD,
    "kd3": KD3,
    "rld": RLD,
    "pll": PLL,
    "mixskd": MixSKD,
    "unic": UNIC,
}


def method_from_models(name: str, student: nn.Module, teachers: list[nn.Module],
                       sample: torch.Tensor | None = None, **user_args: Any) -> Method:
    """`METHODS[name].from_models(...)`: the method with its model-derived arguments; unknown
    names or arguments fail fast listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name].from_models(student, teachers, sample, **user_args)


def build_method(name: str, **kwargs: Any) -> Method:
    """Build a method by name; unknown names or arguments fail fast listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name].build(**kwargs)
