"""[project] selection.mode balanced / soft: the relevance score (selection/scores.py), class-balanced
budgets and soft weights (selection/budgets.py), their reasons in policy.select and in the loop."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from webkd.pipeline.config import BudgetConfig, SelectionConfig, SoftConfig
from webkd.pipeline.records import BELOW_BUDGET, LEDGER_REASONS, LOW_RELEVANCE, REJECT_REASONS
from webkd.selection import budgets as bud
from webkd.selection import policy as pol
from webkd.selection.run_data import REASONS
from webkd.selection.scores import ood_score, query_prior, relevance, robust_z


ROOT = Path(__file__).resolve().parent.parent


def logsumexp(z: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    """Independent reference: log of the sum of exponentials, in extended precision."""
    out = np.log(np.exp(np.asarray(z, np.longdouble)).sum(axis=axis, keepdims=keepdims))
    return out.astype(np.float64)


def _cfg(mode: str, **sections) -> SelectionConfig:
    return SelectionConfig.model_validate({"mode": mode, **sections})


@pytest.fixture(scope="module")
def web_pool():
    """A pool shaped like fashion-web: 6 classes, a catch-all class 0 the teacher over-predicts
    with low logits (off-class images), in-class images with larger logits, web queries
    (-1 for off-class), neighbours from the logits' cosine."""
    rng = np.random.default_rng(0)
    n_in, n_off, k = 300, 150, 6
    y = rng.integers(0, k, n_in)
    z_in = rng.normal(0, 1, (n_in, k)) + 6.0 * np.eye(k)[y]
    z_off = rng.normal(0, 0.5, (n_off, k)) + 2.5 * np.eye(k)[0]     # confidently "class 0", small logits
    zt = np.concatenate([z_in, z_off])
    web_class = np.concatenate([np.where(rng.random(n_in) < 0.8, y, (y + 1) % k), np.full(n_off, -1)])
    unit = zt / np.linalg.norm(zt, axis=1, keepdims=True)
    neighbors = np.argsort(-(unit @ unit.T), axis=1, kind="stable")[:, 1:9]
    split = np.where(rng.random(len(zt)) < 0.1, "val", "train")
    return zt, web_class, neighbors, split, n_in


