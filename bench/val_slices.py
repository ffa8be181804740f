"""Validation agreement by web-query slice for finished cifar-tinyimagenet runs (issue 11).

    OMP_NUM_THREADS=1 .venv/bin/python bench/val_slices.py bench/out/cifar_big [more --out folders]

For every run directory with an export under the given folders: the exported student on the pool's
validation rows, agreement with the teacher's top-1 overall, on rows whose web query maps to a class
(in-class queries) and on the other rows (off-class queries), next to the recorded CIFAR-10 test
accuracy. Reads validation rows only (no test image); the test column is copied from results.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webkd.flows import cifar  # noqa: E402
from webkd.pipeline.config import load_config  # noqa: E402
from webkd.pipeline.paths import RunPaths  # noqa: E402
from webkd.training.export import load_student  # noqa: E402
from webkd.training.pool import build_pool  # noqa: E402


def slices(run_dir: Path, pool_cache: dict) -> dict[str, float]:
    cfg = load_config(run_dir / "config.yaml")
    base = run_dir.parent / "base_web"
    if base not in pool_cache:
        pool_cache[base] = build_pool(RunPaths(base), cfg.data, [t.key for t in cfg.teachers])  # the curated base
    pool = pool_cache[base]
    val = np.flatnonzero((pool.split == "val") & (pool.status == "ok"))
    model = load_student(run_dir / "export", torch.device("cpu"))
    out = []
    with torch.no_grad():
        for i in range(0, len(val), 1024):
            x = torch.from_numpy(np.ascontiguousarray(pool.pixels[val[i:i + 1024]])).permute(0, 3, 1, 2).float() / 255
            out.append(model(x).float().numpy())
    agree = np.concatenate(out).argmax(1) == pool.teacher_logits[val].argmax(1)
    inc = pool.web_class[val] >= 0
    return {"all": float(agree.mean()), "in_class": float(agree[inc].mean()), "off_class": float(agree[~inc].mean()),
            "n_in": int(inc.sum()), "n_off": int((~inc).sum())}


def main(folders: list[str]) -> None:
    cache: dict = {}
    print("| run | test | val agreement: all | in-class queries | off-class queries |\n|---|---|---|---|---|")
    for folder in map(Path, folders):
        res = json.loads((folder / "results.json").read_text())["results"]
        for row, recs in res.items():
            for r in recs:
                run = folder / r.get("run_dir", f"{row}_s{r['seed']}")
                if not (run / "export").is_dir() or row == "upper_bound":
                    continue
                s = slices(run, cache)
                print(f"| {row} s{r['seed']} ({folder.name}/{run.name}) | {100 * r['test_acc']:.2f} | {100 * s['all']:.2f} | "
                      f"{100 * s['in_class']:.2f} (n {s['n_in']}) | {100 * s['off_class']:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
