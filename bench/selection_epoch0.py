"""Epoch-0 selections (the teacher alone, no training) of each selection mode on the real
fashion-web pool with the shipped FMNIST teacher: what each mode keeps before any student exists.

    python bench/selection_epoch0.py [--out /tmp/selection_epoch0]

Writes the pool (pipeline.datasets.write_fashion_web, no test set), ingests it, caches the
teacher's features and builds the FAISS index under --out (reused by a second call), then prints
`bench/selection_report.py`'s numbers for one epoch-0 selection per row of MODES, plus the share
of kept in-class rows whose query equals the teacher's top-1. About 40 s on one CPU thread.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from webkd.flows.stages import curate as stages  # noqa: E402
from webkd.pipeline import datasets  # noqa: E402
from webkd.pipeline.config import SelectionConfig, load_config  # noqa: E402
from webkd.selection import policy  # noqa: E402

_spec = importlib.util.spec_from_file_location("selection_report", ROOT / "bench" / "selection_report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

# name: selection config (validated as SelectionConfig; knn.k from the shipped config, the hard k-NN rule off:
# the neighbours are loaded only for the relevance k-NN term)
MODES: dict[str, dict] = {
    "kd3 (paper)": {"mode": "kd3"},
    "balanced": {"mode": "balanced"},
    "balanced, no cap": {"mode": "balanced", "budget": {"cap_median": None}},
    "balanced + query 1": {"mode": "balanced", "relevance": {"query_weight": 1.0}},
    "balanced + query 1 + knn 1": {"mode": "balanced", "relevance": {"query_weight": 1.0, "knn_weight": 1.0}},
    "balanced + query 1 + knn(query) 1": {"mode": "balanced", "relevance": {"query_weight": 1.0, "knn_weight": 1.0,
                                                                        "knn_source": "query"}},
    "balanced + query 1 + knn(query) 2, no cap": {"mode": "balanced", "budget": {"cap_median": None},
                                                  "relevance": {"query_weight": 1.0, "knn_weight": 2.0,
                                                                "knn_source": "query"}},
    "balanced, energy x0.25 + query 1, no cap": {"mode": "balanced", "budget": {"cap_median": None},
                                                 "relevance": {"query_weight": 1.0, "ood_weight": 0.25}},
    "balanced, energy x0.25 + query 1": {"mode": "balanced", "relevance": {"query_weight": 1.0, "ood_weight": 0.25}},
    "balanced max_logit + query 1": {"mode": "balanced", "relevance": {"score": "max_logit", "query_weight": 1.0}},
    "balanced + query 1, no cap": {"mode": "balanced", "budget": {"cap_median": None},
                                   "relevance": {"query_weight": 1.0}},
    "balanced + query 2, q 0.7, cap 4": {"mode": "balanced", "budget": {"keep": 0.7, "cap_median": 4.0},
                                         "relevance": {"query_weight": 2.0}},
    "soft + query 1": {"mode": "soft", "relevance": {"query_weight": 1.0}},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/selection_epoch0"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    datasets.write_fashion_web(args.out / "data", write_test=False)
    cfg = load_config(ROOT / "flows" / "configs" / "fashion_web.yaml", [
        f"teachers.0.weights={ROOT / 'flows' / 'assets' / 'fmnist_teacher.safetensors'}",
        f"data.sources=['folder:{args.out / 'data' / 'web'}']", "data.test_source=null",
        f"run_dir={args.out / 'run'}", "selection.knn.enabled=true"])
    stages.ingest(cfg)
    stages.features(cfg)
    stages.index(cfg)
    pool = stages.pool(cfg)
    zt = np.asarray(pool.teacher_logits, np.float32)
    names = cfg.data.classes
    cand = pool.candidates
    in_q = cand & (pool.web_class >= 0)
    agree = zt.argmax(1) == pool.web_class
    print(f"pool: {int(cand.sum())} candidates, {int(in_q.sum())} in-class queries; teacher top-1 = query on "
          f"{agree[in_q].mean():.3f} of them; teacher top-1 counts: "
          + ", ".join(f"{n} {c}" for n, c in zip(names, np.bincount(zt.argmax(1)[cand], minlength=len(names)))))
    for name, over in MODES.items():
        sc = SelectionConfig.model_validate({**cfg.selection.model_dump(), **over,
                                        "knn": {**cfg.selection.knn.model_dump(), "enabled": False}})  # no hard k-NN rule
        sel = policy.select(zt, None, 0.0, sc, web_class=pool.web_class, neighbors=pool.neighbors, split=pool.split,
                            status=pool.status)
        t = policy.ledger_table(sel, pool.ids, np.arange(len(pool)), 0, pool.split, pool.web_labels, pool.web_class)
        r = report.epoch_stats({c: t.column(c).to_numpy(zero_copy_only=False) for c in report.COLUMNS})
        print(f"--- {name}: kept {r['kept']}/{r['candidates']}; kept share in-class queries "
              f"{r['in_class_kept_share']:.3f}, off-class {r['off_class_kept_share']:.3f}; largest class "
              f"{names[r['largest_class']]} {r['largest_class_share']:.3f}; teacher-confident off-class rows "
              f"{r['confident_off_class']}, kept {r['confident_off_class_kept']}; query = teacher top-1 among kept "
              f"in-class rows {agree[in_q & sel.keep].mean():.3f}")
        print("    kept per class: " + ", ".join(f"{n} {c}" for n, c in zip(names, r["kept_per_class"])))
        if sc.mode == "soft":
            print(f"    mean weight: in-class queries {sel.weight[in_q].mean():.3f}, "
                  f"off-class {sel.weight[cand & (pool.web_class < 0)].mean():.3f}")
    print(f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
