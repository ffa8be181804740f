"""selection/counts.py on synthetic ledgers: a class that loses its kept images (the one
collapse rule, the training loop's warning), in-class vs off-class query shares."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from webkd.pipeline.paths import RunPaths
from webkd.selection.counts import Collapse, collapsed_classes, count_run
from webkd.selection.policy import LEDGER_SCHEMA, write_ledger
from webkd.training.loop import warn_collapsed

# kept train rows per pseudo-label at epochs 0, 1, 2 (each class has 40 train rows)
KEPT = {0: [20, 20, 20],      # steady
        1: [12, 0, 0],        # to zero at epoch 1: collapsed
        2: [3, 0, 0],         # tiny from the start: never flagged
        3: [40, 30, 1]}       # 1 < 5% of 40 at epoch 2: collapsed
PER_CLASS = 40


def _ledger(epoch: int) -> pa.Table:
    pl, kept, wl, wc = [], [], [], []
    for c, counts in KEPT.items():
        pl += [c] * PER_CLASS
        kept += [True] * counts[epoch] + [False] * (PER_CLASS - counts[epoch])
        off = c == 3                                      # class 3's rows come from an off-class query
        wl += ["hat" if off else f"q{c}"] * PER_CLASS
        wc += [-1 if off else c] * PER_CLASS
    n = len(pl)
    pl += [0, 0]                                          # two validation rows, never counted
    kept += [False, False]
    wl += ["q0", "q0"]
    wc += [0, 0]
    kept_a = np.array(kept)
    cols = {"id": [f"i{k}" for k in range(n + 2)], "row": np.arange(n + 2), "epoch": np.full(n + 2, epoch),
            "split": ["train"] * n + ["val", "val"], "kept": kept_a, "weight": kept_a.astype(np.float32),
            "reason": np.where(kept_a, "selected", "below_class_threshold").tolist()[:n] + ["validation"] * 2,
            "pseudo_label": pl, "confidence": np.full(n + 2, 0.5), "threshold": np.full(n + 2, 0.4),
            "teacher_share": np.ones(n + 2), "teacher_top1": pl, "teacher_top2": pl,
            "teacher_p1": np.full(n + 2, 0.5), "teacher_p2": np.full(n + 2, 0.1),
            "student_pred": np.full(n + 2, -1), "student_conf": np.full(n + 2, np.nan), "web_label": wl,
            "web_class": wc, "knn_agree": np.full(n + 2, np.nan)}
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in LEDGER_SCHEMA}, schema=LEDGER_SCHEMA)


def test_collapsed_classes_rule():
    start, now = [20, 12, 3, 40], [20, 0, 0, 1]
    assert collapsed_classes(start, now).tolist() == [1, 3]
    assert collapsed_classes([10], [0]).tolist() == [0] and collapsed_classes([9], [0]).tolist() == []
    assert collapsed_classes([100], [5]).tolist() == [] and collapsed_classes([100], [4]).tolist() == [0]
    assert collapsed_classes([12, 12], [12]).tolist() == [1]       # a class absent now kept nothing


def test_count_run_lists_collapses_and_query_shares(tmp_path):
    paths = RunPaths(tmp_path / "run")
    for e in range(3):
        write_ledger(paths.ledger(e), _ledger(e))
    c = count_run(paths)
    assert c.collapsed == [Collapse(1, 1, 12, 0, 0), Collapse(3, 2, 40, 1, 1)]
    assert count_run(paths, last_epoch=1).collapsed == [Collapse(1, 1, 12, 0, 0)]
    assert count_run(paths, last_epoch=0).collapsed == []
    # newest decisions (epoch 2): in-class queries q0..q2 keep 20 of 120, off-class "hat" 1 of 40
    assert (c.in_class.images, c.in_class.kept, c.off_class.images, c.off_class.kept) == (120, 20, 40, 1)
    assert c.in_class.share == 20 / 120 and c.off_class.mean_weight == 1 / 40
    assert c.kept + c.rejected == 160 and c.validation == 2


def test_loop_warns_once_per_collapsed_class(caplog):
    split = np.array(["train"] * 60 + ["val"] * 5, dtype=object)
    pl = np.repeat([0, 1, 2], [30, 20, 15])
    keep = np.zeros(65, bool)
    keep[:30] = True                                      # class 0 kept, class 1 lost all, class 2 (val) -
    sel = SimpleNamespace(pseudo_label=pl, keep=keep, class_thresholds=np.zeros(3))
    with caplog.at_level(logging.WARNING, logger="webkd.training.loop"):
        assert warn_collapsed(3, sel, split, np.array([30, 20, 2]), ["dress", "pants", "shoes"]) == [1]
        assert warn_collapsed(0, sel, split, np.array([30, 20, 2])) == []
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 3: class pants lost (nearly) all its kept images: 20 kept at epoch 0, 0 now"]
