"""Property tests for training/losses.py: the unit-testable properties of methods.md §1-§6.

Golden values live in tests/fixtures/golden_losses.json (torchdistill style): a "spec" section
copied by hand from methods.md, and a "seeded" section of small stored inputs with the outputs
our implementation gave once, so a refactor cannot drift silently. Regenerate the seeded section
only after a deliberate change of the math:
    .venv/bin/python tests/test_losses.py --regen-golden
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import loss_refs as R
from webkd.training import losses as L

GOLDEN = Path(__file__).parent / "fixtures" / "golden_losses.json"
ZT = torch.tensor([[3.0, 2.0, 1.0, 0.0]])  # methods.md golden teacher logits
ZS = torch.zeros(1, 4)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)) * scale


# ----------------------------------------------------------------------------- golden cases
def _t(x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def _l(x: Any) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


def _round(x: torch.Tensor) -> list:
    """Stored inputs: 4 decimals, so the JSON holds exactly what the test feeds back in."""
    return np.round(x.double().numpy(), 4).tolist()


def _cases() -> dict[str, tuple[Callable[[torch.Generator], dict], Callable[[dict], torch.Tensor]]]:
    """name -> (make stored inputs from a generator, compute the flattened output from inputs)."""
    def logits_pair(g, B=3, K=5):
        return {"s": _round(torch.randn(B, K, generator=g) * 2), "t": _round(torch.randn(B, K, generator=g) * 2),
                "y": torch.randint(0, K, (B,), generator=g).tolist()}

    def rld(i, **kw):
        total, parts = L.rld_loss(_t(i["s"]), _t(i["t"]), _l(i["y"]), progress=0.05, **kw)
        return torch.cat([total, parts["ce"], parts["scd"], parts["mcd"]])

    return {
        "kd_loss_T4": (logits_pair, lambda i: L.kd_loss(_t(i["s"]), _t(i["t"]), T=4.0)),
        "dkd_loss": (logits_pair, lambda i: R.dkd_loss(_t(i["s"]), _t(i["t"]), _l(i["y"]))),
        "rld_loss_parts": (logits_pair, lambda i: rld(i)),
        "rld_loss_standardized": (logits_pair, lambda i: rld(i, standardize=True, tau=2.0, tau_a=1.0)),
        "rld_mcd_strict": (logits_pair, lambda i: L.rld_mcd(_t(i["s"]), _t(i["t"]), _l(i["y"]), 2.0, strict=True)),
        "instance_weights": (logits_pair, lambda i: L.instance_weights(_t(i["s"]), _t(i["t"]))),
        "gce_q07": (logits_pair, lambda i: L.gce_loss(_t(i["s"]), L.top2_classes(_t(i["t"])))),
        "two_hot_ce": (logits_pair, lambda i: L.two_hot_ce(_t(i["s"]), L.top2_classes(_t(i["t"])))),
        "kl_t_T3": (logits_pair, lambda i: L.kl_t(_t(i["s"]), _t(i["t"]), T=3.0)),
        "mix_ce": (logits_pair, lambda i: L.mix_ce(_t(i["s"]), _l(i["y"]), _l([2, 0, 1]), 0.3)),
        "disc_bce_real_fake": (
            lambda g: {"d": _round(torch.randn(3, 2, generator=g))},
            lambda i: torch.cat([L.disc_bce(_t(i["d"]), True), L.disc_bce(_t(i["d"]), False)])),
        "nt_xent_t03": (
            lambda g: {"a": _round(torch.randn(3, 4, generator=g)), "b": _round(torch.randn(3, 4, generator=g))},
            lambda i: L.nt_xent(_t(i["a"]), _t(i["b"]), t=0.3)),
        "feature_alignment": (
            lambda g: {"G": _round(torch.randn(2, 3, 2, 2, generator=g)), "F": _round(torch.randn(2, 3, 2, 2, generator=g))},
            lambda i: L.feature_alignment_loss(_t(i["G"]), _t(i["F"]))),
        "mix_distribution_injected": (
            lambda g: {"x": _round(torch.rand(3, 2, 3, 3, generator=g)), "lam": [0.2, 0.9, 0.5], "perm": [2, 0, 1]},
            lambda i: L.mix_distribution(_t(i["x"]), None, lam=_t(i["lam"]), perm=_l(i["perm"])).flatten()),
        "unic_loss_cls_patch": (
            lambda g: {"p": _round(torch.randn(2, 3, 4, generator=g)), "t": _round(torch.randn(2, 3, 4, generator=g))},
            lambda i: torch.cat([L.unic_loss(_t(i["p"])[:, 0], _t(i["t"])[:, 0]), L.unic_loss(_t(i["p"]), _t(i["t"]))])),
        "standardize_with_ema_m05": (
            lambda g: {"x": _round(torch.randn(4, 3, generator=g) * 3 + 1)},
            lambda i: torch.cat([t.flatten() for t in L.standardize_with_ema(
                _t(i["x"]), torch.full((3,), 0.5), torch.full((3,), 2.0), momentum=0.5)])),
        "combine_teachers": (
            lambda g: {"l": _round(torch.rand(3, 4, generator=g)), "a": [[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]]},
            lambda i: torch.cat([L.combine_teachers(_t(i["l"]), _t(i["a"])),
                                 L.combine_teachers(_t(i["l"]), _t(i["a"]), divisor="pairs")])),
        # These three depend on torch's CPU generator stream (stable across versions so far).
        "sample_beta_seed7": (lambda g: {"seed": 7},
                              lambda i: L.sample_beta(0.1, 0.1, 6, _gen(i["seed"])).float()),
        "teacher_dropping_seed3": (
            lambda g: {"seed": 3, "l": _round(torch.rand(4, 3, generator=g))},
            lambda i: L.teacher_dropping(_t(i["l"]), 0.5, _gen(i["seed"])).flatten()),
        "inject_label_noise_seed5": (
            lambda g: {"seed": 5, "y": list(range(5)) * 2},
            lambda i: R.inject_label_noise(_l(i["y"]), R.noise_matrix("symmetric", 5, 0.6),
                                           _gen(i["seed"])).float()),
    }


def _regen_golden() -> None:
    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"spec": {}}
    seeded = {}
    for k, (name, (make, fn)) in enumerate(sorted(_cases().items())):
        inputs = make(_gen(1000 + k))
        seeded[name] = {"inputs": inputs, "expected": fn(inputs).tolist()}
    data["seeded"] = seeded
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    # one line per case keeps the fixture readable and its diffs small
    spec = json.dumps(data["spec"], indent=2).replace("\n", "\n  ")
    cases = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in seeded.items())
    GOLDEN.write_text(f'{{\n  "spec": {spec},\n  "seeded": {{\n{cases}\n  }}\n}}\n')
    print(f"wrote {len(seeded)} seeded cases to {GOLDEN}")


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_seeded_cases_do_not_drift(golden):
    cases = _cases()
    assert set(golden["seeded"]) == set(cases), "golden fixture and test cases disagree; regenerate?"
    for name, case in golden["seeded"].items():
        got = cases[name][1](case["inputs"])
        torch.testing.assert_close(got, torch.tensor(case["expected"], dtype=got.dtype),
                                   rtol=1e-5, atol=1e-5, msg=f"golden case {name} drifted")


def test_golden_spec_values(golden):
    s = golden["spec"]
    tol = s["tolerance"]
    assert L.kd_loss(ZS, ZT, T=4.0).item() == pytest.approx(s["kd_T4"], abs=tol)
    for tau in ("1", "4"):
        t = float(tau)
        assert L.rld_scd(ZS, ZT, _l([1]), tau_a=t).item() == pytest.approx(s[f"rld_scd_tau{tau}"], abs=tol)
        assert L.rld_mcd(ZS, ZT, _l([1]), tau=t).item() == pytest.approx(s[f"rld_mcd_tau{tau}"], abs=tol)
    assert L.rld_mcd(ZS, ZT, _l([0]), tau=1.0).item() == pytest.approx(s["rld_mcd_tau1_y0"], abs=tol)
    same = torch.ones(4, 8)
    assert L.nt_xent(same, same).tolist() == pytest.approx([s["nt_xent_identical_B4"]] * 4, abs=tol)
    assert s["nt_xent_identical_B4"] == pytest.approx(math.log(7), abs=tol)
    assert L.gce_loss(torch.zeros(1, 4), _l([[0]]), q=0.7).item() == pytest.approx(s["gce_p025_q07"], abs=tol)
    assert L.two_hot_ce(torch.zeros(1, 4), _l([[0, 1]])).item() == pytest.approx(s["two_hot_ce_uniform_K4"], abs=tol)
    w = L.instance_weights(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)).item()
    assert w == pytest.approx(s["kd3_weight_distance1"], abs=tol)


# ----------------------------------------------------------------------------- shapes
B = 5


def _per_sample_outputs() -> dict[str, torch.Tensor]:
    zs, zt, y = _rand(B, 6, seed=1), _rand(B, 6, seed=2), torch.arange(B) % 6
    feats = _rand(B, 3, 4, 4, seed=3)
    pair = L.top2_classes(zt)
    perm = torch.roll(torch.arange(B), 1)
    return {
        "ce_loss": L.ce_loss(zs, y), "soft_ce": R.soft_ce(zs, R.two_hot_targets(zt)),
        "kd_loss": L.kd_loss(zs, zt), "dkd_loss": R.dkd_loss(zs, zt, y),
        "instance_weights": L.instance_weights(zs, zt),
        "feature_alignment_loss": L.feature_alignment_loss(feats, feats.flip(0)),
        "nt_xent": L.nt_xent(zs, zt),
        "rld_scd": L.rld_scd(zs, zt, y), "rld_mcd": L.rld_mcd(zs, zt, y),
        "rld_loss": L.rld_loss(zs, zt, y, progress=0.5)[0],
        "two_hot_ce": L.two_hot_ce(zs, pair), "gce_loss": L.gce_loss(zs, pair),
        "mix_ce": L.mix_ce(zs, y, perm, 0.3), "kl_t": L.kl_t(zs, zt), "feature_mse": L.feature_mse(feats, feats * 2),
        "disc_bce": L.disc_bce(zs[:, :2], True),
        "unic_loss": L.unic_loss(_rand(B, 7, 8, seed=4), _rand(B, 7, 8, seed=5)),
        "combine_teachers": L.combine_teachers(zs.abs(), torch.ones_like(zs)),
    }


@pytest.fixture(scope="module")
def per_sample_outputs() -> dict[str, torch.Tensor]:
    return _per_sample_outputs()


@pytest.mark.parametrize("name", sorted(_per_sample_outputs()))
def test_every_loss_is_per_sample(name, per_sample_outputs):
    out = per_sample_outputs[name]
    assert out.shape == (B,), f"{name} returned {tuple(out.shape)}"
    assert torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        L.kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="labels must lie"):
        L.rld_loss(torch.zeros(2, 3), torch.zeros(2, 3), _l([0, 3]), progress=1.0)
    with pytest.raises(ValueError, match="no label"):
        L.rld_loss(torch.zeros(2, 3), torch.zeros(2, 3), _l([0, -2]), progress=1.0)
    with pytest.raises(ValueError, match="pool the larger map"):
        L.feature_alignment_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="unknown noise kind"):
        R.noise_matrix("pairflip", 4, 0.2)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- §6 vanilla KD and CE
def test_kd_nonnegative_zero_at_equality_and_shift_invariant():
    zs, zt = _rand(16, 10, seed=6, scale=3), _rand(16, 10, seed=7, scale=3)
    kd = L.kd_loss(zs, zt)
    assert (kd >= 0).all()
    assert L.kd_loss(zt, zt).abs().max() < 1e-6
    shift_s, shift_t = _rand(16, 1, seed=8, scale=5), _rand(16, 1, seed=9, scale=5)
    torch.testing.assert_close(L.kd_loss(zs + shift_s, zt), kd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(L.kd_loss(zs, zt + shift_t), kd, rtol=1e-4, atol=1e-5)
    # brute-force reference: the batchmean KL of torch
    ref = F.kl_div(F.log_softmax(zs / 4, 1), F.softmax(zt / 4, 1), reduction="batchmean") * 16
    assert kd.mean().item() == pytest.approx(ref.item(), rel=1e-5)


def test_ce_ignores_missing_labels_and_soft_ce_matches_hard_ce():
    z = _rand(4, 5, seed=10)
    ce = L.ce_loss(z, _l([1, -1, 3, -1]))
    assert ce[1] == 0 and ce[3] == 0 and ce[0] > 0
    torch.testing.assert_close(R.soft_ce(z, F.one_hot(_l([1, 0, 3, 2]), 5).float()),
                               L.ce_loss(z, _l([1, 0, 3, 2])))


def test_teacher_gets_no_gradient_from_logit_losses():
    zs = _rand(3, 4, seed=11).requires_grad_()
    zt = _rand(3, 4, seed=12).requires_grad_()
    y = _l([0, 1, 2])
    total = (L.kd_loss(zs, zt) + L.rld_loss(zs, zt, y, progress=1.0)[0] + R.dkd_loss(zs, zt, y)
             + L.kl_t(zs, zt)).sum()
    total.backward()
    assert zt.grad is None and zs.grad is not None and zs.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- §1 KD^3
def test_kd3_weights_range_equality_monotone_and_no_grad():
    zt = torch.zeros(6, 3)
    dirs = F.normalize(_rand(6, 3, seed=13), dim=1)
    dist = torch.tensor([0.0, 0.1, 0.5, 1.0, 3.0, 40.0])
    zs = (zt + dirs * dist[:, None]).requires_grad_()
    w = L.instance_weights(zs, zt)
    assert w[0].item() == 0.5 and (w[1:] > 0.5).all() and (w <= 1).all()
    assert (w[1:] - w[:-1] >= 0).all(), "w must be monotone in the distance"
    assert w[3].item() == pytest.approx(0.73106, abs=1e-5)
    assert not w.requires_grad and w.grad_fn is None
    # strictly below 1 for any realistic distance
    assert L.instance_weights(torch.tensor([[5.0, 0.0]]), torch.zeros(1, 2)).item() < 1


def test_kd3_feature_loss_properties():
    G, FT = _rand(4, 8, 3, 3, seed=14), _rand(4, 8, 3, 3, seed=15)
    loss = L.feature_alignment_loss(G, FT)
    assert (loss >= 0).all()
    assert L.feature_alignment_loss(FT, FT).abs().max() == 0
    w = torch.rand(4, generator=_gen(16)) * 0.5 + 0.5
    assert (2 * w * loss).mean().item() == pytest.approx(2 * (w * loss).mean().item(), rel=1e-6)
    # all w = 1: the plain MSE; and the spec's Σ w‖·‖²/(B·C·H·W)
    assert loss.mean().item() == pytest.approx(F.mse_loss(G, FT).item(), rel=1e-6)
    spec = (w[:, None, None, None] * (G - FT) ** 2).sum() / G.numel()
    assert (w * loss).mean().item() == pytest.approx(spec.item(), rel=1e-6)
    FT.requires_grad_()
    L.feature_alignment_loss(G.requires_grad_(), FT).sum().backward()
    assert FT.grad is None and G.grad is not None


def test_kd3_pool_to_match_pools_the_larger_map():
    a, b = _rand(2, 8, 7, 7, seed=17), _rand(2, 16, 4, 4, seed=18)
    pa, pb = R.pool_to_match(a, b)
    assert pa.shape == (2, 8, 4, 4) and pb is b
    pb2, pa2 = R.pool_to_match(b, a)
    assert pa2.shape == (2, 8, 4, 4) and pb2 is b
    torch.testing.assert_close(pa.mean(dim=(2, 3)), a.mean(dim=(2, 3)), rtol=0.2, atol=0.2)


@pytest.fixture(scope="module")
def mixed_domain_images(pacs32) -> torch.Tensor:
    """Eight real PACS images at 32 px, from every domain (photo, art, cartoon, sketch): [0, 1] RGB."""
    doms = pacs32.domains
    idx = np.concatenate([np.flatnonzero(doms == d)[:2] for d in np.unique(doms)])[:8]
    return torch.from_numpy(pacs32.images[idx]).permute(0, 3, 1, 2).float() / 255  # (8, 3, 32, 32)


def test_kd3_mix_distribution_on_real_images(mixed_domain_images):
    x = mixed_domain_images
    B = x.shape[0]
    out = L.mix_distribution(x, _gen(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, x, atol=1e-3), "a random mix should change the statistics"
    torch.testing.assert_close(L.mix_distribution(x, _gen(0)), out)  # same seed, same result
    # identity when λ ≡ 1, when π is the identity
    torch.testing.assert_close(L.mix_distribution(x, _gen(1), lam=1.0), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L.mix_distribution(x, _gen(1), perm=torch.arange(B)), x, atol=1e-5, rtol=1e-5)
    # the output's per-channel statistics are (μ̃, σ̃)
    lam, perm = torch.rand(B, generator=_gen(2)), torch.roll(torch.arange(B), 3)
    out = L.mix_distribution(x, None, lam=lam, perm=perm)
    mu, sig = x.mean(dim=(2, 3)), (x.var(dim=(2, 3)) + 1e-6).sqrt()          # (B, 3)
    mu_mix = lam[:, None] * mu + (1 - lam[:, None]) * mu[perm]
    sig_mix = lam[:, None] * sig + (1 - lam[:, None]) * sig[perm]
    torch.testing.assert_close(out.mean(dim=(2, 3)), mu_mix, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std(dim=(2, 3)), sig_mix, atol=1e-3, rtol=1e-3)


def test_kd3_mix_distribution_statistics_are_detached(mixed_domain_images):
    x = mixed_domain_images.clone().requires_grad_()
    lam = torch.full((x.shape[0],), 0.5)
    perm = torch.roll(torch.arange(x.shape[0]), 1)
    w = torch.rand(x.shape, generator=_gen(3)) + 0.5
    (w * L.mix_distribution(x, None, lam=lam, perm=perm)).sum().backward()
    # with detached μ, σ the gradient is w·σ̃/σ: grad/w is constant over pixels per image, channel
    ratio = x.grad / w
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)


def _official_ntxent(x1: torch.Tensor, x2: torch.Tensor, t: float) -> torch.Tensor:
    """Brute-force reference: the KD³ official Contrastive_loss, re-typed as a mean over 2B rows."""
    x1, x2 = F.normalize(x1, dim=1), F.normalize(x2, dim=1)
    out = torch.cat([x1, x2])
    sim = torch.exp(out @ out.t() / t)
    sim = sim.masked_select(~torch.eye(len(out), dtype=torch.bool)).view(len(out), -1)
    pos = torch.exp((x1 * x2).sum(-1) / t).repeat(2)
    return (-torch.log(pos / sim.sum(-1))).mean()


def test_kd3_nt_xent_properties():
    a, b = _rand(6, 16, seed=19), _rand(6, 16, seed=20)
    per = L.nt_xent(a, b)
    assert (per >= 0).all()
    torch.testing.assert_close(L.nt_xent(b, a), per)                          # symmetric in the views
    assert per.mean().item() == pytest.approx(_official_ntxent(a, b, 0.3).item(), rel=1e-5)
    for n in (1, 4, 9):
        v = _rand(1, 5, seed=n).expand(n, 5)
        assert L.nt_xent(v, v).tolist() == pytest.approx([math.log(2 * n - 1)] * n, abs=1e-5)
    # aligned views score lower than random pairings
    assert L.nt_xent(a, a + 0.01 * b).mean() < per.mean()


def test_kd3_teacher_side_term_sends_no_gradient_to_student():
    # The teacher-side NT-Xent is nt_xent(E_T(h_T(x)), E_T(h_T(x_mix))) with h_T from the frozen
    # teacher (detached). It must train E_T and never the student. The module-level check with
    # real models belongs to tests of training/methods.py; this pins the loss-level contract.
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(12, 6), torch.nn.Linear(12, 6).requires_grad_(False)
    e_s, e_t = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    x = _rand(5, 12, seed=21)
    x_mix = x + 0.3 * _rand(5, 12, seed=22)
    h_t, h_t_mix = teacher(x).detach(), teacher(x_mix).detach()
    L.nt_xent(e_t(h_t), e_t(h_t_mix)).mean().backward()
    assert all(p.grad is None for p in student.parameters())
    assert e_t.weight.grad is not None and e_t.weight.grad.abs().sum() > 0
    # the student-side term does reach the student (and E_S)
    L.nt_xent(e_s(student(x)), e_s(student(x_mix))).mean().backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0


def test_sample_beta_matches_beta_moments_and_is_seeded():
    for a in (0.1, 0.4, 2.0):
        s = L.sample_beta(a, a, 40000, _gen(int(a * 10)))
        assert ((s >= 0) & (s <= 1)).all()
        var = 1 / (4 * (2 * a + 1))
        assert s.mean().item() == pytest.approx(0.5, abs=0.01)
        assert s.var().item() == pytest.approx(var, rel=0.05)
    torch.testing.assert_close(L.sample_beta(0.1, 0.1, 5, _gen(3)), L.sample_beta(0.1, 0.1, 5, _gen(3)))
    assert L.sample_mixup_lambda(0.0, _gen(0)) == 1.0
    assert 0.0 <= L.sample_mixup_lambda(0.4, _gen(0)) <= 1.0


# ----------------------------------------------------------------------------- §2 RLD
def test_rld_mask_contents_include_y_and_its_ties():
    zt = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 1.0, 0.0]])
    m = L.rld_exclusion_mask(zt, _l([1, 0]))
    assert m.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert m.gather(1, _l([[1], [0]])).all(), "y must always be in M"
    strict = L.rld_exclusion_mask(zt, _l([1, 0]), strict=True)
    assert strict.tolist() == [[False, False, False, False], [False, False, False, False]]


def test_rld_equals_dkd_when_teacher_is_correct():
    zs, zt = _rand(8, 7, seed=23, scale=2), _rand(8, 7, seed=24, scale=2)
    y = zt.argmax(1)                                      # teacher ranks y strictly first
    zt[torch.arange(8), y] += 0.5
    m = L.rld_exclusion_mask(zt, y)
    assert (m.sum(1) == 1).all() and m.gather(1, y[:, None]).all()
    for T in (1.0, 4.0):
        nckd = R.dkd_loss(zs, zt, y, alpha=0.0, beta=1.0, T=T)
        torch.testing.assert_close(L.rld_mcd(zs, zt, y, tau=T), nckd, rtol=1e-5, atol=1e-6)
        _, parts = L.rld_loss(zs, zt, y, progress=1.0, alpha=1.0, beta=8.0, tau=T, tau_a=T, ce_weight=0.0)
        torch.testing.assert_close(parts["scd"] + parts["mcd"], R.dkd_loss(zs, zt, y, 1.0, 8.0, T),
                                   rtol=1e-5, atol=1e-6)


def test_rld_identical_logits():
    z = _rand(6, 5, seed=25, scale=3)
    y = _l([0, 1, 2, 3, 4, 0])
    assert L.rld_mcd(z, z, y).abs().max() < 1e-6
    y_top = z.argmax(1)
    assert L.rld_scd(z, z, y_top).abs().max() < 1e-6
    assert (L.rld_scd(z, z, (y_top + 1) % 5) > 0).all(), "SCD pairs teacher top with student true class"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rld_degenerate_masks_are_zero_and_finite(dtype):
    zt = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0],
                       [60000.0, -60000.0, 0.0, 5.0]]).to(dtype)
    fill = L._fill_value(dtype)   # the mask value is large, negative and *finite* in this dtype
    assert math.isfinite(fill) and fill < -1e4 and math.isfinite(torch.tensor(fill, dtype=dtype).item())
    y = _l([3, 2, 0, 1])   # y last (M = all); one class left; all tied; extreme fp16 range
    zs = _rand(4, 4, seed=26, scale=4).to(dtype).requires_grad_()
    mcd = L.rld_mcd(zs, zt, y, tau=4.0)
    assert mcd.dtype == dtype and torch.isfinite(mcd).all()
    assert mcd.float().abs().max().item() == 0.0
    total, _ = L.rld_loss(zs, zt, y, progress=1.0)
    total.float().sum().backward()
    assert torch.isfinite(total).all() and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rld_finite_in_low_precision(dtype):
    zs, zt = _rand(8, 10, seed=27, scale=8), _rand(8, 10, seed=28, scale=8)
    y = torch.arange(8)
    ref, _ = L.rld_loss(zs, zt, y, progress=1.0)
    got, _ = L.rld_loss(zs.to(dtype), zt.to(dtype), y, progress=1.0)
    assert torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


def test_rld_masked_gradients_are_zero():
    zs = _rand(6, 8, seed=29, scale=2).requires_grad_()
    zt = _rand(6, 8, seed=30, scale=2)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    L.rld_mcd(zs, zt, y).sum().backward()
    mask = L.rld_exclusion_mask(zt, y)
    assert (zs.grad[mask] == 0).all()
    assert (zs.grad[~mask].abs() > 0).any()


def test_rld_shift_invariance_and_p_y_dependence():
    zs, zt = _rand(5, 6, seed=31, scale=2), _rand(5, 6, seed=32, scale=2)
    y = _l([0, 1, 2, 3, 4])
    shift = _rand(5, 1, seed=33, scale=10)
    torch.testing.assert_close(L.rld_mcd(zs + shift, zt, y), L.rld_mcd(zs, zt, y), rtol=1e-4, atol=1e-5)
    # SCD sees z^S only through p^S_y: reshuffle the non-target logits, keep logsumexp of the others
    zs2 = zs.clone()
    for i, yi in enumerate(y.tolist()):
        others = [k for k in range(6) if k != yi]
        zs2[i, others] = zs[i, others].flip(0)
    torch.testing.assert_close(L.rld_scd(zs2, zt, y), L.rld_scd(zs, zt, y), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(L.rld_mcd(zs2, zt, y), L.rld_mcd(zs, zt, y))
    # and it is 0 iff p^S_y = p^T_m (at τ_a = 1): set the student's y logit to hit p^T_m exactly
    pm = F.softmax(zt, 1).max(1).values
    others = zs.masked_fill(F.one_hot(y, 6).bool(), float("-inf")).logsumexp(1)
    zs3 = zs.clone()
    zs3[torch.arange(5), y] = others + torch.log(pm / (1 - pm))
    assert L.rld_scd(zs3, zt, y, tau_a=1.0).abs().max() < 1e-5
    assert (L.rld_scd(zs, zt, y, tau_a=1.0) > 1e-4).all()


def test_rld_warmup_factor_and_standardize_and_missing_labels():
    assert L.rld_warmup_factor(0.0, 1 / 12) == 0.0
    assert L.rld_warmup_factor(1 / 24, 1 / 12) == pytest.approx(0.5)
    assert L.rld_warmup_factor(0.5, 1 / 12) == 1.0 and L.rld_warmup_factor(0.3, 0.0) == 1.0
    zs, zt, y = _rand(4, 5, seed=34), _rand(4, 5, seed=35), _l([0, 1, -1, 3])
    full, p_full = L.rld_loss(zs, zt, y, progress=1.0)
    half, p_half = L.rld_loss(zs, zt, y, progress=1 / 24)
    torch.testing.assert_close(p_half["scd"] * 2, p_full["scd"])
    torch.testing.assert_close(p_half["ce"], p_full["ce"])
    torch.testing.assert_close(full, p_full["ce"] + p_full["scd"] + p_full["mcd"])
    assert full[2] == 0, "an image without a refined label contributes nothing"
    z = L.standardize_logits(_rand(3, 9, seed=36, scale=5) + 7)
    torch.testing.assert_close(z.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(3), atol=1e-5, rtol=0)
    s_std, _ = L.rld_loss(zs * 3 + 2, zt, y, progress=1.0, standardize=True, ce_weight=0.0)
    s_ref, _ = L.rld_loss(zs, zt, y, progress=1.0, standardize=True, ce_weight=0.0)
    torch.testing.assert_close(s_std, s_ref, rtol=1e-4, atol=1e-5)  # affine-invariant when standardised


# ----------------------------------------------------------------------------- §3 PLL two-hot
def test_two_hot_targets():
    zt = _rand(20, 7, seed=37, scale=3)
    t = R.two_hot_targets(zt)
    assert ((t == 0.5).sum(1) == 2).all() and ((t == 0).sum(1) == 5).all()
    torch.testing.assert_close(t.sum(1), torch.ones(20))
    top2 = zt.topk(2, dim=1).indices
    assert (t.gather(1, top2) == 0.5).all()
    torch.testing.assert_close(R.two_hot_targets(zt * 3.5 - 2.0), t)
    ties = torch.tensor([[1.0, 5.0, 5.0, 5.0], [2.0, 2.0, 0.0, 2.0]])
    assert L.top2_classes(ties).tolist() == [[1, 2], [0, 1]]


def test_two_hot_ce_bound_gradient_and_uniform_value():
    z = _rand(30, 6, seed=38, scale=3).requires_grad_()
    pair = L.top2_classes(_rand(30, 6, seed=39))
    ce = L.two_hot_ce(z, pair)
    assert (ce >= math.log(2) - 1e-6).all()
    ce.sum().backward()
    t = torch.zeros(30, 6).scatter_(1, pair, 0.5)
    torch.testing.assert_close(z.grad, F.softmax(z.detach(), 1) - t, rtol=1e-5, atol=1e-6)
    best = torch.full((1, 6), -30.0)
    best[0, [2, 4]] = 0.0
    assert L.two_hot_ce(best, _l([[2, 4]])).item() == pytest.approx(math.log(2), abs=1e-6)
    assert L.two_hot_ce(torch.zeros(1, 4), _l([[0, 3]])).item() == pytest.approx(1.38629, abs=1e-5)
    torch.testing.assert_close(L.two_hot_ce(z.detach(), pair), R.soft_ce(z.detach(), t))


def test_gce_range_value_and_small_q_limit():
    z = _rand(40, 5, seed=40, scale=6)
    pair = L.top2_classes(_rand(40, 5, seed=41))
    g = L.gce_loss(z, pair, q=0.7)
    assert (g >= 0).all() and (g < 1 / 0.7).all()
    assert L.gce_loss(torch.zeros(1, 4), _l([[1]]), q=0.7).item() == pytest.approx(0.88724, abs=1e-5)
    z2 = _rand(10, 5, seed=42)
    torch.testing.assert_close(L.gce_loss(z2, pair[:10], q=1e-4), L.two_hot_ce(z2, pair[:10]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("eta", [0.0, 0.2, 0.6])
def test_noise_matrices_and_flip_rate(kind, eta):
    K = 6
    m = R.noise_matrix(kind, K, eta)
    torch.testing.assert_close(m.sum(1), torch.ones(K, dtype=torch.float64))
    assert torch.allclose(m.diagonal(), torch.full((K,), 1 - eta, dtype=torch.float64))
    off = ~torch.eye(K, dtype=torch.bool)
    if kind == "symmetric":
        assert torch.allclose(m[off], torch.full((K * (K - 1),), eta / (K - 1), dtype=torch.float64))
    else:
        nxt = (torch.arange(K) + 1) % K
        assert torch.allclose(m[torch.arange(K), nxt], torch.full((K,), 2 * eta / K, dtype=torch.float64))
        rest = off.clone()
        rest[torch.arange(K), nxt] = False
        assert torch.allclose(m[rest], torch.full((K * (K - 2),), eta / K, dtype=torch.float64))
    n = 20000
    y = torch.arange(n) % K
    noisy = R.inject_label_noise(y, m, _gen(43))
    rate = (noisy != y).double().mean().item()
    sigma = math.sqrt(eta * (1 - eta) / n)
    assert abs(rate - eta) <= 3 * sigma + 1e-12
    torch.testing.assert_close(R.inject_label_noise(y[:50], m, _gen(1)), R.inject_label_noise(y[:50], m, _gen(1)))


def test_cluster_noise_rows_sum_to_one_even_for_singletons():
    m = R.noise_matrix("cluster", 5, 0.4, clusters=_l([0, 0, 1, 1, 2]))
    torch.testing.assert_close(m.sum(1), torch.ones(5, dtype=torch.float64))
    assert m[4, 4] == 1.0 and m[0, 1] == pytest.approx(0.4) and m[0, 2] == 0


# ----------------------------------------------------------------------------- §4 MixSKD
def test_mixskd_lambda_one_is_clean_training():
    x, perm = _rand(4, 3, 5, 5, seed=44), torch.tensor([3, 2, 1, 0])
    torch.testing.assert_close(L.mixup(x, 1.0, perm), x)
    z, y = _rand(4, 6, seed=45), _l([0, 1, 2, 3])
    torch.testing.assert_close(L.mix_ce(z, y, perm, 1.0), L.ce_loss(z, y))
    # with λ = 1 the interpolated clean outputs equal the outputs on x̃ = x
    feats = _rand(4, 8, 2, 2, seed=46)
    z_bar = 1.0 * z + 0.0 * z[perm]
    assert L.feature_mse(1.0 * feats + 0.0 * feats[perm], feats).abs().max() == 0
    assert L.kl_t(z_bar, z).abs().max() < 1e-6 and L.kl_t(z, z_bar).abs().max() < 1e-6


def test_mixskd_mix_ce_is_linear_in_lambda_and_reduces_to_ce():
    z, y = _rand(6, 5, seed=47), _l([0, 1, 2, 3, 4, 0])
    perm = torch.roll(torch.arange(6), 2)
    l0, l1, l3 = (L.mix_ce(z, y, perm, lam) for lam in (0.0, 1.0, 0.3))
    torch.testing.assert_close(l3, 0.3 * l1 + 0.7 * l0)
    same = torch.tensor([0, 5, 2, 3, 4, 1])  # y[same] == y
    y2 = _l([0, 1, 2, 3, 4, 1])
    torch.testing.assert_close(L.mix_ce(z, y2, same, 0.37), L.ce_loss(z, y2))


def test_mixskd_kl_t_detached_target_and_sign():
    a, b = _rand(5, 7, seed=48).requires_grad_(), _rand(5, 7, seed=49).requires_grad_()
    kl = L.kl_t(a, b, T=3.0)
    assert (kl >= 0).all()
    kl.sum().backward()
    assert b.grad is None and a.grad is not None
    assert L.kl_t(a.detach(), a.detach()).abs().max() < 1e-6
    ref = F.kl_div(F.log_softmax(a.detach() / 3, 1), F.softmax(b.detach() / 3, 1), reduction="batchmean") * 9
    assert kl.mean().item() == pytest.approx(ref.item(), rel=1e-5)


def test_mixskd_disc_bce_matches_official_targets():
    d = _rand(4, 2, seed=50)
    real, fake = L.disc_bce(d, True), L.disc_bce(d, False)
    both = torch.cat([d, d])
    target = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    official = F.binary_cross_entropy_with_logits(both, target)  # the official mean over 2B×2
    assert torch.cat([real, fake]).mean().item() == pytest.approx(official.item(), rel=1e-6)
    single = L.disc_bce(d[:, :1], True)
    torch.testing.assert_close(single, F.softplus(-d[:, 0]))


# ----------------------------------------------------------------------------- §5 UNIC
def test_teacher_dropping_never_drops_the_worst_fitted_teacher():
    losses = torch.rand(64, 4, generator=_gen(51))
    worst = losses.argmax(1)
    for seed in range(200):
        a = L.teacher_dropping(losses, 0.5, _gen(seed))
        assert (a.gather(1, worst[:, None]) == 1).all()
        assert (a.sum(1) >= 1).all()


def test_teacher_dropping_edge_probabilities_and_single_teacher():
    losses = torch.rand(32, 3, generator=_gen(52))
    assert (L.teacher_dropping(losses, 0.0, _gen(0)) == 1).all()
    only = L.teacher_dropping(losses, 1.0, _gen(0))
    torch.testing.assert_close(only, F.one_hot(losses.argmax(1), 3).float())
    one = torch.rand(10, 1, generator=_gen(53))
    a = L.teacher_dropping(one, 0.5, _gen(1))
    assert (a == 1).all()
    torch.testing.assert_close(L.combine_teachers(one, a), one[:, 0])
    torch.testing.assert_close(L.combine_teachers(losses, torch.ones_like(losses)), losses.mean(1))


def test_teacher_dropping_mean_kept_count():
    M, p, n = 4, 0.5, 20000
    losses = torch.rand(n, M, generator=_gen(54))
    kept = L.teacher_dropping(losses, p, _gen(55)).sum(1)
    expected = 1 + (M - 1) * (1 - p)
    assert expected == 2.5
    se = math.sqrt((M - 1) * p * (1 - p) / n)
    assert abs(kept.mean().item() - expected) < 4 * se


def test_teacher_flags_without_grad_and_convex_combination():
    losses = torch.rand(16, 3, generator=_gen(56)).requires_grad_()
    a = L.teacher_dropping(losses, 0.5, _gen(57))
    assert not a.requires_grad and a.grad_fn is None
    comb = L.combine_teachers(losses, a)
    big = torch.where(a.bool(), losses, torch.full_like(losses, -1.0)).max(1).values
    small = torch.where(a.bool(), losses, torch.full_like(losses, 2.0)).min(1).values
    assert ((comb >= small - 1e-6) & (comb <= big + 1e-6)).all()
    comb.sum().backward()
    assert (losses.grad[a == 0] == 0).all() and (losses.grad[a == 1] > 0).all()
    # the official divisor (kept pairs in the batch) as a per-sample form and a batch scalar
    pairs = L.combine_teachers(losses.detach(), a, divisor="pairs")
    batch = R.combine_teachers_batch(losses.detach(), a)
    assert pairs.mean().item() == pytest.approx(batch.item(), rel=1e-6)
    assert batch.item() == pytest.approx(((a * losses).sum() / a.sum()).item(), rel=1e-6)


def test_unic_standardisation_first_call_m1_m0_and_pre_update():
    std = L.EmaStandardizer(5)
    t = _rand(6, 7, 5, seed=58, scale=3) + 2                 # (B, N, D) patch tokens
    out = std(t, momentum=1.0)
    torch.testing.assert_close(out, t / (1 + 1e-6))          # first call: unstandardised targets
    flat = t.reshape(-1, 5)
    torch.testing.assert_close(std.mean, flat.mean(0))       # m = 1: EMA = batch stats over B and N
    torch.testing.assert_close(std.std, flat.std(0))
    frozen_mean, frozen_std = std.mean.clone(), std.std.clone()
    t2 = _rand(6, 5, seed=59)
    out2 = std(t2, momentum=0.0)                             # m = 0 (evaluation): unchanged
    torch.testing.assert_close(std.mean, frozen_mean)
    torch.testing.assert_close(std.std, frozen_std)
    torch.testing.assert_close(out2, (t2 - frozen_mean) / (frozen_std + 1e-6))
    out3 = std(t2, momentum=0.5)                             # normalised with the PRE-update EMA
    torch.testing.assert_close(out3, out2)
    torch.testing.assert_close(std.mean, 0.5 * frozen_mean + 0.5 * t2.mean(0))
    assert set(std.state_dict()) == {"mean", "std"} and not list(std.parameters())


def test_unic_momentum_schedule():
    assert L.ema_momentum(0.0) == pytest.approx(1.0)
    assert L.ema_momentum(1.0) == pytest.approx(0.001)
    vals = [L.ema_momentum(p / 20) for p in range(21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_unic_loss_zero_cos_range_and_smooth_l1_piecewise():
    t = _rand(4, 9, 16, seed=60)
    assert L.unic_loss(t.clone(), t).abs().max() < 1e-6
    cos_only = L.unic_loss(-t[:, 0], t[:, 0], lam_cos=1.0, lam_sl1=0.0)
    torch.testing.assert_close(cos_only, torch.full((4,), 2.0))
    rand_cos = L.unic_loss(_rand(50, 8, seed=61), _rand(50, 8, seed=62), lam_cos=1.0, lam_sl1=0.0)
    assert ((rand_cos >= 0) & (rand_cos <= 2)).all()
    base = _rand(3, 10, seed=63)
    for d in (0.3, -0.7, 1.0, 2.5, -4.0):
        sl1 = L.unic_loss(base + d, base, lam_cos=0.0, lam_sl1=1.0)
        want = 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5
        torch.testing.assert_close(sl1, torch.full((3,), want), rtol=1e-5, atol=1e-6)
    # default: 0.5·cos + 0.5·SmoothL1, patch terms averaged over patches
    p = _rand(2, 3, 8, seed=64)
    per_patch = torch.stack([L.unic_loss(p[:, n], t[:2, n, :8]) for n in range(3)], 1)
    torch.testing.assert_close(L.unic_loss(p, t[:2, :3, :8]), per_patch.mean(1))


if __name__ == "__main__":
    if "--regen-golden" in sys.argv:
        _regen_golden()
    else:
        print(__doc__)
