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

import inspect
from typing import Any

import torch
import torch.nn as nn


class Method(nn.Module):
    """Base: CE-free, teacher-free defaults. Subclasses hold knobs and learnable extras.

    A method owns what it needs from the models (`from_models`), what it deploys (`deploy`,
    `deploy_info`) and how that comes back (`load_deployed` for an export, `load_deployed_state`
    for a warm start). User-facing hyper-parameters are keyword arguments of `__init__`.
    """

    name = "base"
    needs_teacher = False      # the loop refuses to run without one
    needs_labels = False       # rows without a label (-1) are skipped by the loop
    deploy_head = "student"    # `deploy_info()["head"]`: export.load_student finds the class by it

    @classmethod
    def build(cls, **kwargs: Any) -> "Method":
        """`cls(**kwargs)`; unknown or missing arguments fail fast, listing the valid ones."""
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = {p: v for p, v in inspect.signature(cls.__init__).parameters.items()  # not *args/**kwargs
                  if p != "self" and v.kind in named}
        valid = list(params)
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"method {cls.name!r} got unknown argument(s) {unknown}; valid: {valid}")
        missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
        if missing:
            raise ValueError(f"method {cls.name!r} needs argument(s) {missing}")
        return cls(**kwargs)

    @classmethod
    def from_models(cls, student: nn.Module, teachers: list[nn.Module], sample: torch.Tensor | None = None,
                    **user_args: Any) -> "Method":
        """Build with the arguments this method derives from the models (channel counts, map
        sizes; `sample` is a small input batch to probe them), overridden by `user_args`."""
        return cls.build(**user_args)

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
        """What export metadata needs to rebuild `deploy()` (see `load_deployed`)."""
        return {"head": self.deploy_head}

    @classmethod
    def load_deployed(cls, student: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """An untrained `deploy()` module around `student` from an export's metadata (`meta["deploy"]`
        is `deploy_info()`); export.load_student then loads the weights."""
        return LogitsOnly(student)

    def load_deployed_state(self, student: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Warm start: a previous export's deployed weights into `student` (and this method's
        deployed parts); the export may come from any method."""
        student.load_state_dict(state_with_prefix(state, "student.") or state_with_prefix(state, "model."))


class LogitsOnly(nn.Module):
    """Wraps an Outputs-returning model into x -> logits (for export and ONNX)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def state_with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def probe(student: nn.Module, teachers: list[nn.Module], sample: torch.Tensor | None = None):
    """(student Outputs, [teacher Outputs]) on `sample` (2 random 32 px images when None),
    without gradient, the student in eval mode for the call."""
    with torch.no_grad():
        x = sample if sample is not None else torch.rand(2, 3, 32, 32)
        was = student.training
        student.eval()
        s = student(x)
        student.train(was)
        return s, [teacher(x) for teacher in teachers]


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
