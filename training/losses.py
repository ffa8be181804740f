"""Pure per-sample loss functions and target builders for every distillation method.

Every loss takes tensors and returns a per-sample tensor of shape ``(B,)``. Nothing here reduces
over the batch: the training loop does that in one place, where the selection weights apply
(`docs/design.md`, "Distillation methods"). Randomness comes only from an explicit
``torch.Generator`` argument. Teacher-side inputs are detached inside each function, so a frozen
teacher never receives a gradient whoever calls it. Specs and constants: ``methods.md``.

Public API, by method family (dims: B batch, K classes, C/H/W feature maps, D embedding dims,
N patches, M teachers):

- Baselines (methods.md §6): ``ce_loss``, ``kd_loss`` (T²·KL).
- Sampling helpers: ``sample_beta``, ``sample_permutation``, ``sample_mixup_lambda``.
- KD³ (§1): ``instance_weights``, ``feature_alignment_loss``,
  ``mix_distribution``, ``nt_xent``.
- RLD (§2): ``standardize_logits``, ``rld_exclusion_mask``, ``rld_scd``, ``rld_mcd``,
  ``rld_warmup_factor``, ``rld_loss`` (returns ``(total, parts)``).
- PLL two-hot (§3): ``top2_classes``, ``two_hot_ce``, ``gce_loss``.
- MixSKD (§4): ``mixup``, ``mix_ce``, ``kl_t``, ``feature_mse``, ``disc_bce``.
- UNIC (§5): ``standardize_with_ema`` (pure) and ``EmaStandardizer`` (buffers only),
  ``ema_momentum``, ``unic_loss``, ``teacher_dropping``, ``combine_teachers``.

Reference forms used only to check these (DKD, soft CE, two-hot targets, UNIC's batch-level
aggregation, ``pool_to_match``) live in ``tests/loss_refs.py``; label-noise injection for the
benchmarks in ``bench/label_noise.py``.

Numerics: RLD fills excluded logits with a dtype-aware finite value (``finfo(dtype).min / 2``),
never -inf or the official -1e9, so fp16/bf16 stay finite; the other losses run in the input
dtype and are written with log-softmax rather than log(softmax).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_CLAMP = 1e-7  # RLD SCD log clamp (methods.md §2.5)


# ----------------------------------------------------------------------------- checks
def _check_logits(student_logits: Tensor, teacher_logits: Tensor | None = None) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"logits must be (B, K); got shape {tuple(student_logits.shape)}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}")


def _check_labels(labels: Tensor, batch: int, num_classes: int, ignore_index: int | None = None) -> None:
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must be ({batch},); got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        bad_low = lo < 0 and bool(((labels < 0) & (labels != ignore_index)).any())
        if hi >= num_classes or bad_low:
            extra = f" (or {ignore_index} for 'no label')" if ignore_index is not None else ""
            raise ValueError(f"labels must lie in [0, {num_classes}){extra}; got range [{lo}, {hi}]")


def _fill_value(dtype: torch.dtype) -> float:
    """A large *finite* negative logit for masking, safe in fp32, bf16 and fp16."""
    return torch.finfo(dtype).min / 2


# ----------------------------------------------------------------------------- baselines
def ce_loss(logits: Tensor, labels: Tensor, ignore_index: int = -1) -> Tensor:
    """Per-sample cross-entropy; 0 where ``labels == ignore_index`` (no label for that image)."""
    _check_logits(logits)
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index)
    return F.cross_entropy(logits, labels.long(), reduction="none", ignore_index=ignore_index)  # (B,)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0) -> Tensor:
    """Hinton et al., arXiv:1503.02531; follows mdistiller `mdistiller/distillers/KD.py`: T²·KL(p_T‖p_S)."""
    _check_logits(student_logits, teacher_logits)
    log_ps = F.log_softmax(student_logits / T, dim=1)            # (B, K)
    log_pt = F.log_softmax(teacher_logits.detach() / T, dim=1)   # (B, K)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * T**2  # (B,)


def _binary_kl(b_t: Tensor, b_s: Tensor) -> Tensor:
    """KL between (B, 2) two-bin distributions, logs clamped at 1e-7 (RLD SCD, DKD TCKD)."""
    return (b_t * (b_t.clamp_min(LOG_CLAMP).log() - b_s.clamp_min(LOG_CLAMP).log())).sum(dim=1)


# ----------------------------------------------------------------------------- sampling
def sample_beta(alpha: float, beta: float, n: int, generator: torch.Generator | None) -> Tensor:
    """n draws of Beta(alpha, beta) as float64 on the generator's device: G₁/(G₁ + G₂) with
    Gᵢ ~ Gamma from `torch._standard_gamma`, which takes the generator (torch's Beta does not)."""
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta parameters must be > 0; got ({alpha}, {beta})")
    device = generator.device if generator is not None else torch.device("cpu")
    g1 = torch._standard_gamma(torch.full((n,), float(alpha), dtype=torch.float64, device=device), generator=generator)
    g2 = torch._standard_gamma(torch.full((n,), float(beta), dtype=torch.float64, device=device), generator=generator)
    return g1 / (g1 + g2)


def sample_permutation(n: int, generator: torch.Generator | None,
                       device: torch.device | str | None = None) -> Tensor:
    """A random permutation of range(n) drawn from ``generator``, moved to ``device``."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gdev).to(device or gdev)


def sample_mixup_lambda(alpha: float, generator: torch.Generator | None) -> float:
    """Yang et al., ECCV 2022 (MixSKD); `main_mixskd_cifar.py`: one λ ~ Beta(α, α) per batch; α ≤ 0 gives 1."""
    if alpha <= 0:
        return 1.0
    return float(sample_beta(alpha, alpha, 1, generator)[0])


# ----------------------------------------------------------------------------- KD^3 (§1)
def instance_weights(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Tang et al., ICCV 2023 (KD³); `KDDD/helper/loops.py`: w = sg(sigmoid(‖z_S − z_T‖₂)) ∈ [0.5, 1)."""
    _check_logits(student_logits, teacher_logits)
    with torch.no_grad():
        dist = torch.linalg.vector_norm((student_logits - teacher_logits).float(), dim=1)  # (B,)
        return torch.sigmoid(dist).to(student_logits.dtype)                                # (B,)


def feature_alignment_loss(G: Tensor, F_T: Tensor) -> Tensor:
    """KD³ (Tang et al., ICCV 2023) `KDDD/helper/loops.py`: per-sample ‖G_i − F_T,i‖²/(C·H·W).

    ``mean_i(w_i · loss_i)`` then equals the spec's Σ_i w_i‖G_i − F_T,i‖²/(B·C·H·W). The teacher
    map is detached. Shapes must agree: pool the larger map first.
    """
    if G.shape != F_T.shape:
        raise ValueError(f"projected student map {tuple(G.shape)} != teacher map {tuple(F_T.shape)}; "
                         "project channels with P and pool the larger map first")
    return (G - F_T.detach()).pow(2).flatten(1).mean(dim=1)  # (B,)


def mix_distribution(x: Tensor, generator: torch.Generator | None, alpha: float = 0.1,
                     lam: Tensor | float | None = None, perm: Tensor | None = None,
                     eps: float = 1e-6) -> Tensor:
    """KD³ (Tang et al., ICCV 2023) `KDDD/dataset/augmentation.py` MixDistribution on input pixels.

    x̃ = σ̃(x − μ)/σ + μ̃ with detached per-image, per-channel μ and σ = √(var + eps) over the
    spatial dims; μ̃ = λμ + (1 − λ)μ_π, σ̃ likewise; λ ~ Beta(α, α) per image and π a batch
    permutation, both drawn from ``generator`` unless injected. Identity when λ ≡ 1 or π is the
    identity (up to rounding). The train/eval switch is the caller's: do not call it in eval.
    """
    if x.dim() < 3:
        raise ValueError(f"x must be (B, C, *spatial); got {tuple(x.shape)}")
    B = x.shape[0]
    dims = tuple(range(2, x.dim()))
    mu = x.mean(dim=dims, keepdim=True).detach()                           # (B, C, 1, 1)
    sig = (x.var(dim=dims, keepdim=True) + eps).sqrt().detach()            # (B, C, 1, 1)
    if lam is None:
        lam = sample_beta(alpha, alpha, B, generator)
    lam = torch.as_tensor(lam).to(device=x.device, dtype=x.dtype).expand(B)   # (B,)
    lam = lam.reshape(B, *([1] * (x.dim() - 1)))                          # (B, 1, 1, 1)
    if perm is None:
        perm = sample_permutation(B, generator, x.device)
    perm = perm.to(x.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]                               # (B, C, 1, 1)
    sig_mix = lam * sig + (1 - lam) * sig[perm]                            # (B, C, 1, 1)
    return (x - mu) / sig * sig_mix + mu_mix                               # (B, C, H, W)


def nt_xent(a: Tensor, b: Tensor, t: float = 0.3) -> Tensor:
    """KD³ (Tang et al., ICCV 2023) `KDDD/distiller_zoo/relation.py` Contrastive_loss: per-sample NT-Xent.

    Over the 2B L2-normalised vectors [a; b], each vector's positive is its other view and the
    denominator runs over the 2B − 1 others. The per-sample value is the mean of the sample's two
    view terms, so ``.mean()`` equals the standard (official) NT-Xent. Identical views give
    ln(2B − 1). Gradient reaches only what ``a`` and ``b`` depend on: the KD³ teacher-side term is
    ``nt_xent(E_T(h_T), E_T(h_T_mix))`` with h_T detached, so it trains E_T only.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"views must be two (B, D) tensors of one shape; got {tuple(a.shape)}, {tuple(b.shape)}")
    B = a.shape[0]
    z = F.normalize(torch.cat([a, b], dim=0), dim=1)                        # (2B, D)
    sim = z @ z.t() / t                                                     # (2B, 2B)
    eye = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(sim.masked_fill(eye, _fill_value(sim.dtype)), dim=1)  # (2B,)
    idx = torch.arange(2 * B, device=z.device)
    pos = sim[idx, (idx + B) % (2 * B)]                                     # (2B,)
    per_view = lse - pos                                                    # (2B,)
    return 0.5 * (per_view[:B] + per_view[B:])                              # (B,)


# ----------------------------------------------------------------------------- RLD (§2)
def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """RLD/logit-standardisation option (`mdistiller/distillers/RLD.py` normalize): (z − mean)/(std + 1e-7)."""
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)  # (B, K)


def rld_exclusion_mask(teacher_logits: Tensor, labels: Tensor, strict: bool = False) -> Tensor:
    """RLD MCD mask M = {k : z_T,k ≥ z_T,y} (classes to *drop*; y and its ties included); strict uses >."""
    z_y = teacher_logits.gather(1, labels.long()[:, None])                 # (B, 1)
    return teacher_logits > z_y if strict else teacher_logits >= z_y       # (B, K) bool


def rld_scd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau_a: float = 4.0) -> Tensor:
    """Sun et al., arXiv:2408.07703 (RLD); `mdistiller/distillers/RLD.py`: SCD, τ_a²·KL(b^T‖b^S).

    b^T = [p^T_m, 1 − p^T_m] and b^S = [p^S_y, 1 − p^S_y] at temperature τ_a;
    m is the teacher's argmax, y the label (pairing the teacher's top class with the student's
    true class is intended). Logs are clamped at 1e-7.
    """
    _check_logits(student_logits, teacher_logits)
    B, K = student_logits.shape
    _check_labels(labels, B, K)
    teacher_logits = teacher_logits.detach()
    ps = F.softmax(student_logits / tau_a, dim=1)                           # (B, K)
    pt = F.softmax(teacher_logits / tau_a, dim=1)                           # (B, K)
    y = F.one_hot(labels.long(), K).bool()                                  # (B, K)
    m = F.one_hot(teacher_logits.argmax(dim=1), K).bool()                   # (B, K)
    b_s = torch.stack([ps.masked_fill(~y, 0).sum(1), ps.masked_fill(y, 0).sum(1)], dim=1)  # (B, 2)
    b_t = torch.stack([pt.masked_fill(~m, 0).sum(1), pt.masked_fill(m, 0).sum(1)], dim=1)  # (B, 2)
    return _binary_kl(b_t, b_s) * tau_a**2                                  # (B,)


def rld_mcd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float = 4.0,
            strict: bool = False) -> Tensor:
    """Sun et al., arXiv:2408.07703 (RLD); `mdistiller/distillers/RLD.py`: τ²·KL(q^T‖q^S) outside M.

    Excluded logits are filled with ``finfo(dtype).min / 2`` (finite in fp16/bf16, unlike -inf or
    -1e9) and their KL terms are zeroed, so a mask leaving one class or none gives exactly 0 and
    masked classes get zero gradient.
    """
    _check_logits(student_logits, teacher_logits)
    B, K = student_logits.shape
    _check_labels(labels, B, K)
    teacher_logits = teacher_logits.detach()
    mask = rld_exclusion_mask(teacher_logits, labels, strict)                            # (B, K)
    s = (student_logits / tau).masked_fill(mask, _fill_value(student_logits.dtype))      # (B, K)
    t = (teacher_logits / tau).masked_fill(mask, _fill_value(teacher_logits.dtype))      # (B, K)
    log_qs, log_qt = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)                    # (B, K)
    terms = (log_qt.exp() * (log_qt - log_qs)).masked_fill(mask, 0)                      # (B, K)
    return terms.sum(dim=1) * tau**2                                                     # (B,)


def rld_warmup_factor(progress: float, warmup: float) -> float:
    """RLD warm-up min(e/W, 1) in progress units (``warmup`` = W/E; 1/12 is the project default)."""
    return 1.0 if warmup <= 0 else min(max(progress, 0.0) / warmup, 1.0)


def rld_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, progress: float,
             alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0, tau_a: float = 4.0,
             warmup: float = 1 / 12, ce_weight: float = 1.0, standardize: bool = False,
             strict: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Sun et al., arXiv:2408.07703 (RLD); `mdistiller/distillers/RLD.py`: CE + min(e/W, 1)·(α·SCD + β·MCD).

    Returns ``(total (B,), parts)`` where ``parts = {"ce", "scd", "mcd"}`` are the *weighted*
    per-sample terms (they sum to ``total``). CE uses the raw student logits, as the official code
    does; ``standardize`` applies only to the distillation terms. Labels of -1 mark images without a
    refined label: every term is 0 for them.
    """
    _check_logits(student_logits, teacher_logits)
    B, K = student_logits.shape
    _check_labels(labels, B, K, ignore_index=-1)
    valid = labels != -1                                                   # (B,)
    y = labels.long().clamp_min(0)                                         # (B,)
    zs, zt = student_logits, teacher_logits.detach()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    factor = rld_warmup_factor(progress, warmup)
    zero = torch.zeros((), dtype=student_logits.dtype, device=student_logits.device)
    parts = {
        "ce": ce_weight * ce_loss(student_logits, labels),
        "scd": torch.where(valid, factor * alpha * rld_scd(zs, zt, y, tau_a), zero),
        "mcd": torch.where(valid, factor * beta * rld_mcd(zs, zt, y, tau, strict), zero),
    }
    return parts["ce"] + parts["scd"] + parts["mcd"], parts