# --------------------------------------------------------------------------------------------
# the relevance score
# --------------------------------------------------------------------------------------------
def test_ood_scores_match_their_definitions():
    z = np.array([[1.0, 2.0, 3.0], [100.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(ood_score(z, "energy"), logsumexp(z, axis=1))
    np.testing.assert_allclose(ood_score(z, "energy", temperature=2.0), 2.0 * logsumexp(z / 2.0, axis=1))
    np.testing.assert_array_equal(ood_score(z, "max_logit"), [3.0, 100.0, 0.0])
    with pytest.raises(ValueError, match="unknown OOD score"):
        ood_score(z, "msp")


def test_energy_does_not_saturate_where_max_softmax_does():
    # both rows have max softmax ~1.0 in float64; energy still tells them apart
    z = np.array([[40.0, 0.0], [80.0, 0.0]])
    p = np.exp(z - logsumexp(z, axis=1, keepdims=True)).max(1)
    assert p[0] == p[1] == 1.0
    assert ood_score(z)[1] > ood_score(z)[0] + 39


def test_robust_z_and_query_prior():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    z = robust_z(x)
    assert z[2] == 0.0 and z[3] == pytest.approx(1 / 1.4826)
    np.testing.assert_array_equal(robust_z(np.ones(4)), 0.0)          # constant: no division by 0
    np.testing.assert_array_equal(robust_z(x, ref=np.array([1, 1, 0, 0, 0], bool))[:2], [-1 / 1.4826, 1 / 1.4826])
    np.testing.assert_array_equal(query_prior(np.array([2, 1, -1, 0]), np.array([2, 0, 0, 1])), [1, 0, -1, 0])
    np.testing.assert_array_equal(query_prior(None, np.array([2, 0])), [0, 0])


def test_relevance_formula(web_pool):
    zt, web_class, neighbors, split, _ = web_pool
    cand = split == "train"
    r = relevance(zt, "energy", candidates=cand, neighbors=neighbors, knn_weight=0.5, knn_k=5,
                  web_class=web_class, query_weight=2.0, clip=None)
    s = logsumexp(zt, axis=1)
    med = np.median(s[cand])
    mad = 1.4826 * np.median(np.abs(s[cand] - med))
    t1 = zt.argmax(1)
    a = (t1[neighbors[:, :5]] == t1[:, None]).mean(1)
    g = (web_class == t1).astype(float) - (web_class < 0)
    np.testing.assert_allclose(r.score, (s - med) / mad + 0.5 * (2 * a - 1) + 2.0 * g)
    np.testing.assert_allclose(r.knn_agree, a)
    clipped = relevance(zt, "energy", candidates=cand, clip=1.0)
    np.testing.assert_allclose(clipped.score, np.clip((s - med) / mad, -1.0, 1.0))
    assert (np.abs((s - med) / mad) > 1.0).any()                  # the clip really bites here
    half = relevance(zt, "energy", candidates=cand, web_class=web_class, query_weight=2.0, clip=None, ood_weight=0.5)
    np.testing.assert_allclose(half.score, 0.5 * (s - med) / mad + 2.0 * g)
    by_query = relevance(zt, candidates=cand, neighbors=neighbors, knn_weight=1.0, knn_k=5, web_class=web_class,
                         knn_source="query", clip=None)
    aq = (web_class[neighbors[:, :5]] == t1[:, None]).mean(1)     # neighbours' query class = own teacher top-1
    np.testing.assert_allclose(by_query.knn_agree, aq)
    np.testing.assert_allclose(by_query.score, (s - med) / mad + (2 * aq - 1))
    with pytest.raises(ValueError, match="knn_source"):
        relevance(zt, neighbors=neighbors, knn_weight=1.0, knn_source="pixels")
    plain = relevance(zt, "max_logit", candidates=cand)
    assert np.isnan(plain.knn_agree).all() and (plain.prior == 0).all()
    with pytest.raises(ValueError, match="neighbours"):
        relevance(zt, knn_weight=1.0)
    with pytest.raises(ValueError, match="web_class"):
        relevance(zt, query_weight=1.0)


def test_off_class_query_ranks_below_in_class_with_the_same_logits(web_pool):
    zt, web_class, _, _, _ = web_pool
    z = np.concatenate([zt, zt[:50]])                          # rows 450..499 copy rows 0..49
    wc = np.concatenate([zt.argmax(1), np.full(50, -1)])        # the copies: off-class queries
    on = relevance(z, web_class=wc, query_weight=0.5).score
    assert (on[-50:] < on[:50]).all()
    off = relevance(z, web_class=wc, query_weight=0.0).score
    np.testing.assert_array_equal(off[-50:], off[:50])           # prior off: the same score
    sel = pol.select(z, None, 0.0, _cfg("soft", relevance={"query_weight": 0.5}), web_class=wc)
    assert (sel.weight[-50:] < sel.weight[:50]).all() and (sel.weight[-50:] > 0).all()  # lower, not dropped


# --------------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------------
def test_class_budgets_formula():
    groups = np.concatenate([np.zeros(100), np.ones(20), np.full(3, 2)]).astype(int)
    el = np.ones(len(groups), bool)
    b = bud.class_budgets(groups, el, 4, BudgetConfig(keep=0.5, min_per_class=5, cap_median=None))
    np.testing.assert_array_equal(b, [50, 10, 3, 0])               # floor clipped at m_c, empty class 0
    b = bud.class_budgets(groups, el, 4, BudgetConfig(keep=0.5, min_per_class=5, cap_median=2.0))
    np.testing.assert_array_equal(b, [20, 10, 3, 0])               # median of (50, 10, 2) = 10 -> cap 20
    b = bud.class_budgets(groups, el, 4, BudgetConfig(keep=0.5, min_per_class=12, max_per_class=8, cap_median=None))
    np.testing.assert_array_equal(b, [12, 12, 3, 0])               # the floor wins over the cap
    assert bud.class_budgets(groups, el, 4, BudgetConfig(keep=0.3, min_per_class=1, cap_median=None))[0] == 30


def test_shared_budgets_equal_counts_water_filled():
    """class_power 0: the same total as keep x candidates, one count L for every class that has more
    than L, all of a class that has fewer (what it leaves goes to the others)."""
    groups = np.repeat(np.arange(5), [1000, 400, 100, 20, 0])
    el = np.ones(len(groups), bool)
    b = bud.class_budgets(groups, el, 5, BudgetConfig(keep=0.25, class_power=0.0))
    total = math.ceil(0.25 * len(groups))
    np.testing.assert_array_equal(b[2:], [100, 20, 0])             # the small classes keep all they have
    assert b[0] == b[1] and total <= b.sum() <= total + 5        # the large ones share the rest equally
    assert b[0] == math.ceil((total - 120) / 2)
    # class_power 1 is the proportional rule, unchanged; 0.5 lies between (monotone in m_c, same total)
    assert (bud.class_budgets(groups, el, 5, BudgetConfig(keep=0.25, class_power=1.0, cap_median=None))
            == [250, 100, 25, 10, 0]).all()              # (10: the default min_per_class)
    h = bud.class_budgets(groups, el, 5, BudgetConfig(keep=0.25, class_power=0.5))
    assert h[0] > h[1] > h[2] > h[3] and 250 > h[0] > b[0] and total <= h.sum() <= total + 5
    # ineligible rows do not count; an absolute cap leaves fewer than the total when it binds everywhere
    el2 = el & (groups != 0)
    assert bud.class_budgets(groups, el2, 5, BudgetConfig(keep=0.25, class_power=0.0))[0] == 0
    c = bud.class_budgets(groups, el, 5, BudgetConfig(keep=0.9, class_power=0.0, max_per_class=50))
    np.testing.assert_array_equal(c, [50, 50, 50, 20, 0])


@pytest.mark.parametrize("seed", range(10))
def test_shared_budgets_reach_the_total_and_keep_the_floor(seed):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(2, 12))
    groups = rng.integers(0, k, int(rng.integers(5, 3000))) ** int(rng.integers(1, 3)) % k  # skewed
    el = rng.random(len(groups)) < 0.9
    cfg = BudgetConfig(keep=float(rng.uniform(0.01, 1)), class_power=float(rng.choice([0.0, 0.3, 0.5])),
                       min_per_class=int(rng.integers(1, 20)))
    b = bud.class_budgets(groups, el, k, cfg)
    m = np.bincount(groups[el], minlength=k)
    assert (b <= m).all() and (b[m > 0] >= np.minimum(cfg.min_per_class, m[m > 0])).all()
    total = math.ceil(cfg.keep * m.sum() - 1e-9)
    assert total <= b.sum() <= total + k + k * cfg.min_per_class


@pytest.mark.parametrize("seed", range(20))
def test_budgets_never_empty_a_class_with_candidates(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 300)), int(rng.integers(2, 12))
    zt = rng.normal(0, rng.uniform(0.1, 5), (n, k)) + rng.uniform(0, 8) * np.eye(k)[rng.integers(0, max(1, k // 3), n)]
    split = np.where(rng.random(n) < 0.2, "val", "train")
    cfg = _cfg("balanced", budget={"keep": float(rng.uniform(0.01, 1)), "min_per_class": int(rng.integers(1, 20)),
                                   "max_per_class": int(rng.integers(1, 50)), "cap_median": float(rng.uniform(0.1, 3))})
    sel = pol.select(zt, None, 0.0, cfg, split=split)
    cand = split == "train"
    has = np.bincount(sel.pseudo_label[cand], minlength=k) > 0
    kept = sel.kept_per_class()
    assert (kept[has] >= 1).all() and (kept[~has] == 0).all()
    np.testing.assert_array_equal(kept, sel.class_budgets)
    assert not sel.keep[~cand].any()                              # validation rows never kept
    assert set(sel.reason[cand]) <= {"selected", BELOW_BUDGET}


def test_budget_keeps_the_most_relevant_of_each_class(web_pool):
    zt, web_class, _, split, n_in = web_pool
    cfg = _cfg("balanced", budget={"keep": 0.4, "min_per_class": 3}, relevance={"query_weight": 1.0})
    sel = pol.select(zt, None, 0.0, cfg, web_class=web_class, split=split)
    cand = split == "train"
    for c in range(zt.shape[1]):
        rows = cand & (sel.pseudo_label == c)
        if sel.keep[rows].any() and (~sel.keep & rows).any():
            assert sel.relevance[sel.keep & rows].min() >= sel.relevance[~sel.keep & rows].max()
    # the catch-all class 0 (every off-class image lands there) is held to the cap, not the pool
    assert sel.kept_per_class()[0] <= math.ceil(2.0 * np.median(np.ceil(0.4 * sel.class_counts)))
    off, on = cand & (web_class < 0), cand & (web_class >= 0)
    assert sel.keep[off].mean() < 0.5 * sel.keep[on].mean()
    assert np.isnan(sel.threshold).all() and sel.weight.tolist() == sel.keep.astype(np.float32).tolist()


def test_budgets_do_not_feed_back_on_the_kept_set(web_pool):
    zt, web_class, _, split, _ = web_pool
    cfg = _cfg("balanced")
    a = pol.select(zt, None, 0.0, cfg, split=split)
    b = pol.select(zt, None, 0.0, cfg, split=split, previous_keep=~a.keep)
    np.testing.assert_array_equal(a.keep, b.keep)
    # without refresh the student does not move the groups either; with refresh it does, alpha floored
    zs = np.roll(zt, 1, axis=1)
    np.testing.assert_array_equal(pol.select(zt, zs, 0.9, cfg, split=split).keep, a.keep)
    ref = pol.select(zt, zs, 0.9, _cfg("balanced", budget={"refresh": True, "refresh_alpha_min": 0.6}), split=split)
    assert ref.teacher_share == 0.6
    np.testing.assert_array_equal(ref.pseudo_label, (0.6 * zt + 0.4 * zs).argmax(1))
    np.testing.assert_allclose(ref.relevance, a.relevance)       # relevance stays the teacher's


def test_ties_go_to_the_lower_row_and_rank_is_per_class():
    score = np.array([1.0, 1.0, 2.0, 0.5, 0.5])
    groups = np.array([0, 0, 0, 1, 1])
    np.testing.assert_array_equal(bud.within_class_rank(score, groups, np.ones(5, bool)), [1, 2, 0, 0, 1])
    np.testing.assert_array_equal(bud.within_class_rank(score, groups, np.array([1, 1, 1, 0, 1], bool)),
                                  [1, 2, 0, -1, 0])


# --------------------------------------------------------------------------------------------
# soft weights
# --------------------------------------------------------------------------------------------
def test_percentile_rank_and_weights():
    score = np.array([3.0, 1.0, 2.0, 2.0, 5.0, np.nan])
    el = np.array([1, 1, 1, 1, 1, 0], bool)
    u = bud.percentile_rank(score, el)
    np.testing.assert_allclose(u[:5], [0.75, 0.0, 0.375, 0.375, 1.0])
    assert np.isnan(u[5])
    w = bud.soft_weights(u, SoftConfig(w_min=0.2, power=2.0))
    np.testing.assert_allclose(w, [0.2 + 0.8 * 0.5625, 0.2, 0.2 + 0.8 * 0.140625, 0.2 + 0.8 * 0.140625, 1.0, 0.0])
    np.testing.assert_array_equal(bud.percentile_rank(np.array([4.0, 7.0]), np.ones(2, bool), np.array([0, 1])), [1, 1])


@pytest.mark.parametrize("per_class", [False, True])
def test_soft_weights_are_monotone_in_relevance(web_pool, per_class):
    zt, web_class, neighbors, split, _ = web_pool
    cfg = _cfg("soft", soft={"w_min": 0.2, "power": 1.5, "per_class": per_class},
               relevance={"query_weight": 1.0, "knn_weight": 1.0}, knn={"k": 5})
    sel = pol.select(zt, None, 0.0, cfg, web_class=web_class, neighbors=neighbors, split=split)
    cand = split == "train"
    groups = [sel.pseudo_label == c for c in range(zt.shape[1])] if per_class else [np.ones(len(zt), bool)]
    for g in groups:
        r, w = sel.relevance[cand & g], sel.weight[cand & g]
        o = np.argsort(r, kind="stable")
        assert (np.diff(w[o]) >= 0).all()
        assert w.min() == pytest.approx(0.2) and w.max() == pytest.approx(1.0)
    assert (sel.weight[~cand] == 0).all() and not sel.keep[~cand].any()
    assert set(sel.reason[cand]) == {"selected", LOW_RELEVANCE}
    assert (sel.weight[cand] > 0).all()                            # soft: every candidate trains
    np.testing.assert_array_equal(sel.keep, pol.select(zt, None, 0.0, cfg.model_copy(update={"mode": "balanced"}),
                                                      web_class=web_class, neighbors=neighbors, split=split).keep)
    assert not np.isnan(sel.knn_agree[cand]).all()                 # the k-NN term reaches the ledger


def test_budget_modes_independent_of_row_order(web_pool):
    zt, web_class, neighbors, split, _ = web_pool
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(zt))
    inv = np.argsort(perm)
    for mode in ("balanced", "soft"):
        cfg = _cfg(mode, relevance={"query_weight": 1.0, "knn_weight": 0.5})
        a = pol.select(zt, None, 0.0, cfg, web_class=web_class, neighbors=neighbors, split=split)
        b = pol.select(zt[perm], None, 0.0, cfg, web_class=web_class[perm], neighbors=inv[neighbors[perm]],
                       split=split[perm])
        for name in ("keep", "weight", "reason", "relevance", "pseudo_label"):
            np.testing.assert_array_equal(getattr(a, name)[perm], getattr(b, name), err_msg=f"{mode} {name}")


# --------------------------------------------------------------------------------------------
# reason codes, ledger, loop
# --------------------------------------------------------------------------------------------
def test_new_reasons_are_registered_everywhere():
    for r in (BELOW_BUDGET, LOW_RELEVANCE):
        assert r in LEDGER_REASONS and r in REJECT_REASONS and r in REASONS
    tags = [t for t, _ in REASONS.values()]
    assert len(tags) == len(set(tags))


def test_ledger_accepts_budget_selections(web_pool):
    zt, web_class, _, split, _ = web_pool
    sel = pol.select(zt, None, 0.0, _cfg("soft"), split=split)
    t = pol.ledger_table(sel, [str(i) for i in range(len(zt))], np.arange(len(zt)), 0, split, None, web_class)
    assert t.schema.equals(pol.LEDGER_SCHEMA)
    assert set(t["reason"].to_pylist()) == {"selected", LOW_RELEVANCE, "validation"}


def test_loop_trains_low_relevance_rows_at_their_weight(web_pool):
    import torch

    from webkd.training.loop import reselect
    from webkd.training.pool import Pool

    zt, web_class, _, split, _ = web_pool
    n = len(zt)
    ids = [f"{i:04d}" for i in range(n)]
    pool = Pool(pixels=np.zeros((n, 4, 4, 3), np.uint8), ids=ids, split=split, status=np.full(n, "ok", dtype=object),
                labels=web_class, web_labels=[None] * n, web_class=web_class, val_labels=np.full(n, -1),
                teacher_logits=zt.astype(np.float32))
    cpu = torch.device("cpu")
    sel, train = reselect(0, 0.1, pool, None, None, [], _cfg("soft"), cpu, None, None, 64)
    np.testing.assert_array_equal(train, split == "train")
    assert (sel.weight[train] > 0).all() and (sel.weight[train] < 1).any()
    low = np.flatnonzero(sel.reason == LOW_RELEVANCE)
    forced = {ids[low[0]]: "accept", ids[low[1]]: "reject"}
    sel2, train2 = reselect(0, 0.1, pool, None, None, [], _cfg("soft"), cpu, None, forced, 64)
    assert sel2.weight[low[0]] == 1.0 and sel2.weight[low[1]] == 0.0 and not train2[low[1]]
    other = low[2:]
    np.testing.assert_array_equal(sel2.weight[other], sel.weight[other])  # overrides leave the rest alone
    # balanced + reject_weight: below_budget rows train at the constant weight
    selb, trainb = reselect(0, 0.1, pool, None, None, [], _cfg("balanced", reject_weight=0.25), cpu, None, None, 64)
    assert (selb.weight[selb.reason == BELOW_BUDGET] == np.float32(0.25)).all()
    np.testing.assert_array_equal(trainb, split == "train")


def test_pool_loads_neighbours_for_the_knn_relevance_term(monkeypatch):
    from webkd.flows.stages import curate
    from webkd.pipeline.config import load_config

    seen = []
    monkeypatch.setattr(curate, "build_pool", lambda paths, data, keys, source, search: seen.append(search))
    cfg_path = ROOT / "flows" / "configs" / "fashion_web.yaml"
    for over, wants in ((["selection.mode=soft", "selection.relevance.knn_weight=1.0"], True),
                        (["selection.mode=soft"], False),
                        (["selection.mode=kd3", "selection.relevance.knn_weight=1.0"], False)):
        cfg = load_config(cfg_path, over)
        curate.pool(cfg)
        assert (seen[-1] is not None) == wants, over
        if wants:
            assert seen[-1].k == cfg.selection.knn.k


def test_kd3_ignores_the_new_sections_and_budget_modes_fall_back(web_pool):
    zt, web_class, neighbors, split, _ = web_pool
    base = pol.select(zt, np.roll(zt, 1, 1), 0.3, SelectionConfig(), web_class=web_class, split=split)
    extra = SelectionConfig.model_validate({"relevance": {"query_weight": 3.0, "knn_weight": 2.0},
                                            "budget": {"keep": 0.1, "refresh": True}, "soft": {"w_min": 0.5}})
    other = pol.select(zt, np.roll(zt, 1, 1), 0.3, extra, web_class=web_class, neighbors=neighbors, split=split)
    for name in ("keep", "weight", "reason", "threshold", "pseudo_label"):
        np.testing.assert_array_equal(getattr(base, name), getattr(other, name), err_msg=name)
    assert base.class_budgets is None and base.relevance is None
    # every query off-class and query_top2 on: nothing eligible, the usual fallback to every candidate
    for mode in ("balanced", "soft"):
        sel = pol.select(zt, None, 0.0, _cfg(mode, query_top2=True), web_class=np.full(len(zt), -1), split=split)
        cand = split == "train"
        np.testing.assert_array_equal(sel.keep, cand)
        assert set(sel.reason[cand]) == {"fallback"} and (sel.weight[cand] == 1).all()


def test_teacher_student_kl_matches_its_definition():
    from webkd.selection.scores import teacher_student_kl

    rng = np.random.default_rng(3)
    zt, zs = rng.normal(0, 3, (50, 7)), rng.normal(0, 3, (50, 7))
    pt = np.exp(zt - logsumexp(zt, 1, True))
    ps = np.exp(zs - logsumexp(zs, 1, True))
    ref = (pt * (np.log(pt) - np.log(ps))).sum(1)
    np.testing.assert_allclose(teacher_student_kl(zt, zs), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(teacher_student_kl(zt, zt + 5.0), 0.0, atol=1e-12)  # shift-invariant, KL(p||p) = 0
    assert (teacher_student_kl(zt * 100, zs * 100) >= 0).all()                      # stable with huge logits


def test_discrepancy_term_keeps_the_rows_the_student_has_not_matched():
    """R = discrepancy_weight * clip(robust z of KL(p_T||p_S)): with the OOD term off, each pseudo-class
    keeps its rows where the student is furthest from the teacher; no student (epoch 0 of another
    mode) leaves R unchanged."""
    rng = np.random.default_rng(0)
    k, n = 4, 400
    y = rng.integers(0, k, n)
    zt = rng.normal(0, 1, (n, k)) + 5.0 * np.eye(k)[y]
    zs = zt.copy()
    far = rng.random(n) < 0.3
    zs[far] = rng.normal(0, 1, (far.sum(), k))            # the student has not matched these rows
    cfg = _cfg("balanced", budget={"keep": 0.3, "cap_median": None},
               relevance={"ood_weight": 0.0, "discrepancy_weight": 1.0, "clip": None})
    sel = pol.select(zt, zs, 0.5, cfg)
    assert sel.keep[far].mean() > 0.8 and sel.keep[~far].mean() < 0.1
    np.testing.assert_array_equal(sel.pseudo_label, zt.argmax(1))   # groups stay the teacher's top-1
    # per class the kept rows are the highest KL ones
    from webkd.selection.scores import teacher_student_kl

    d = teacher_student_kl(zt, zs)
    for c in range(k):
        rows = np.flatnonzero(sel.pseudo_label == c)
        kept, dropped = rows[sel.keep[rows]], rows[~sel.keep[rows]]
        assert d[kept].min() >= d[dropped].max()
    base = pol.select(zt, None, 0.5, cfg)
    np.testing.assert_array_equal(base.relevance, np.zeros(n))


def test_loop_scores_the_pool_with_the_student_when_the_discrepancy_term_is_on(web_pool):
    import torch

    from webkd.training.loop import reselect
    from webkd.training.pool import Pool

    zt, web_class, _, split, _ = web_pool
    n, k = zt.shape
    pool = Pool(pixels=np.random.default_rng(0).integers(0, 255, (n, 4, 4, 3), dtype=np.uint8),
                ids=[f"{i:04d}" for i in range(n)], split=split, status=np.full(n, "ok", dtype=object),
                labels=web_class, web_labels=[None] * n, web_class=web_class, val_labels=np.full(n, -1),
                teacher_logits=zt.astype(np.float32))

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(48, k)

    class Method(torch.nn.Module):
        calls = 0

        def predict(self, student, teachers, x):
            Method.calls += 1
            return student.lin(x.flatten(1))

    student, method = Student(), Method()
    cfg = _cfg("balanced", budget={"keep": 0.5}, relevance={"ood_weight": 0.0, "discrepancy_weight": 1.0})
    cpu = torch.device("cpu")
    sel, train = reselect(0, 0.1, pool, method, student, [], cfg, cpu, None, None, 64)
    assert Method.calls > 0                                   # scored at epoch 0 too (a fresh student)
    assert np.isfinite(sel.relevance).all() and np.unique(sel.relevance).size > 10
    assert train.sum() < (split == "train").sum()
