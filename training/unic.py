"""UNIC: multi-teacher distillation into one student encoder (Sariyildiz et al., ECCV 2024),
methods.md §5, in the small-scale CNN form of §5.3.

- Targets: each teacher's pooled embedding ("cls" token, (B, D_t)) and optionally its last
  feature map as patch tokens ("patch", (B, H·W, C_t)), each standardised per teacher and token
  type by an EMA of batch statistics (`losses.EmaStandardizer`: buffers, saved and restored
  with the checkpoint). Normalisation uses the pre-update EMA; the momentum follows
  `losses.ema_momentum(progress)` (cosine 1.0 -> 0.001). The first training batch initialises
  the statistics before it is normalised (the §5.4 "first step" pitfall), flagged by the
  `stats_ready` buffer.
- Ladder: one head per (student stage, teacher, token type), Linear(C_l -> 2·D_t) -> GELU ->
  Linear(-> D_t), truncated-normal std 0.02 init, zero biases; on GAP(stage map) for "cls", per
  location on the stage map pooled to the teacher's grid for "patch". The prediction is the
  sum of the heads over the stages read.
- Loss per teacher ℓ_t = mean over token types of λ_cos·(1 - cos) + λ_sl1·SmoothL1; teacher
  dropping keeps each image's worst-fitted teacher and drops the others with p = 0.5; the
  per-image loss is Σ a·ℓ / Σ a (`losses.combine_teachers`, divisor "image" by default).

Evaluation and deployment [project]: UNIC trains an encoder, so it is evaluated by linear
probes on `student(x).embedding` (bench/seed_methods.py). For the pipeline the student keeps a
linear classifier: its own `classifier`, trained jointly *on the detached embedding* (a linear
probe trained online, so the encoder stays label-free): with `head_loss="auto"` by KD (T = 4)
from the mean logits of the teachers whose classes are the student's, else by CE on the hard
labels where they exist. `predict` and the export use that classifier; the export holds the
student only (the ladder heads and the statistics are training scaffolding).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from webkd.training import losses
from webkd.training.method_base import Method, probe, teacher_outputs
from webkd.training.models import gap

TOKENS = ("cls", "patch")


class LadderHead(nn.Sequential):
    """Linear(D_in -> H) -> GELU -> Linear(H -> D_t), trunc-normal(0.02) weights, zero biases."""

    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


class UNIC(Method):
    """Multi-teacher standardised regression with a ladder of heads and teacher dropping."""

    name = "unic"
    needs_teacher = True

    def __init__(self, student_channels: Sequence[int], teacher_dims: Sequence[int],
                 teacher_patch_dims: Sequence[int] | None = None, teacher_classes: Sequence[int] | None = None,
                 student_classes: int | None = None, tokens: Sequence[str] = ("cls",),
                 stages: Sequence[int] | None = None, hidden_factor: float = 2.0,
                 lam_cos: float = 0.5, lam_sl1: float = 0.5, drop_p: float = 0.5,
                 divisor: Literal["image", "pairs"] = "image", momentum_start: float = 1.0,
                 momentum_end: float = 0.001, head_loss: Literal["auto", "kd", "ce", "none"] = "auto",
                 head_temperature: float = 4.0):
        super().__init__()
        tokens = tuple(tokens)
        if not tokens or set(tokens) - set(TOKENS):
            raise ValueError(f"tokens must be a non-empty subset of {TOKENS}; got {tokens}")
        if "patch" in tokens and (teacher_patch_dims is None or len(teacher_patch_dims) != len(teacher_dims)):
            raise ValueError("patch tokens need teacher_patch_dims (one channel count per teacher)")
        if head_loss not in ("auto", "kd", "ce", "none"):
            raise ValueError(f"head_loss must be auto, kd, ce or none; got {head_loss!r}")
        n_stages = len(student_channels)
        self.stages = tuple(range(n_stages)) if stages is None else tuple(int(s) % n_stages for s in stages)
        self.tokens, self.num_teachers = tokens, len(teacher_dims)
        self.lam_cos, self.lam_sl1, self.drop_p, self.divisor = lam_cos, lam_sl1, drop_p, divisor
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.teacher_classes = list(teacher_classes) if teacher_classes is not None else None
        self.student_classes, self.head_temperature = student_classes, head_temperature
        self.head_loss = head_loss
        dims = {"cls": list(teacher_dims), "patch": list(teacher_patch_dims or [])}
        # heads["<token>_<teacher>"][j]: the head reading stage self.stages[j]
        self.heads = nn.ModuleDict({
            f"{tok}_{t}": nn.ModuleList(LadderHead(int(student_channels[s]), d, max(1, int(hidden_factor * d)))
                                        for s in self.stages)
            for tok in tokens for t, d in enumerate(dims[tok])})
        self.standardizers = nn.ModuleDict({f"{tok}_{t}": losses.EmaStandardizer(d)
                                            for tok in tokens for t, d in enumerate(dims[tok])})
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_models(cls, student, teachers, sample=None, **user_args):
        """Stage channels and classes of the student; embedding, last-map channels and classes of every teacher."""
        if not teachers:
            return cls.build(**user_args)
        s, t_all = probe(student, teachers, sample)
        derived = {"student_channels": [int(f.shape[1]) for f in s.features],
                   "teacher_dims": [int(o.embedding.shape[1]) for o in t_all],
                   "teacher_patch_dims": [int(o.features[-1].shape[1]) for o in t_all],
                   "teacher_classes": [int(o.logits.shape[1]) for o in t_all],
                   "student_classes": int(s.logits.shape[1])}
        return cls.build(**{**derived, **user_args})

    # ------------------------------------------------------------------------------------
    def ladder(self, features: list[torch.Tensor], token: str, teacher: int,
               grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Σ_l h^l(s^l): (B, D_t) for "cls"; (B, N, D_t) on `grid` for "patch"."""
        out = 0
        for head, s in zip(self.heads[f"{token}_{teacher}"], self.stages):
            f = features[s]                                                   # (B, C_l, H_l, W_l)
            if token == "cls":
                out = out + head(gap(f))                                      # (B, D_t)
            else:
                f = F.adaptive_avg_pool2d(f, grid)                            # (B, C_l, h, w)
                out = out + head(f.flatten(2).transpose(1, 2))                # (B, h·w, D_t)
        return out

    @staticmethod
    def _targets(out, token: str) -> torch.Tensor:
        if token == "cls":
            return out.embedding.float()                                      # (B, D_t)
        return out.features[-1].float().flatten(2).transpose(1, 2)            # (B, N, C_t)

    def standardize(self, key: str, target: torch.Tensor, momentum: float) -> torch.Tensor:
        """Pre-update EMA standardisation; no update outside training."""
        return self.standardizers[key](target, momentum if self.training else 0.0)

    def teacher_losses(self, s_out, t_outs, progress: float) -> torch.Tensor:
        """ℓ (B, M): per image and teacher, mean over token types of cos + smooth-L1."""
        if len(t_outs) != self.num_teachers:
            raise ValueError(f"UNIC was built for {self.num_teachers} teacher(s), got {len(t_outs)}")
        momentum = losses.ema_momentum(progress, self.momentum_start, self.momentum_end)
        if self.training and not bool(self.stats_ready):
            with torch.no_grad():  # initialise the statistics from this batch before using them
                for t, out in enumerate(t_outs):
                    for tok in self.tokens:
                        self.standardizers[f"{tok}_{t}"](self._targets(out, tok), 1.0)
                self.stats_ready.fill_(True)
        cols = []
        for t, out in enumerate(t_outs):
            per_token = []
            for tok in self.tokens:
                target = self.standardize(f"{tok}_{t}", self._targets(out, tok), momentum)
                grid = tuple(out.features[-1].shape[-2:]) if tok == "patch" else None
                pred = self.ladder(s_out.features, tok, t, grid)
                per_token.append(losses.unic_loss(pred, target, self.lam_cos, self.lam_sl1))   # (B,)
            cols.append(torch.stack(per_token).mean(0))
        return torch.stack(cols, dim=1)                                      # (B, M)

    def forward(self, batch, student, teachers, progress):
        x = batch["x"]                                                       # (B, 3, S, S)
        t_outs = teacher_outputs(teachers, x)
        s_out = student(x)
        ell = self.teacher_losses(s_out, t_outs, progress)                   # (B, M)
        flags = losses.teacher_dropping(ell, self.drop_p, batch.get("generator"))  # (B, M), no grad
        out = {"loss_unic": losses.combine_teachers(ell, flags, self.divisor),
               "teacher_losses": ell.detach(), "teacher_flags": flags}
        head = self.head_term(student, s_out, t_outs, batch.get("labels"))
        if head is not None:
            out["loss_head"] = head
        return out

    def _matching_teachers(self, t_outs, k: int) -> list:
        return [o for o in t_outs if o.logits.shape[1] == k]

    def head_term(self, student, s_out, t_outs, labels) -> torch.Tensor | None:
        """The student's linear classifier on the *detached* embedding (an online linear probe)."""
        if self.head_loss == "none" or not hasattr(student, "classifier"):
            return None
        logits = student.classifier(s_out.embedding.detach())               # (B, K)
        matching = self._matching_teachers(t_outs, logits.shape[1])
        mode = self.head_loss
        if mode == "auto":
            mode = "kd" if matching else "ce"
        if mode == "kd":
            if not matching:
                raise ValueError("head_loss='kd' needs a teacher over the student's classes")
            target = torch.stack([o.logits.float() for o in matching]).mean(0)  # (B, K)
            return losses.kd_loss(logits, target, self.head_temperature)
        if labels is None:
            return None
        return losses.ce_loss(logits, labels)                                # 0 where label is -1