# ----------------------------------------------------------------------------- PLL two-hot (§3)
def top2_classes(teacher_logits: Tensor) -> Tensor:
    """The teacher's top-2 classes (B, 2), ties broken deterministically by the lower class index."""
    _check_logits(teacher_logits)
    if teacher_logits.shape[1] < 2:
        raise ValueError("two-hot targets need at least 2 classes")
    z = teacher_logits.detach()
    first = z.argmax(dim=1)                                                # first max = lower index
    rest = z.masked_fill(F.one_hot(first, z.shape[1]).bool(), float("-inf"))
    return torch.stack([first, rest.argmax(dim=1)], dim=1)                 # (B, 2)


def two_hot_ce(logits: Tensor, classes: Tensor) -> Tensor:
    """Jeong & Chung, ICLR 2025, paper form: mean over the set of −log p_c; ``classes`` is (B, k)."""
    _check_logits(logits)
    return -F.log_softmax(logits, dim=1).gather(1, classes.long()).mean(dim=1)  # (B,)


def gce_loss(logits: Tensor, classes: Tensor, q: float = 0.7) -> Tensor:
    """Jeong & Chung, ICLR 2025; follows SelfPLL `util.py` partial_loss: mean over c of (1 − p_c^q)/q."""
    _check_logits(logits)
    if not q > 0:
        raise ValueError(f"GCE needs q > 0; got {q}")
    p = F.softmax(logits, dim=1).gather(1, classes.long())                 # (B, k)
    return ((1 - p.pow(q)) / q).mean(dim=1)                                # (B,)


