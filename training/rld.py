"""RLD: Knowledge Distillation with Refined Logits (Sun et al., arXiv 2408.07703), methods.md §2.

L = w_ce·CE(z_S, y) + min(progress/warmup, 1)·(α·SCD + β·MCD), per sample. RLD needs one hard
label y per image (`needs_labels`): the web query class (`train.label_source=web`) or the PLL
refined label (`train.label_source=refined`, written by `webkd refine`); rows without a label
(-1) are skipped by the loop. Never feed it teacher-argmax labels (it then reduces to DKD) and
never mixed images (MixSKD's x̃): it runs on the loop's plain augmented view only.
The math is `training.losses.rld_loss`.
"""
from __future__ import annotations

from webkd.training import losses
from webkd.training.method_base import Method, mean_teacher_logits, teacher_outputs


class RLD(Method):
    """Refined-logit distillation from the (mean of the) frozen teachers' logits.

    Defaults: α = 1, β = 8, τ = τ_a = 4 (CIFAR-100 config, set explicitly: the official
    config default τ_a = 1 applies only without the "same-t" flag), warm-up over the first
    1/12 of training (methods.md §2.4, small-scale). Returns `loss_ce`, `loss_scd`,
    `loss_mcd` (weighted per-sample terms that sum to the RLD loss).
    """

    name = "rld"
    needs_teacher = True
    needs_labels = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 scd_temperature: float = 4.0, warmup: float = 1 / 12, ce_weight: float = 1.0,
                 standardize: bool = False, strict_mask: bool = False):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.temperature, self.scd_temperature = temperature, scd_temperature
        self.warmup, self.ce_weight = warmup, ce_weight
        self.standardize, self.strict_mask = standardize, strict_mask

    def forward(self, batch, student, teachers, progress):
        x, labels = batch["x"], batch["labels"]                              # (B, 3, S, S), (B,)
        teacher_logits = mean_teacher_logits(teacher_outputs(teachers, x))    # (B, K), no grad
        student_logits = student(x).logits                                    # (B, K)
        _, parts = losses.rld_loss(student_logits, teacher_logits, labels, progress, alpha=self.alpha,
                                   beta=self.beta, tau=self.temperature, tau_a=self.scd_temperature,
                                   warmup=self.warmup, ce_weight=self.ce_weight,
                                   standardize=self.standardize, strict=self.strict_mask)
        return {"loss_ce": parts["ce"], "loss_scd": parts["scd"], "loss_mcd": parts["mcd"]}
