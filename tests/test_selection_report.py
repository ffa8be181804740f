"""bench/selection_report.py on a synthetic run directory: real ledgers written by
selection.policy (the paper's rule and the balanced mode) and a config naming the classes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from webkd.pipeline.config import SelectionConfig
from webkd.pipeline.paths import RunPaths
from webkd.selection import policy as pol

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("bench_selection_report", ROOT / "bench" / "selection_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_dir(root: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """Epoch 0: KD^3 (teacher alone); epoch 1: mode soft. Rows 0-59 in-class queries, 60-89
    off-class (the teacher calls them class 2 with p ~1), 90-99 validation."""
    rng = np.random.default_rng(0)
    n = 100
    y = np.arange(n) % 3
    zt = rng.normal(0, 0.3, (n, 3)) + 4.0 * np.eye(3)[y]
    zt[60:90] = np.array([0.0, 0.0, 9.0]) + rng.normal(0, 0.1, (30, 3))
    web_class = np.where(np.arange(n) < 60, y, -1)
    split = np.where(np.arange(n) >= 90, "val", "train")
    ids = [f"{i:03d}" for i in range(n)]
    paths = RunPaths(root)
    paths.selection_dir.mkdir(parents=True)
    paths.config.write_text(yaml.safe_dump({"data": {"classes": ["tee", "coat", "bag"]}}))
    cfgs = [SelectionConfig(), SelectionConfig.model_validate({"mode": "soft", "relevance": {"query_weight": 2.0},
                                                               "budget": {"keep": 0.5, "min_per_class": 2}})]
    sels = []
    for epoch, cfg in enumerate(cfgs):
        sel = pol.select(zt, None, 0.0, cfg, web_class=web_class, split=split)
        pol.write_ledger(paths.ledger(epoch), pol.ledger_table(sel, ids, np.arange(n), epoch, split, None, web_class))
        sels.append(sel)
    return root, web_class, split, sels


def test_report_numbers_match_the_ledgers(rep, tmp_path):
    run, web_class, split, (kd3, soft) = _run_dir(tmp_path / "run")
    rows = rep.report(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    cand = split == "train"
    for r, sel in zip(rows, (kd3, soft)):
        assert r["candidates"] == 90 and r["kept"] == int(sel.keep[cand].sum())
        assert r["kept_per_class"] == np.bincount(sel.pseudo_label[sel.keep], minlength=3).tolist()
        inq, offq = cand & (web_class >= 0), cand & (web_class < 0)
        assert r["in_class_kept_share"] == pytest.approx(sel.keep[inq].mean())
        assert r["off_class_kept_share"] == pytest.approx(sel.keep[offq].mean())
        per = np.bincount(sel.pseudo_label[sel.keep], minlength=3)
        assert r["largest_class"] == int(per.argmax()) and r["largest_class_share"] == pytest.approx(per.max() / per.sum())
        assert r["confident_off_class"] == 30
    assert rows[0]["trained_beyond_kept"] == 0
    assert rows[1]["trained_beyond_kept"] == int((cand & ~soft.keep).sum()) > 0
    assert rows[1]["off_class_kept_share"] < rows[1]["in_class_kept_share"]   # the query prior at work
    assert sum(rows[1]["weight_per_class"]) == pytest.approx(float(soft.weight[cand].sum()), rel=1e-5)


def test_report_prints_and_writes_json(rep, tmp_path, capsys):
    run, *_ = _run_dir(tmp_path / "run")
    out = tmp_path / "r.json"
    rep.main([str(run), str(tmp_path / "empty"), "--json", str(out)])
    text = capsys.readouterr().out
    assert "epoch 0: kept" in text and "epoch 1: kept" in text
    assert "kept per pseudo-class: tee" in text and "largest class" in text and "off-class queries" in text
    assert "rejected rows trained with weight" in text          # epoch 1 is soft
    assert "(no selection/epoch_*.parquet)" in text
    data = json.loads(out.read_text())
    assert len(data[str(run)]) == 2 and data[str(tmp_path / "empty")] == []
