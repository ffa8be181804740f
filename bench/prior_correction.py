"""The prior correction (export.prior_correction, training/prior.py) applied to finished benchmark runs.

The correction changes nothing in training or in the checkpoint choice: it is chosen after the
best checkpoint, on validation only (tau = auto, the class-balanced agreement with the teacher),
from the run's own ledgers. So a finished run's corrected student is the one `webkd distill` with
`export.prior_correction.tau=auto` exports from the same run; this script computes it from each
recorded run directory and records it as a row of its own (ROW_PC below), read once on the test set:

    .venv/bin/python bench/prior_correction.py bench/out/c4a bench/out/c7c ...      # cifar-tinyimagenet
    .venv/bin/python bench/prior_correction.py --run-format "{row}_tinypcb_s{seed}" bench/out/fashion_web/results_tinypcb.json

Every folder's results.json (or the given results file) gains, for each recorded run of a row in
ROW_PC, a record under ROW_PC[row] with `post_hoc_from` naming its source (resumable: a record
already there is kept). `--migrate-default` first renames a folder's `default` records of runs made
before the shipped configs turned the correction on to `default_nopc` (what they are).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webkd.pipeline.config import load_config  # noqa: E402
from webkd.pipeline.paths import RunPaths  # noqa: E402
from webkd.pipeline.storage import atomic_write_json, read_json  # noqa: E402
from webkd.training import prior  # noqa: E402

# row -> the row of its prior-corrected student
ROW_PC = {"vanilla_kd": "vanilla_kd_pc", "random_selection": "random_selection_pc", "default_nopc": "default",
          "kd_disc50": "kd_disc50_pc", "function_matching": "function_matching_pc",
          # fashion-web rows
          "kd": "kd_pc", "soft_nopc": "soft_default"}


def corrected(run: Path) -> dict:
    """The run's corrected student: tau, validation scores and CIFAR-10 / FMNIST test accuracy."""
    from webkd.flows.stages.distill import test_set
    from webkd.training.export import load_student
    from webkd.training.loop import accuracy, predict_logits
    from webkd.training.pool import build_pool

    cfg = load_config(run / "config.yaml", [f"run_dir={run}"])
    paths = RunPaths(run)
    p = build_pool(paths, cfg.data, [t.key for t in cfg.teachers])
    metrics = read_json(paths.metrics, {})
    best = int(metrics["best_epoch"])
    ledgers = [paths.ledger(e) for e in range(best + 1) if paths.ledger(e).exists()]
    base = load_student(run / "export").eval()
    dev = torch.device("cpu")
    # export.prior_correction with tau auto and the shipped grid (a plain namespace: the runs of this session's
    # first half were made by a webkd without the config section, and this script reads them with that code)
    pc_cfg = SimpleNamespace(tau="auto", taus=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0], target="uniform")
    deployed, choice = prior.correct(base, p, ledgers, pc_cfg, dev)
    tpix, tlab = test_set(cfg)
    with torch.no_grad():
        acc = accuracy(predict_logits(lambda x: deployed(x), tpix, np.arange(len(tlab)), dev), tlab)
    return {"tau": choice.tau, "test_acc": acc, "val_balanced_agreement": choice.scores[choice.tau][1],
            "val_balanced_agreement_uncorrected": choice.scores[0.0][1],
            "val_agreement": choice.scores[choice.tau][0], "prior": choice.info()["prior"]}


def process(res_file: Path, run_root: Path, migrate: bool, run_format: str = "{row}_s{seed}") -> None:
    doc = read_json(res_file, None)
    if not doc:
        print(f"{res_file}: no results, skipped")
        return
    results = doc["results"]
    if migrate and "default" in results and not any("post_hoc_from" in r for r in results["default"]):
        moved = [{**r, "run_dir": r.get("run_dir") or f"default_s{r['seed']}"} for r in results.pop("default")]
        results.setdefault("default_nopc", []).extend(moved)
        atomic_write_json(res_file, doc)
        print(f"{res_file}: default -> default_nopc ({len(results['default_nopc'])} runs)")
    for row, target in ROW_PC.items():
        for rec in list(results.get(row, [])):
            have = {r["seed"] for r in results.get(target, [])}
            if rec["seed"] in have:
                continue
            run = run_root / (rec.get("run_dir") or run_format.format(row=row, seed=rec["seed"]))
            if not (run / "export").is_dir():
                print(f"{row} seed {rec['seed']}: {run} has no export, skipped")
                continue
            t0 = time.time()
            pc = corrected(run)
            new = {**rec, "test_acc": pc["test_acc"], "val_agreement": pc["val_agreement"], "prior_correction": pc,
                   "test_acc_uncorrected": rec["test_acc"], "post_hoc_from": row, "run_dir": run.name}
            results.setdefault(target, []).append(new)
            atomic_write_json(res_file, doc)
            print(f"{row} seed {rec['seed']} ({run.name}): tau {pc['tau']:g}, balanced val agreement "
                  f"{100 * pc['val_balanced_agreement_uncorrected']:.2f} -> {100 * pc['val_balanced_agreement']:.2f}, "
                  f"test {100 * rec['test_acc']:.2f} -> {100 * pc['test_acc']:.2f} ({time.time() - t0:.0f}s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", type=Path, help="bench --out folders (their results.json) or results files")
    ap.add_argument("--migrate-default", action="store_true",
                    help="rename `default` records made before the correction was shipped to `default_nopc`")
    ap.add_argument("--run-format", default="{row}_s{seed}",
                    help="run directory of a record without `run_dir` (fashion-web: {row}_tiny_s{seed}, {row}<tag>_s{seed})")
    args = ap.parse_args(argv)
    for t in args.targets:
        res_file, root = (t, t.parent) if t.suffix == ".json" else (t / "results.json", t)
        process(res_file, root, args.migrate_default, args.run_format)


if __name__ == "__main__":
    main()
