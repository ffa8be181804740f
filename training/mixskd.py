"""MixSKD: Self-Knowledge Distillation from Mixup (Yang et al., ECCV 2022), methods.md §4.

Teacher-free. The method owns the training-only parts; the student stays a plain `StagedNet`
and is all that gets exported (its own exit, "exit S"):

- branches: for an S-stage student, S-1 auxiliary branches; branch k (k = 1..S-1) is a
  separately parameterised copy of stages k+1..S (deep copy, re-initialised like the official
  separately-built `Auxiliary_Classifier`), mapping F^k to A^k, then GAP + its own fc -> z^k.
  A^S = F^S and z^S is the backbone output;
- the self-teacher h: concat(A^1..A^S) (S·C channels) -> 1x1 conv (S·C -> C, no bias) -> GAP
  -> fc (as `ResNet_Final_Auxiliary_Classifer` in Self-KD-Lib `models/resnet_mixskd.py`);
- discriminators D_k = Linear(C, 128) -> ReLU -> Linear(128, 2) on pooled feature maps.

One λ ~ Beta(α, α) and one permutation π per batch; a single forward pass on [x; x̃] with
x̃ = λx + (1-λ)x[π]. Terms (each per sample, weights default 1): L_cls, L_mixcls (on by
default: the ImageNet script's total; the CIFAR script leaves it out, and then h gets no
gradient, see methods.md §4.4), L_logit, L_fea, L_dis. The discriminator mode is `joint`
(the official code: network and discriminators minimise the BCE together) or `adversarial`
(the feature side receives the reversed gradient of L_dis).
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn

from webkd.training import losses
from webkd.training.method_base import Method
from webkd.training.models import gap


class _GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def grad_reverse(x: torch.Tensor) -> torch.Tensor:
    return _GradReverse.apply(x)


class SelfTeacher(nn.Module):
    """h: concat of S maps (B, S·C, H, W) -> 1x1 conv (-> C) -> GAP -> fc -> (B, K)."""

    def __init__(self, num_maps: int, channels: int, num_classes: int):
        super().__init__()
        self.in_channels = num_maps * channels
        self.conv = nn.Conv2d(self.in_channels, channels, kernel_size=1, bias=False)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        fused = torch.cat(maps, dim=1)                      # (B, S·C, H, W)
        return self.fc(gap(self.conv(fused)))                # (B, K)


def _discriminator(channels: int, hidden: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))


def _reset(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class MixSKD(Method):
    """MixSKD on a `StagedNet` student (`from_models` passes the student: the branches copy its stages)."""

    name = "mixskd"
    needs_teacher = False
    needs_labels = True

    def __init__(self, student: nn.Module, alpha: float = 0.4, temperature: float = 3.0,
                 cls_weight: float = 1.0, mixcls_weight: float = 1.0, logit_weight: float = 1.0,
                 fea_weight: float = 1.0, dis_weight: float = 1.0,
                 discriminator: Literal["joint", "adversarial"] = "joint",
                 branch_init: Literal["reset", "copy"] = "reset", disc_hidden: int = 128):
        super().__init__()
        for attr in ("stages", "forward_stem", "forward_stages", "forward_head", "feature_channels"):
            if not hasattr(student, attr):
                raise ValueError(f"MixSKD needs a staged student (training.models.StagedNet) with `{attr}`; "
                                 f"got {type(student).__name__}")
        if len(student.stages) < 2:
            raise ValueError("MixSKD needs a student with at least 2 stages (it builds S-1 branches)")
        if discriminator not in ("joint", "adversarial"):
            raise ValueError(f"discriminator must be 'joint' or 'adversarial'; got {discriminator!r}")
        if branch_init not in ("reset", "copy"):
            raise ValueError(f"branch_init must be 'reset' or 'copy'; got {branch_init!r}")
        s = len(student.stages)
        c, k = int(student.feature_channels[-1]), int(student.num_classes)
        branches = []
        for i in range(1, s):   # branch i re-runs copies of stages i..S-1 (0-based) on F^i
            b = copy.deepcopy(nn.Sequential(*list(student.stages)[i:]))
            branches.append(_reset(b) if branch_init == "reset" else b)
        self.branches = nn.ModuleList(branches)
        self.branch_fcs = nn.ModuleList(nn.Linear(c, k) for _ in range(1, s))
        self.self_teacher = SelfTeacher(s, c, k)
        self.discriminators = nn.ModuleList(_discriminator(c, disc_hidden) for _ in range(s))
        self.num_stages, self.channels, self.num_classes = s, c, k
        self.alpha, self.temperature = alpha, temperature
        self.weights = {"cls": cls_weight, "mixcls": mixcls_weight, "logit": logit_weight,
                        "fea": fea_weight, "dis": dis_weight}
        self.discriminator, self.branch_init = discriminator, branch_init

    @classmethod
    def from_models(cls, student, teachers, sample=None, **user_args):
        return cls.build(**{"student": student, **user_args})

    # ------------------------------------------------------------------------------------
    def exits(self, student: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every exit on `x`: (maps A^1..A^S each (B, C, h, w), logits z^1..z^S each (B, K))."""
        maps = student.forward_stages(student.forward_stem(x))           # S maps F^1..F^S
        feats, logits = [], []
        for i, (branch, fc) in enumerate(zip(self.branches, self.branch_fcs)):
            a = branch(maps[i])                                           # (B, C, h, w) = A^{i+1}
            feats.append(a)
            logits.append(fc(gap(a)))                                     # (B, K)
        feats.append(maps[-1])                                            # A^S = F^S
        logits.append(student.forward_head(maps[-1])[1])                  # z^S, the backbone exit
        return feats, logits

    def forward(self, batch, student, teachers, progress):
        x, y = batch["x"], batch["labels"]                                # (B, 3, S, S), (B,)
        if (y < 0).any():
            raise ValueError("MixSKD needs a hard label for every image (label -1 found); "
                             "the loop skips unlabelled rows when needs_labels is set")
        b = x.shape[0]
        g = batch.get("generator")
        lam = losses.sample_mixup_lambda(self.alpha, g)                   # one λ per batch
        perm = losses.sample_permutation(b, g, x.device)                  # (B,)
        x_mix = losses.mixup(x, lam, perm)                                # (B, 3, S, S)
        feats, logits = self.exits(student, torch.cat([x, x_mix]))        # one pass on 2B images
        clean_z, mix_z = [z[:b] for z in logits], [z[b:] for z in logits]        # (B, K) each
        clean_a, mix_a = [a[:b] for a in feats], [a[b:] for a in feats]          # (B, C, h, w) each
        bar_z = [lam * z + (1 - lam) * z[perm] for z in clean_z]          # interpolated clean logits
        bar_a = [lam * a + (1 - lam) * a[perm] for a in clean_a]          # interpolated clean maps
        w = self.weights
        train_h = w["mixcls"] > 0
        with torch.set_grad_enabled(train_h and torch.is_grad_enabled()):
            zh_int = self.self_teacher(bar_a)                              # (B, K)
            zh_mix = self.self_teacher(mix_a)                              # (B, K)
        T, S = self.temperature, self.num_stages
        out: dict[str, torch.Tensor] = {}
        if w["cls"]:
            out["loss_cls"] = w["cls"] * sum(losses.ce_loss(z, y) for z in clean_z)
        if train_h:
            mix = sum(losses.mix_ce(z, y, perm, lam) for z in mix_z)
            mix = mix + losses.mix_ce(zh_int, y, perm, lam) + losses.mix_ce(zh_mix, y, perm, lam)
            out["loss_mixcls"] = w["mixcls"] * mix
        if w["logit"]:
            kl = sum(losses.kl_t(bar_z[k], mix_z[k], T) + losses.kl_t(mix_z[k], bar_z[k], T) for k in range(S - 1))
            kl = kl + losses.kl_t(bar_z[-1], zh_mix, T) + losses.kl_t(mix_z[-1], zh_int, T)
            out["loss_logit"] = w["logit"] * kl
        if w["fea"]:
            out["loss_fea"] = w["fea"] * sum(losses.feature_mse(bar_a[k], mix_a[k]) for k in range(S))
        if w["dis"]:
            out["loss_dis"] = w["dis"] * self.discriminator_loss(bar_a, mix_a)
        return out

    def discriminator_loss(self, real_maps: list[torch.Tensor], fake_maps: list[torch.Tensor]) -> torch.Tensor:
        """Σ_k BCE(D_k(GAP(Ā^k)), real) + BCE(D_k(GAP(A^k(x̃))), fake), per sample (B,)."""
        flip = grad_reverse if self.discriminator == "adversarial" else (lambda t: t)
        total = 0
        for d, real, fake in zip(self.discriminators, real_maps, fake_maps):
            total = total + losses.disc_bce(d(flip(gap(real))), True) + losses.disc_bce(d(flip(gap(fake))), False)
        return total