# ----------------------------------------------------------------------------- MixSKD (§4)
def mixup(x: Tensor, lam: float, perm: Tensor) -> Tensor:
    """Zhang et al., ICLR 2018 mixup as in MixSKD `main_mixskd_cifar.py`: λx + (1 − λ)x[π]."""
    return lam * x + (1 - lam) * x[perm]                                   # (B, ...)


def mix_ce(logits: Tensor, labels: Tensor, perm: Tensor, lam: float) -> Tensor:
    """MixSKD (Yang et al., ECCV 2022) `main_mixskd_cifar.py`: λ·CE(z, y) + (1 − λ)·CE(z, y[π])."""
    return lam * ce_loss(logits, labels) + (1 - lam) * ce_loss(logits, labels[perm])  # (B,)


def kl_t(a: Tensor, b: Tensor, T: float = 3.0) -> Tensor:
    """MixSKD (Yang et al., ECCV 2022) `main_mixskd_cifar.py`: KL_T(a ← b), per sample.

    T²·KL(softmax(sg(b)/T) ‖ softmax(a/T)); ``b`` is detached, so only ``a`` is trained.
    """
    return kd_loss(a, b.detach(), T=T)                                     # (B,)


def feature_mse(a: Tensor, b: Tensor) -> Tensor:
    """MixSKD `main_mixskd_cifar.py` feature consistency: per-sample mean of (a − b)² (no detach)."""
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).pow(2).flatten(1).mean(dim=1)                           # (B,)


