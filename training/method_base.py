"""The `Method` base class and helpers every distillation method module imports.

Kept apart from `training/methods.py` (which holds the one literal `METHODS` dict) so that the
per-family modules (`training/rld.py`, `training/pll.py`, `training/mixskd.py`,
`training/unic.py`) and `training/methods.py` can all import it without an import cycle.

Every method has one signature, `forward(batch, student, teachers, progress) -> dict` whose
`loss_*` entries are per-sample `(B,)` tensors; the loop sums them and applies selection
weights in one place; other entries (UNIC's `teacher_losses`, `teacher_flags`) are diagnostics
the loop ignores. See `training/methods.py` for the batch keys.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class Method(nn.Module):
    """Base: CE-free, teacher-free defaults. Subclasses hold knobs and learnable extras."""

    name = "base"
    needs_teacher = False      # the loop refuses to run without one
    needs_labels = False       # rows without a label (-1) are skipped by the loop

    def forward(self, batch: dict[str, Any], student: nn.Module, teachers: list[nn.Module],
                progress: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, student: nn.Module, teachers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """Logits of the deployed student for RGB [0, 1] input."""
        return student(x).logits

    def deploy(self, student: nn.Module, teachers: list[nn.Module]) -> nn.Module:
        """The module that gets exported: RGB [0, 1] (B, 3, S, S) -> logits (B, K)."""
        return LogitsOnly(student)

    def deploy_info(self) -> dict[str, Any]:
        """What export metadata needs to rebuild `deploy()` (see training/export.py)."""
        return {"head": "student"}


class LogitsOnly(nn.Module):
    """Wraps an Outputs-returning model into x -> logits (for export and ONNX)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def teacher_outputs(teachers: list[nn.Module], x: torch.Tensor) -> list:
    """Every teacher's `Outputs` on `x`, without gradient (teachers are frozen)."""
    with torch.no_grad():
        return [t(x) for t in teachers]


def mean_teacher_logits(outs) -> torch.Tensor:
    """Mean of the teachers' logits (B, K) in float32 (teachers must share the class space)."""
    shapes = {tuple(o.logits.shape) for o in outs}
    if len(shapes) != 1:
        raise ValueError(f"teachers disagree on the logit shape {sorted(shapes)}: a logit method needs "
                         "teachers over the student's classes")
    return torch.stack([o.logits.float() for o in outs]).mean(0)
