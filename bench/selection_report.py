"""Why a selection keeps what it keeps, per epoch, from a run's ledgers.

    python bench/selection_report.py RUN_DIR [RUN_DIR ...] [--json OUT.json]

For every `selection/epoch_<kkk>.parquet` of each run directory (the run's `config.yaml`, when
present, names the classes) it prints:
- kept / candidates and the teacher share alpha of that selection;
- kept rows per pseudo-class (and, where the selection trains on rejected rows too, the weight
  mass per pseudo-class: soft selection, selection.reject_weight);
- the kept share of the candidates whose web query maps to a teacher class (web_class >= 0)
  against those whose query is off-class (web_class -1);
- the largest pseudo-class's share of the kept set;
- off-class candidates the teacher is confident about (teacher_p1 >= --confident) and how many
  of them were kept: where max softmax is confidently wrong.

Candidates are the ledger rows that are neither `validation` nor `near_duplicate`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webkd.pipeline.paths import RunPaths  # noqa: E402
from webkd.pipeline.records import NEAR_DUPLICATE, VALIDATION  # noqa: E402
from webkd.pipeline.report import pct  # noqa: E402

COLUMNS = ["kept", "weight", "reason", "pseudo_label", "teacher_share", "teacher_p1", "web_class"]


def class_names(run_dir: Path) -> list[str] | None:
    """data.classes of the run's config.yaml, or None."""
    p = RunPaths(run_dir).config
    if not p.exists():
        return None
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        return None
    classes = (cfg.get("data") or {}).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def _share(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def epoch_stats(cols: dict[str, np.ndarray], confident: float = 0.9) -> dict[str, Any]:
    """The per-epoch numbers of the module docstring from one ledger's columns."""
    reason = cols["reason"].astype(str)
    cand = (reason != VALIDATION) & (reason != NEAR_DUPLICATE)
    kept = cols["kept"].astype(bool) & cand
    weight = np.nan_to_num(cols["weight"].astype(np.float64), nan=0.0) * cand
    pl = cols["pseudo_label"].astype(np.int64)
    k = int(max(pl.max(initial=-1) + 1, 1))
    per_class = np.bincount(pl[kept & (pl >= 0)], minlength=k)
    mass = np.bincount(pl[cand & (pl >= 0)], weights=weight[cand & (pl >= 0)], minlength=k)
    in_q, off_q = cand & (cols["web_class"] >= 0), cand & (cols["web_class"] < 0)
    conf_off = off_q & (np.nan_to_num(cols["teacher_p1"].astype(np.float64)) >= confident)
    top = int(per_class.argmax()) if per_class.sum() else -1
    alpha = cols["teacher_share"].astype(np.float64)
    return {
        "candidates": int(cand.sum()), "kept": int(kept.sum()), "kept_share": _share(kept.sum(), cand.sum()),
        "teacher_share": float(alpha[0]) if len(alpha) else float("nan"),
        "kept_per_class": per_class.tolist(),
        "weight_per_class": [round(float(m), 3) for m in mass],
        "trained_beyond_kept": int((cand & ~kept & (weight > 0)).sum()),
        "in_class_queries": int(in_q.sum()), "in_class_kept_share": _share((kept & in_q).sum(), in_q.sum()),
        "off_class_queries": int(off_q.sum()), "off_class_kept_share": _share((kept & off_q).sum(), off_q.sum()),
        "off_class_weight_share": _share(weight[off_q].sum(), weight.sum()),
        "largest_class": top, "largest_class_share": _share(per_class.max(initial=0), per_class.sum()),
        "confident_off_class": int(conf_off.sum()), "confident_off_class_kept": int((conf_off & kept).sum()),
    }


def report(run_dir: str | Path, confident: float = 0.9) -> list[dict[str, Any]]:
    """One dict per ledger of the run (sorted by epoch): `epoch_stats` plus the epoch."""
    out = []
    for epoch, path in RunPaths(Path(run_dir)).ledgers():
        t = pq.read_table(path)
        missing = [c for c in COLUMNS if c not in t.column_names]
        if missing:
            raise ValueError(f"{path}: ledger lacks columns {missing}")
        cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
        out.append({"epoch": epoch, **epoch_stats(cols, confident)})
    return out


def format_report(run_dir: str | Path, rows: list[dict[str, Any]], names: list[str] | None = None) -> str:
    def name(c: int) -> str:
        return names[c] if names and 0 <= c < len(names) else str(c)

    lines = [f"== {run_dir}: {len(rows)} ledger(s)"]
    if not rows:
        lines.append("  (no selection/epoch_*.parquet)")
    for r in rows:
        lines.append(f"epoch {r['epoch']}: kept {r['kept']}/{r['candidates']} ({pct(r['kept_share'])}), "
                     f"alpha {r['teacher_share']:.3f}")
        lines.append("  kept per pseudo-class: " + ", ".join(
            f"{name(c)} {n}" for c, n in enumerate(r["kept_per_class"])))
        if r["trained_beyond_kept"]:
            lines.append(f"  + {r['trained_beyond_kept']} rejected rows trained with weight; weight mass per class: "
                         + ", ".join(f"{name(c)} {m:.1f}" for c, m in enumerate(r["weight_per_class"])))
        lines.append(f"  kept share: in-class queries {pct(r['in_class_kept_share'])} of {r['in_class_queries']}, "
                     f"off-class queries {pct(r['off_class_kept_share'])} of {r['off_class_queries']}; "
                     f"off-class share of the weight {pct(r['off_class_weight_share'])}")
        top = name(r["largest_class"]) if r["largest_class"] >= 0 else "-"
        lines.append(f"  largest class {top}: {pct(r['largest_class_share'])} of the kept set; "
                     f"teacher-confident off-class rows {r['confident_off_class']}, "
                     f"{r['confident_off_class_kept']} of them kept")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--confident", type=float, default=0.9, help="teacher_p1 at or above which the teacher is 'confident'")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's rows to this JSON file")
    args = ap.parse_args(argv)
    everything = {}
    for d in args.run_dirs:
        rows = report(d, args.confident)
        everything[str(d)] = rows
        print(format_report(d, rows, class_names(d)))
    if args.json is not None:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