def disc_bce(logits: Tensor, real: bool) -> Tensor:
    """MixSKD `methods/adversarial.py` discriminatorLoss: per-sample BCE-with-logits.

    Two-logit heads (B, 2) use the official one-hot targets [1, 0] (real) / [0, 1] (fake),
    averaged over the two outputs; single-logit heads (B,) or (B, 1) use 1 / 0.
    """
    if logits.dim() == 2 and logits.shape[1] == 2:
        target = torch.tensor([1.0, 0.0] if real else [0.0, 1.0], dtype=logits.dtype, device=logits.device)
        target = target.expand_as(logits)
    else:
        logits = logits.reshape(logits.shape[0], -1)
        target = torch.full_like(logits, 1.0 if real else 0.0)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)  # (B,)


# ----------------------------------------------------------------------------- UNIC (§5)
def standardize_with_ema(t: Tensor, mean_ema: Tensor, std_ema: Tensor, momentum: float,
                         eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Sariyildiz et al., ECCV 2024 (UNIC); follows naver/unic `utils.py` standard_normalize.

    Normalise with the PRE-update EMA, t̂ = (t − μ_ema)/(σ_ema + eps), then return the updated
    (μ, σ) = (1 − m)·EMA + m·batch, batch statistics over every dim but the last (batch, and
    patches for (B, N, D) tokens; unbiased std, without the official +eps). m = 0, or a batch of
    one row, leaves the statistics unchanged. Returns float32 ``(t̂, μ_new, σ_new)``.
    """
    t = t.detach().float()
    t_hat = (t - mean_ema) / (std_ema + eps)                               # (B, [N,] D)
    flat = t.reshape(-1, t.shape[-1])                                      # (B·N, D)
    if momentum <= 0 or flat.shape[0] < 2:
        return t_hat, mean_ema, std_ema
    mean_new = (1 - momentum) * mean_ema + momentum * flat.mean(dim=0)     # (D,)
    std_new = (1 - momentum) * std_ema + momentum * flat.std(dim=0)        # (D,)
    return t_hat, mean_new, std_new


class EmaStandardizer(nn.Module):
    """UNIC per-teacher, per-token-type target standardiser with EMA statistics (buffers only).

    A module, not a function, only because the statistics are state that must be saved and
    restored with the checkpoint (methods.md §5.4); it has no learnable parameters. Starts at
    (μ, σ) = (0, 1), so the first call returns t/(1 + 1e-6): warm the statistics up first.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def forward(self, t: Tensor, momentum: float) -> Tensor:
        t_hat, mean, std = standardize_with_ema(t, self.mean, self.std, momentum, self.eps)
        self.mean.copy_(mean)
        self.std.copy_(std)
        return t_hat


def ema_momentum(progress: float, start: float = 1.0, end: float = 0.001) -> float:
    """UNIC `main_unic.py` (utils.cosine_scheduler): statistics momentum, cosine from 1.0 to 0.001."""
    p = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * p))


