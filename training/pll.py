"""PLL two-hot objective (Jeong & Chung, ICLR 2025, "Rethinking Self-Distillation ... with Partial
Labels"), methods.md §3, as a distillation objective for a deep student.

The frozen teacher's top-2 classes {s₁, s₂} form a two-hot target t = ½(e_s₁ + e_s₂). Two loss
forms exist:

- `form="paper"` (default) [paper §5]: −½(log p_s₁ + log p_s₂), the two-hot cross-entropy.
- `form="gce"` [code, SelfPLL `util.py`]: mean over c ∈ {s₁, s₂} of (1 − p_c^q)/q, q = 0.7
  (generalised CE; tends to the paper form as q → 0).

Why the paper form by default: it is the form the paper's analysis (and its one-round claim)
is about; its gradient is the plain p − t, whereas GCE scales each sample's gradient by p_c^q,
which slows a randomly initialised student down at the start (the official code gets away with
it because its student starts from the teacher's weights W_0). The benchmark
(`bench/seed_methods.py`, PLL table) runs both forms in the linear-probe setting.

The label-refinement use of PLL (linear probe on cached teacher embeddings, one two-hot round,
refined labels written to labels.parquet) is a curation step: `selection/refine.py`.
"""
from __future__ import annotations

from typing import Literal

from webkd.training import losses
from webkd.training.method_base import Method, mean_teacher_logits, teacher_outputs


class PLL(Method):
    """Two-hot distillation from the frozen teachers' (mean) top-2; label-free by default.

    `ce_weight > 0` adds CE on the hard labels where they exist (rows with -1 contribute 0).
    Returns `loss_pll` (and `loss_ce`).
    """

    name = "pll"
    needs_teacher = True

    def __init__(self, form: Literal["paper", "gce"] = "paper", q: float = 0.7, ce_weight: float = 0.0):
        super().__init__()
        if form not in ("paper", "gce"):
            raise ValueError(f"PLL form must be 'paper' or 'gce'; got {form!r}")
        self.form, self.q, self.ce_weight = form, q, ce_weight

    def forward(self, batch, student, teachers, progress):
        x = batch["x"]                                                       # (B, 3, S, S)
        teacher_logits = mean_teacher_logits(teacher_outputs(teachers, x))    # (B, K), no grad
        pair = losses.top2_classes(teacher_logits)                            # (B, 2)
        student_logits = student(x).logits                                    # (B, K)
        if self.form == "paper":
            out = {"loss_pll": losses.two_hot_ce(student_logits, pair)}
        else:
            out = {"loss_pll": losses.gce_loss(student_logits, pair, self.q)}
        if self.ce_weight > 0:
            out["loss_ce"] = self.ce_weight * losses.ce_loss(student_logits, batch["labels"])
        return out
