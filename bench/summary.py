"""The machine-readable benchmark summary shared by bench/*.py (bench/results/<name>.json):

    {"rows": {ROW: {"test_acc": [per-seed %], "mean": %, "spread": %, "kept_fraction": f, "minutes": m,
                    "seeds": [...]}},
     "roles": {"upper_bound": ROW, "vanilla_kd": ROW, ...}, "command": "...", "commit": "..."}

`spread` is the sample standard deviation over seeds (0 for one seed). `kept_fraction` is a
run's `kept_fraction` when it recorded one (mean over epochs of kept / candidates), else its
last epoch's kept / candidates.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("upper_bound", "vanilla_kd", "function_matching", "random_selection", "paper_kd3", "default")


def git_commit(root: Path = ROOT) -> str:
    """HEAD of the checkout the numbers came from (`-dirty` with uncommitted changes to tracked files)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _kept(r: dict) -> float:
    if r.get("kept_fraction") is not None:
        return float(r["kept_fraction"])
    return r["kept"] / r["candidates"] if r.get("candidates") else float("nan")


def summarize(results: dict[str, list[dict]], rows: list[str], roles_of: dict[str, str | None],
              command: str) -> dict:
    """Per-run records (`test_acc` in [0, 1], `seconds`, `seed`, kept counts) -> the summary shape."""
    out_rows = {}
    for row in rows:
        rs = sorted(results.get(row, []), key=lambda r: r["seed"])
        rs = [r for r in rs if r.get("test_acc") is not None]
        if not rs:
            continue
        acc = [100 * r["test_acc"] for r in rs]
        out_rows[row] = {"test_acc": [round(a, 2) for a in acc], "mean": round(float(np.mean(acc)), 2),
                         "spread": round(float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0, 2),
                         "kept_fraction": round(float(np.mean([_kept(r) for r in rs])), 4),
                         "minutes": round(float(np.mean([r["seconds"] for r in rs])) / 60, 1),
                         "seeds": [r["seed"] for r in rs]}
    unknown = sorted({role for role in roles_of.values() if role} - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; valid: {ROLES}")
    roles = {role: row for row, role in roles_of.items() if role and row in out_rows}
    return {"rows": out_rows, "roles": roles, "command": command, "commit": git_commit()}