def unic_loss(pred: Tensor, target: Tensor, lam_cos: float = 0.5, lam_sl1: float = 0.5,
              beta: float = 1.0) -> Tensor:
    """UNIC (Sariyildiz et al., ECCV 2024) `modeling/losses.py`: λ_cos·(1 − cos) + λ_sl1·SmoothL1_β.

    SmoothL1 is averaged over D. ``pred``/``target`` are (B, D) CLS tokens or (B, N, D) patch tokens (averaged over patches);
    the target is detached. Average token types in the caller.
    """
    if pred.shape != target.shape or pred.dim() not in (2, 3):
        raise ValueError(f"pred/target must share a (B, D) or (B, N, D) shape; got "
                         f"{tuple(pred.shape)}, {tuple(target.shape)}")
    target = target.detach().to(pred.dtype)
    cos = 1 - F.cosine_similarity(pred, target, dim=-1)                   # (B,) or (B, N)
    sl1 = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(dim=-1)
    loss = lam_cos * cos + lam_sl1 * sl1
    return loss.mean(dim=1) if loss.dim() == 2 else loss                   # (B,)


@torch.no_grad()
def teacher_dropping(losses: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """UNIC `modeling/teacher_dropping.py`: keep each image's worst-fitted teacher, drop the others w.p. p.

    ``losses`` (B, M) -> float flags (B, M) without gradient; every row keeps ≥ 1 teacher.
    """
    if losses.dim() != 2:
        raise ValueError(f"losses must be (B, M); got {tuple(losses.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must lie in [0, 1]; got {p}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(losses.shape, generator=generator, device=gdev).to(losses.device)  # (B, M)
    worst = F.one_hot(losses.detach().argmax(dim=1), losses.shape[1]).bool()          # (B, M)
    return ((u >= p) | worst).to(losses.dtype if losses.is_floating_point() else torch.float32)


def combine_teachers(losses: Tensor, flags: Tensor,
                     divisor: Literal["image", "pairs"] = "image") -> Tensor:
    """UNIC teacher dropping aggregation, per image: Σ_t a·ℓ / Σ_t a (a convex combination), (B,).

    ``divisor="pairs"`` reproduces the official code instead, which divides by the number of kept
    (teacher, image) pairs in the whole batch (methods.md §5.4; its comment says "images"): per
    image Σ_t a·ℓ · B / Σ a, so that ``.mean()`` equals ``combine_teachers_batch``.
    """
    a = flags.detach().to(losses.dtype)                                     # (B, M)
    num = (a * losses).sum(dim=1)                                           # (B,)
    if divisor == "image":
        return num / a.sum(dim=1).clamp_min(1)
    if divisor == "pairs":
        return num * losses.shape[0] / a.sum().clamp_min(1)
    raise ValueError(f"divisor must be 'image' or 'pairs'; got {divisor!r}")


