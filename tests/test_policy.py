"""selection/policy.py: KD^3 per-class thresholds and dynamic selection (methods.md §1.6 items
2-3), every reason code, the empty-selection fallback, and the decision ledger schema."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

from webkd.pipeline.config import KnnConfig, SelectionConfig
from webkd.pipeline.records import KEEP_REASONS
from webkd.selection import policy as pol
from webkd.selection.scores import prediction

# The ledger table of ARCHITECTURE.md, written out independently of LEDGER_SCHEMA.
DOCUMENTED_LEDGER = [
    ("id", "string"), ("row", "int64"), ("epoch", "int32"), ("split", "string"), ("kept", "bool"),
    ("weight", "float"), ("reason", "string"), ("pseudo_label", "int32"), ("confidence", "float"),
    ("threshold", "float"), ("teacher_share", "float"), ("teacher_top1", "int32"), ("teacher_top2", "int32"),
    ("teacher_p1", "float"), ("teacher_p2", "float"), ("student_pred", "int32"), ("student_conf", "float"),
    ("web_label", "string"), ("web_class", "int32"), ("knn_agree", "float"),
]


@pytest.fixture(scope="module")
def real_logits(pacs32):
    """Teacher and student logits of real PACS images (7 classes, all four domains) from two
    nearest-class-mean classifiers on different pixel features: (teacher, student, labels)."""
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(pacs32.images))
    fit, pool = idx[:2000], idx[2000:2600]

    def feats(images: np.ndarray, grey: bool) -> np.ndarray:
        x = images.reshape(len(images), 8, 4, 8, 4, 3).mean(axis=(2, 4)).astype(np.float64)  # (N, 8, 8, 3)
        x = x.mean(axis=-1) if grey else x
        x = x.reshape(len(x), -1)
        x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    out = []
    for grey, scale in ((False, 20.0), (True, 12.0)):
        f = feats(pacs32.images[fit], grey)
        means = np.stack([f[pacs32.labels[fit] == k].mean(0) for k in range(7)])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        out.append(scale * feats(pacs32.images[pool], grey) @ means.T)  # (600, 7)
    return out[0], out[1], pacs32.labels[pool]


# --------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------
def test_class_thresholds_golden():
    tau = pol.class_thresholds(np.array([0, 0, 0, 0, 1, 1, 2]), 4)
    np.testing.assert_allclose(tau, [0.95, 0.31667, 0.13571, 0.0], atol=5e-6)
    assert tau[0] == 0.95                       # the most-predicted class gets p_cut
    assert tau[3] == 0.0                        # a class never predicted gets 0
    np.testing.assert_allclose(pol.class_thresholds(np.array([0, 0, 1]), 2, p_cut=0.8), [0.8, 0.8 / 3])
    np.testing.assert_allclose(pol.class_thresholds(np.array([0, 0, 0, 0, 1]), 3, tau_min=0.3), [0.95, 0.3, 0.3])
    np.testing.assert_array_equal(pol.class_thresholds(np.array([], dtype=int), 3), [0, 0, 0])


def test_confidence_equal_to_threshold_is_rejected():
    # 5 identical rows predict class 0 with confidence c; p_cut = c makes tau_0 = c exactly
    zt = np.array([[2.0, 0.5, 0.0]] * 5 + [[0.0, 9.0, 0.0]])
    _, conf = prediction(zt)
    c = float(conf[0])
    sel = pol.select(zt, None, 0.0, SelectionConfig(p_cut=c))
    assert sel.threshold[0] == sel.confidence[0] == c
    assert not sel.keep[:5].any() and (sel.reason[:5] == "below_class_threshold").all()
    assert sel.keep[5] and sel.reason[5] == "selected"          # tau_1 = c * 0.2 / 1.8
    just_below = pol.select(zt, None, 0.0, SelectionConfig(p_cut=float(np.nextafter(c, 0))))
    assert just_below.keep.all()


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
def test_selection_on_real_logits_follows_the_rule(real_logits):
    zt, zs, _ = real_logits
    sel = pol.select(zt, zs, 0.2, SelectionConfig())
    alpha = 1 - np.exp(-5 * (1.5 * 0.2 - 1) ** 2)
    assert sel.teacher_share == pytest.approx(alpha)
    pred, conf = prediction(alpha * zt + (1 - alpha) * zs)
    np.testing.assert_array_equal(sel.pseudo_label, pred)
    tau = pol.class_thresholds(pred, 7)
    np.testing.assert_array_equal(sel.keep, conf > tau[pred])
    assert 0 < sel.keep.sum() < len(sel)                         # a real pool: some in, some out
    np.testing.assert_array_equal(sel.weight, sel.keep.astype(np.float32))
    assert sel.weight.dtype == np.float32
    np.testing.assert_array_equal(sel.reason == "selected", sel.keep)
    np.testing.assert_array_equal(sel.student_pred, zs.argmax(1))


def test_selection_independent_of_row_order(real_logits):
    zt, zs, labels = real_logits
    n = len(zt)
    rng = np.random.default_rng(1)
    web_class = np.where(rng.random(n) < 0.2, -1, labels)
    neighbors = np.argsort(-(zt @ zt.T), axis=1)[:, :6]           # real neighbours in logit space
    split = np.where(rng.random(n) < 0.1, "val", "train")
    status = np.where(rng.random(n) < 0.05, "near_duplicate", "ok")
    cfg = SelectionConfig(query_top2=True, knn=KnnConfig(enabled=True, k=5, min_agree=0.6))
    a = pol.select(zt, zs, 0.1, cfg, web_class=web_class, neighbors=neighbors, split=split, status=status)

    perm = rng.permutation(n)
    inv = np.argsort(perm)
    b = pol.select(zt[perm], zs[perm], 0.1, cfg, web_class=web_class[perm], neighbors=inv[neighbors[perm]],
                   split=split[perm], status=status[perm])
    for name in ("keep", "weight", "reason", "pseudo_label", "confidence", "threshold", "knn_agree",
                 "teacher_top1", "teacher_top2", "student_pred"):
        np.testing.assert_array_equal(getattr(a, name)[perm], getattr(b, name), err_msg=name)
    assert len(set(a.reason)) >= 5   # the case really exercises several rules


def test_kept_set_within_pool_and_rejected_can_return():
    # row 0: the teacher is unsure, the student sure; rows 1-6: both sure of classes 0/1
    zt = np.array([[0.3, 0.0, 0.0]] + [[6.0, 0.0, 0.0]] * 3 + [[0.0, 6.0, 0.0]] * 3)
    zs = np.array([[8.0, 0.0, 0.0]] + [[6.0, 0.0, 0.0]] * 3 + [[0.0, 6.0, 0.0]] * 3)
    split = np.array(["train"] * 6 + ["val"])
    early = pol.select(zt, zs, 0.05, SelectionConfig(), split=split)   # alpha ~ 0.99: teacher decides
    late = pol.select(zt, zs, 0.6, SelectionConfig(), split=split, previous_keep=early.keep)  # alpha 0
    assert early.teacher_share > 0.98 and late.teacher_share == 0.0
    assert not early.keep[0] and early.reason[0] == "below_class_threshold"
    assert late.keep[0] and late.reason[0] == "selected"               # rejected at e, back at e+1
    for sel in (early, late):
        assert not sel.keep[6] and sel.reason[6] == "validation"       # kept set within the pool


def test_rows_outside_the_pool_do_not_move_thresholds():
    zt = np.array([[5.0, 0.0]] * 2 + [[0.0, 5.0]] + [[0.0, 5.0]] * 4)
    split = ["train"] * 3 + ["val"] * 2 + ["train"] * 2
    status = ["ok"] * 5 + ["near_duplicate"] * 2
    sel = pol.select(zt, None, 0.0, SelectionConfig(), split=split, status=status)
    np.testing.assert_array_equal(sel.class_counts, [2, 1])              # n_k over the 3 candidates
    np.testing.assert_allclose(sel.class_thresholds, [0.95, 0.95 * 0.5 / 1.5])
    np.testing.assert_array_equal(sel.keep, [True] * 3 + [False] * 4)


def test_reason_codes():
    # rows: 0 selected, 1 below_class_threshold, 2 low_confidence, 3 off_class (query -1),
    # 4 off_class (query outside top-2), 5 knn_disagree, 6 validation, 7 near_duplicate
    zt = np.array([
        [9.0, 0.0, 0.0, 0.0], [1.0, 0.2, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1], [0.0, 9.0, 0.0, 0.0],
        [0.0, 9.0, 2.0, 0.0], [9.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0],
    ])
    web_class = np.array([0, 0, 0, -1, 3, 0, 0, 0])
    neighbors = np.array([[5, 6], [0, 5], [0, 1], [4, 0], [3, 0], [3, 4], [0, 5], [0, 5]])
    cfg = SelectionConfig(tau_min=0.4, query_top2=True, knn=KnnConfig(enabled=True, k=2, min_agree=0.5))
    split = ["train"] * 6 + ["val", "train"]
    status = ["ok"] * 7 + ["near_duplicate"]
    sel = pol.select(zt, None, 0.0, cfg, web_class=web_class, neighbors=neighbors, split=split, status=status)
    assert list(sel.reason) == ["selected", "below_class_threshold", "low_confidence", "off_class", "off_class",
                                "knn_disagree", "validation", "near_duplicate"]
    np.testing.assert_array_equal(sel.keep, [True] + [False] * 7)
    assert np.isnan(pol.select(zt, None, 0.0, SelectionConfig()).knn_agree).all()  # NaN when off
    assert sel.knn_agree[5] == 0.0 and sel.knn_agree[0] == 1.0
    # low_confidence takes precedence over below_class_threshold (row 2 fails both)
    assert sel.confidence[2] <= sel.threshold[2] and sel.confidence[2] <= 0.4


def test_modes_and_teacher_alone():
    rng = np.random.default_rng(2)
    zt, zs = 3 * rng.standard_normal((50, 5)), 3 * rng.standard_normal((50, 5))
    before = pol.select(zt, None, 0.7, SelectionConfig())
    assert before.teacher_share == 1.0 and (before.student_pred == -1).all() and np.isnan(before.student_conf).all()
    np.testing.assert_array_equal(before.keep, pol.select(zt, zs, 0.7, SelectionConfig(mode="teacher")).keep)
    assert pol.select(zt, zs, 0.7, SelectionConfig(mode="teacher")).teacher_share == 1.0
    kd3 = pol.select(zt, zs, 0.7, SelectionConfig())
    np.testing.assert_array_equal(kd3.pseudo_label, zs.argmax(1))       # alpha 0: the student alone
    none = pol.select(zt, zs, 0.7, SelectionConfig(mode="none"), split=["val"] + ["train"] * 49)
    assert none.keep[1:].all() and not none.keep[0] and set(none.reason[1:]) == {"no_selection"}
    assert none.reason[0] == "validation" and "no_selection" in KEEP_REASONS


def test_empty_selection_falls_back():
    # balanced, unsure pool: every tau is 0.95 and nothing passes
    zt = np.array([[0.5, 0.0], [0.0, 0.5]] * 4)
    cfg = SelectionConfig(fallback="previous")
    first = pol.select(zt, None, 0.0, cfg)                                 # no previous: everything
    assert first.keep.all() and set(first.reason) == {"fallback"}
    prev = np.array([True, False] * 4)
    again = pol.select(zt, None, 0.0, cfg, previous_keep=prev)
    np.testing.assert_array_equal(again.keep, prev)
    assert set(again.reason[prev]) == {"fallback"} and set(again.reason[~prev]) == {"below_class_threshold"}
    every = pol.select(zt, None, 0.0, SelectionConfig(fallback="all"), previous_keep=prev)
    assert every.keep.all()
    # the fallback never brings back rows outside the pool
    split = np.array(["val", "train"] * 4)
    fb = pol.select(zt, None, 0.0, cfg, previous_keep=np.ones(8, bool), split=split)
    np.testing.assert_array_equal(fb.keep, split == "train")


def test_bad_input_fails_clearly():
    zt = np.zeros((3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        pol.select(np.array([[np.nan, 0.0]]), None, 0.0, SelectionConfig())
    with pytest.raises(ValueError, match="neighbours"):
        pol.select(zt, None, 0.0, SelectionConfig(knn=KnnConfig(enabled=True)))
    with pytest.raises(ValueError, match="web_class"):
        pol.select(zt, None, 0.0, SelectionConfig(query_top2=True))
    with pytest.raises(ValueError, match="split"):
        pol.select(zt, None, 0.0, SelectionConfig(), split=["train", "test", "train"])
    with pytest.raises(ValueError, match="rows"):
        pol.select(zt, None, 0.0, SelectionConfig(), web_class=[0, 1])
    with pytest.raises(ValueError, match="shape"):
        pol.select(zt, np.zeros((3, 3)), 0.0, SelectionConfig())


def test_thresholds_and_kept_counts_are_logged(real_logits, caplog):
    zt, zs, _ = real_logits
    with caplog.at_level(logging.INFO, logger="webkd.selection.policy"):
        sel = pol.select(zt, zs, 0.3, SelectionConfig())
    text = caplog.text
    kept = sel.kept_per_class()
    for k in range(7):
        assert f"{k}: {sel.class_counts[k]}, {sel.class_thresholds[k]:.4f}, {kept[k]}" in text


# --------------------------------------------------------------------------------------------
# ledger
# --------------------------------------------------------------------------------------------
def _ledger(real_logits, epoch=1):
    zt, zs, labels = real_logits
    n = len(zt)
    split = np.where(np.arange(n) % 10 == 0, "val", "train")
    web_class = np.where(np.arange(n) % 7 == 0, -1, labels)
    sel = pol.select(zt, zs if epoch else None, 0.1, SelectionConfig(), split=split)
    ids = [f"{i:064x}" for i in range(n)]
    web_labels = [None if i % 13 == 0 else f"query {c}" for i, c in enumerate(labels)]
    return sel, pol.ledger_table(sel, ids, np.arange(n), epoch, split, web_labels, web_class)


def test_ledger_schema_is_the_documented_one(real_logits, tmp_path):
    sel, table = _ledger(real_logits)
    assert [(f.name, str(f.type)) for f in table.schema] == DOCUMENTED_LEDGER
    assert table.num_rows == len(sel)
    path = pol.write_ledger(tmp_path / "selection" / "epoch_001.parquet", table)
    back = pol.read_ledger(path)
    assert [(f.name, str(f.type)) for f in back.schema] == DOCUMENTED_LEDGER
    for name in table.column_names:  # (Table.equals treats NaN != NaN)
        a, b = back.column(name).to_pylist(), table.column(name).to_pylist()
        if pa.types.is_floating(table.schema.field(name).type):
            np.testing.assert_array_equal(np.array(a, dtype=float), np.array(b, dtype=float), err_msg=name)
        else:
            assert a == b, name
    d = back.to_pydict()
    assert set(d["reason"]) >= {"selected", "below_class_threshold", "validation"}
    assert all(not k for k, s in zip(d["kept"], d["split"]) if s == "val")
    assert d["web_label"][0] is None and d["web_class"][0] == -1
    assert all(np.isnan(d["knn_agree"]))
    zero, t0 = _ledger(real_logits, epoch=0)
    assert set(t0.column("student_pred").to_pylist()) == {-1}
    assert all(np.isnan(t0.column("student_conf").to_numpy()))
    assert set(t0.column("teacher_share").to_pylist()) == {1.0}


def test_read_ledgers_sorted_by_epoch(real_logits, tmp_path):
    for e in (10, 2, 0):
        pol.write_ledger(tmp_path / f"epoch_{e:03d}.parquet", _ledger(real_logits, epoch=e)[1])
    (tmp_path / "notes.parquet").write_text("not a ledger")
    got = pol.read_ledgers(tmp_path)
    assert [e for e, _ in got] == [0, 2, 10]
    assert [set(t.column("epoch").to_pylist()) for _, t in got] == [{0}, {2}, {10}]
    assert pol.read_ledgers(tmp_path / "missing") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp files left


def test_ledger_refuses_inconsistent_input(real_logits, tmp_path):
    zt, zs, _ = real_logits
    sel = pol.select(zt, zs, 0.1, SelectionConfig())             # split not passed to select
    split = ["val"] + ["train"] * (len(zt) - 1)
    with pytest.raises(ValueError, match="validation"):
        pol.ledger_table(sel, [str(i) for i in range(len(zt))], np.arange(len(zt)), 1, split)
    with pytest.raises(ValueError, match="ids"):
        pol.ledger_table(sel, ["a"], np.arange(len(zt)), 1)
    bad = pa.table({"id": ["a"]})
    with pytest.raises(ValueError, match="schema"):
        pol.write_ledger(tmp_path / "epoch_001.parquet", bad)


# --------------------------------------------------------------------------------------------
# mode random (a baseline: a fixed seeded subset of the candidates)
# --------------------------------------------------------------------------------------------
def test_random_mode_keeps_a_seeded_share_of_the_candidates(real_logits):
    zt, zs, _ = real_logits
    n = len(zt)
    split = np.where(np.arange(n) % 10 == 0, "val", "train")
    status = np.where(np.arange(n) % 17 == 1, "near_duplicate", "ok")
    cfg = SelectionConfig(mode="random", random_keep=0.3, random_seed=5)
    sel = pol.select(zt, None, 0.0, cfg, split=split, status=status)
    cand = (split == "train") & (status == "ok")
    assert sel.keep.sum() == round(0.3 * cand.sum()) and not (sel.keep & ~cand).any()
    assert set(sel.reason[cand & ~sel.keep]) == {"not_sampled"} and set(sel.reason[sel.keep]) == {"selected"}
    assert set(sel.reason[split == "val"]) == {"validation"}
    # the same subset at every epoch and whatever the student says; another seed draws another one
    later = pol.select(zt, zs, 0.9, cfg, split=split, status=status)
    np.testing.assert_array_equal(later.keep, sel.keep)
    other = pol.select(zt, None, 0.0, cfg.model_copy(update={"random_seed": 6}), split=split, status=status)
    assert other.keep.sum() == sel.keep.sum() and (other.keep != sel.keep).any()
    table = pol.ledger_table(sel, [f"id{i}" for i in range(n)], np.arange(n), 0, split)
    assert table.num_rows == n
    full = pol.select(zt, None, 0.0, SelectionConfig(mode="random", random_keep=1.0), split=split, status=status)
    np.testing.assert_array_equal(full.keep, cand)


def test_random_subset_golden():
    cand = np.array([True, False, True, True, True, False, True, True])
    a = pol.random_subset(cand, 0.5, 0)
    assert a.sum() == 3 and not (a & ~cand).any()                 # round(0.5 * 6) = 3
    np.testing.assert_array_equal(a, pol.random_subset(cand, 0.5, 0))
    assert pol.random_subset(cand, 0.01, 0).sum() == 0             # rounds to none: select() falls back


def test_mode_none_ledger_says_no_selection(tmp_path):
    """selection.mode=none decides nothing: the ledger's keep reason is `no_selection`, not
    `selected`, and the review data still reads it (and an old `selected` ledger) as kept."""
    from webkd.selection.run_data import REASONS

    rng = np.random.default_rng(3)
    zt = 3 * rng.standard_normal((6, 3))
    split = ["train"] * 5 + ["val"]
    sel = pol.select(zt, None, 0.0, SelectionConfig(mode="none"), split=split)
    table = pol.ledger_table(sel, [f"i{k}" for k in range(6)], np.arange(6), 0, split)
    path = pol.write_ledger(tmp_path / "epoch_000.parquet", table)
    d = pol.read_ledger(path).to_pydict()
    assert d["reason"] == ["no_selection"] * 5 + ["validation"] and d["kept"] == [True] * 5 + [False]
    assert "no_selection" in REASONS and "selected" in REASONS
