"""The fashion-web benchmark (issue 3): distill a Fashion-MNIST teacher into a small student
from web images found by clothing queries, and compare methods on Fashion-MNIST test.

    .venv/bin/python bench/fashion_web.py [--seeds 0 1 2] [--epochs 20] [--rows kd3,kd ...]

- teacher: cnn_fmnist trained by flows/demo.py on Fashion-MNIST train (cached in .cache/);
- web pool: clothing photos (all splits) under their queries + PACS images as off-class queries,
  as real JPEG files (pipeline.datasets.write_fashion_web);
- validation: a held-out slice of the web pool (content-hash split, data.val_fraction); model
  selection uses it only. Test: Fashion-MNIST test, read once at the end of each run;
- rows: KD on original FMNIST train (a subset the size of the web pool; upper bound), vanilla
  KD on the whole pool, KD^3 full, KD^3 without selection, KD^3 without MixDistribution, CE on
  web query labels; same student architecture and epoch budget for all; mean and spread over
  seeds.
Curated artifacts (manifest, pixel cache, features, index, test ingest) are computed once and
shared by all runs; each run trains in its own run directory under bench/out/fashion_web/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.summary import summarize  # noqa: E402
from webkd.flows import demo  # noqa: E402
from webkd.flows.stages import distill as distill_stages  # noqa: E402
from webkd.pipeline import datasets  # noqa: E402
from webkd.pipeline.config import load_config  # noqa: E402
from webkd.pipeline.storage import atomic_write_json  # noqa: E402

OUT = ROOT / "bench" / "out" / "fashion_web"
SUMMARY = ROOT / "bench" / "results" / "fashion_web.json"
# the rows that play the benchmark roles of bench/summary.py (the default: the shipped fashion_web.yaml)
ROLES = {"kd_fmnist": "upper_bound", "kd": "vanilla_kd", "kd3": "paper_kd3", "soft_default": "default"}

# every row names its method, arguments and selection mode: the rows do not follow the YAML defaults
NO_ARGS = "train.method_args={}"
KD3P = "train.method_args={kd3: {kd_weight: 1.0}}"
ROWS = {
    # name: (label, overrides)
    "kd_fmnist": ("KD on original FMNIST train (upper bound)",
                  ["train.method=kd", "selection.mode=none", NO_ARGS]),
    "kd": ("vanilla KD, whole web pool", ["train.method=kd", "selection.mode=none", NO_ARGS]),
    "kd3": ("KD^3 full (paper: selection + feature alignment + MixDistribution)",
            ["train.method=kd3", "selection.mode=kd3", NO_ARGS]),
    "kd3_nosel": ("KD^3 without selection", ["train.method=kd3", "selection.mode=none", NO_ARGS]),
    "kd3_nomd": ("KD^3 without MixDistribution", ["train.method=kd3", "selection.mode=kd3",
                                                   "train.method_args={kd3: {mixdist: false}}"]),
    "ce": ("CE on web query labels", ["train.method=ce", "selection.mode=none", NO_ARGS]),
    # [project] KD^3 with a logit-KD term on the shared-classifier logits (methods.md §7 combinations)
    "kd3p": ("KD^3 + logit KD [project]", ["train.method=kd3", "selection.mode=kd3", KD3P]),
    "kd3p_nosel": ("KD^3 + logit KD, without selection", ["train.method=kd3", "selection.mode=none", KD3P]),
    "kd3p_nomd": ("KD^3 + logit KD, without selection and MixDistribution",
                  ["train.method=kd3", "selection.mode=none", "train.method_args={kd3: {kd_weight: 1.0, mixdist: false}}"]),
    # further ablations (not in the default --rows)
    "kd3p_soft": ("KD^3 + logit KD, soft selection (rejected weight 0.3)",
                  ["train.method=kd3", "selection.mode=kd3", "selection.reject_weight=0.3", KD3P]),
    "kd3p_teacher": ("KD^3 + logit KD, teacher-only selection",
                     ["train.method=kd3", "selection.mode=teacher", KD3P]),
    "kd_sel": ("vanilla KD with KD^3 selection", ["train.method=kd", "selection.mode=kd3", NO_ARGS]),
    # [project] selection building blocks (selection/budgets.py), each on the default objective (KD^3 + logit KD)
    **{name: (label, ["train.method=kd3", KD3P] + sel) for name, (label, sel) in {
        "sel_bal": ("KD^3 + logit KD, class-balanced budgets on teacher energy (q 0.5)",
                    ["selection.mode=balanced"]),
        "sel_bal_q": ("KD^3 + logit KD, balanced budgets, energy + web query prior",
                      ["selection.mode=balanced", "selection.relevance.query_weight=1.0"]),
        "sel_bal_qk": ("KD^3 + logit KD, balanced budgets, energy + query prior + k-NN agreement",
                       ["selection.mode=balanced", "selection.relevance.query_weight=1.0",
                        "selection.relevance.knn_weight=1.0"]),
        "sel_bal_ml": ("KD^3 + logit KD, balanced budgets on the max logit + query prior",
                       ["selection.mode=balanced", "selection.relevance.score=max_logit",
                        "selection.relevance.query_weight=1.0"]),
        "sel_bal_refresh": ("KD^3 + logit KD, balanced budgets regrouped by teacher+student each epoch",
                            ["selection.mode=balanced", "selection.relevance.query_weight=1.0",
                             "selection.budget.refresh=true"]),
        "sel_bal_soft": ("KD^3 + logit KD, balanced budgets, below-budget rows at weight 0.3",
                         ["selection.mode=balanced", "selection.relevance.query_weight=1.0",
                          "selection.reject_weight=0.3"]),
        "sel_bal_q2_wide": ("KD^3 + logit KD, balanced budgets q 0.7 cap 4x median, energy + query prior 2",
                            ["selection.mode=balanced", "selection.budget.keep=0.7", "selection.budget.cap_median=4.0",
                             "selection.relevance.query_weight=2.0"]),
        "sel_bal_q_nocap": ("KD^3 + logit KD, balanced budgets without a cap, energy + query prior",
                            ["selection.mode=balanced", "selection.budget.cap_median=null",
                             "selection.relevance.query_weight=1.0"]),
        "sel_bal_qprior": ("KD^3 + logit KD, balanced budgets without a cap, query prior 1 + energy x0.25",
                           ["selection.mode=balanced", "selection.budget.cap_median=null",
                            "selection.relevance.query_weight=1.0", "selection.relevance.ood_weight=0.25"]),
        "sel_rand_qprior": ("KD^3 + logit KD, random 50% of the candidates (the size sel_bal_qprior keeps)",
                            ["selection.mode=random", "selection.random_keep=0.5"]),
        "sel_soft_qprior": ("KD^3 + logit KD, soft relevance weights, query prior 1 + energy x0.25",
                            ["selection.mode=soft", "selection.relevance.query_weight=1.0",
                             "selection.relevance.ood_weight=0.25"]),
        "sel_soft": ("KD^3 + logit KD, soft relevance weights (w_min 0.1), energy + query prior",
                     ["selection.mode=soft", "selection.relevance.query_weight=1.0"]),
        "sel_soft_qk": ("KD^3 + logit KD, soft relevance weights, energy + query prior + k-NN",
                        ["selection.mode=soft", "selection.relevance.query_weight=1.0",
                         "selection.relevance.knn_weight=1.0"]),
    }.items()},
    # [project] the student in the loop (issue 11): per pseudo-class budgets on KL(p_T || p_S), re-scored each epoch
    **{f"{obj}_disc{int(100 * k)}": (
        f"{label}, balanced budgets keep {k:g} on teacher-student discrepancy (re-scored every epoch)",
        over + ["selection.mode=balanced", f"selection.budget.keep={k}", "selection.relevance.ood_weight=0.0",
                "selection.relevance.discrepancy_weight=1.0"])
       for k in (0.25, 0.5)
       for obj, label, over in (("kd", "vanilla KD", ["train.method=kd", NO_ARGS]),
                                ("kd3p", "KD^3 + logit KD", ["train.method=kd3", KD3P]))},
    "kd_reldisc50": ("vanilla KD, balanced budgets keep 0.5 on teacher energy + web query prior + discrepancy",
                     ["train.method=kd", NO_ARGS, "selection.mode=balanced", "selection.budget.keep=0.5",
                      "selection.relevance.query_weight=1.0", "selection.relevance.discrepancy_weight=1.0"]),
    # the shipped fashion_web.yaml: soft relevance weights (web query prior + 0.25 x energy, floor 0.5) on the
    # KD^3 + logit KD objective (the same settings as `--rows sel_soft_qprior --set selection.soft.w_min=0.5`)
    "soft_default": ("product default: KD^3 + logit KD, soft relevance weights (query prior + 0.25 energy, w_min 0.5)",
                     ["train.method=kd3", KD3P, "selection.mode=soft", "selection.relevance.query_weight=1.0",
                      "selection.relevance.ood_weight=0.25", "selection.relevance.discrepancy_weight=0.0",
                      "selection.soft.w_min=0.5"]),
    "kd_rand50": ("vanilla KD, a fixed random 50% of the candidates", ["train.method=kd", NO_ARGS,
                                                                      "selection.mode=random", "selection.random_keep=0.5"]),
}
# [project] vanilla KD with the shipped soft relevance weights (issue 11, 2026-12-02)
ROWS["kd_soft"] = ("vanilla KD, soft relevance weights (query prior + 0.25 energy, w_min 0.5)",
                   ["train.method=kd", NO_ARGS] + ROWS["soft_default"][1][2:])
# [project] the prior correction (export.prior_correction, training/prior.py): `_pc` rows turn it on (tau auto,
# chosen on class-balanced validation agreement); every other row spells it out as off
PC_ON, PC_OFF = "export.prior_correction.tau=auto", "export.prior_correction.tau=0"
for _src in ("kd", "kd_soft", "kd3p_nosel"):
    ROWS[f"{_src}_pc"] = (ROWS[_src][0] + " + prior correction", ROWS[_src][1] + [PC_ON])
# the shipped fashion_web.yaml turns the correction on: `soft_default` is the recipe with it (the runs of
# 2026-12-02 recorded it as `soft_default_pc`), `soft_nopc` the same recipe without it
ROWS["soft_nopc"] = (ROWS["soft_default"][0] + ", without the prior correction", ROWS["soft_default"][1] + [PC_OFF])
ROWS["soft_default"] = (ROWS["soft_default"][0] + " + prior correction", ROWS["soft_default"][1] + [PC_ON])
for _name, (_label, _over) in list(ROWS.items()):
    if not any(o.startswith("export.prior_correction") for o in _over):
        ROWS[_name] = (_label, _over + [PC_OFF])
DEFAULT_ROWS = ["kd_fmnist", "kd", "kd3", "kd3_nosel", "kd3_nomd", "ce", "kd3p", "kd3p_nosel", "kd3p_nomd", "soft_default"]
CURATED = ["manifest.parquet", "quarantine.parquet", "ingest_state.parquet", "pixels", "features", "index", "test"]


def base_overrides(args, teacher_weights: Path, source: Path) -> list[str]:
    return [f"teachers.0.weights={teacher_weights}", f"data.sources=['folder:{source}']",
            f"data.test_source=folder:{args.test_dir}", f"train.epochs={args.epochs}",
            f"data.image_size={args.image_size}"]


def curate_once(cfg_path: Path, overrides: list[str], run_dir: Path) -> float:
    """Ingest + features + index + test ingest into `run_dir` (reused by every run)."""
    t0 = time.time()
    cfg = load_config(cfg_path, overrides + [f"run_dir={run_dir}"])
    print("\n".join(distill_stages.prepare(cfg)))
    return time.time() - t0


def clone_curated(base: Path, run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for name in CURATED:
        src = base / name
        if src.is_dir():
            shutil.copytree(src, run_dir / name, copy_function=os.link)
        elif src.exists():
            shutil.copy2(src, run_dir / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--pacs", type=int, default=1500, help="PACS images in the pool (off-class noise)")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--tiny-clothing", action="store_true",
                    help="add the Tiny ImageNet clothing queries to the pool (datasets.TINY_CLOTHING_TO_FMNIST)")
    ap.add_argument("--steps-per-epoch", type=int, default=None,
                    help="train.steps_per_epoch of every row (the same step budget whatever each row keeps)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra config overrides for every run")
    ap.add_argument("--tag", default="", help="suffix for run directories and the results file (ablations)")
    ap.add_argument("--merge-from", type=Path, nargs="*", default=[],
                    help="with --summary-only: more results files of the same pool and settings (other --tag runs)")
    ap.add_argument("--summary-only", action="store_true",
                    help=f"only rewrite {SUMMARY.relative_to(ROOT)} from the recorded results file")
    args = ap.parse_args()
    rows = args.rows.split(",")
    cfg_path = ROOT / "flows" / "configs" / "fashion_web.yaml"
    t_all = time.time()
    if args.summary_only:
        files = [OUT / f"results{'_tiny' if args.tiny_clothing else ''}{args.tag}.json", *args.merge_from]
        write_summary(merged([json.loads(f.read_text())["results"] for f in files]), rows, args.tiny_clothing)
        return

    pool_tag = "_tiny" if args.tiny_clothing else ""
    data = OUT / f"data{pool_tag}"
    scen = datasets.write_fashion_web(data, pacs_images=args.pacs, tiny_clothing=args.tiny_clothing)
    t0 = time.time()
    teacher_weights, teacher_metrics = demo.train_fmnist_teacher(epochs=args.teacher_epochs)
    print(f"teacher: {teacher_metrics} ({time.time() - t0:.0f}s, cached after the first run)")
    pool_size = sum(scen.counts.values())
    fm_dir = datasets.write_fmnist_folder(data / "fmnist_train", "train", n=pool_size, seed=0)

    results: dict[str, list[dict]] = {r: [] for r in rows}
    # resume: runs already recorded under the same settings are kept (a killed benchmark picks up where it was)
    res_file = OUT / f"results{'_tiny' if args.tiny_clothing else ''}{args.tag}.json"
    same = ("epochs", "image_size", "pacs", "teacher_epochs", "set", "tiny_clothing", "steps_per_epoch")
    if res_file.exists():
        old = json.loads(res_file.read_text())
        if all(old["args"].get(k, ap.get_default(k)) == vars(args)[k] for k in same):  # keys added later: defaults
            # every recorded run is kept (other rows and seeds too: a later call with other --rows/--seeds adds to it)
            results = {row: list(recs) for row, recs in old["results"].items()} | {
                row: list(old["results"].get(row, [])) for row in rows}
    base_web, base_fm = OUT / f"base_web{pool_tag}", OUT / f"base_fmnist{pool_tag}"
    # every run's extra settings: the step budget, and the pool's query map when it has more queries
    pool_set = ([f"train.steps_per_epoch={args.steps_per_epoch}"] if args.steps_per_epoch else []) + (
        [f"data.label_map={json.dumps(scen.label_map)}"] if args.tiny_clothing else [])
    args.test_dir = scen.test_dir
    common = base_overrides(args, teacher_weights, scen.web_dir) + pool_set + args.set
    print(f"curate web pool: {curate_once(cfg_path, common, base_web):.0f}s")
    if "kd_fmnist" in rows:
        fm_over = base_overrides(args, teacher_weights, fm_dir) + pool_set + args.set
        print(f"curate FMNIST subset: {curate_once(cfg_path, fm_over, base_fm):.0f}s")
    for seed in args.seeds:
        for row in rows:
            label, over = ROWS[row]
            if any(r["seed"] == seed for r in results[row]):
                continue
            base, src = (base_fm, fm_dir) if row == "kd_fmnist" else (base_web, scen.web_dir)
            run_dir = OUT / f"{row}{pool_tag}{args.tag}_s{seed}"
            clone_curated(base, run_dir)
            cfg = load_config(cfg_path, base_overrides(args, teacher_weights, src) + over + pool_set + args.set +
                              [f"seed={seed}", f"run_dir={run_dir}"])
            t0 = time.time()
            res = distill_stages.distill(cfg)
            rec = {"seed": seed, "test_acc": res.test_acc, "val_acc": res.val_acc, "val_agreement": res.val_agreement,
                   "teacher_test_acc": res.teacher_test_acc,
                   "teacher_val_acc": res.teacher_val_acc, "kept": res.kept, "candidates": res.candidates,
                   "best_epoch": res.best_epoch, "seconds": time.time() - t0, "parameters": res.parameters}
            final = json.loads((run_dir / "metrics.json").read_text()).get("final", {})
            rec.update({k: final[k] for k in ("prior_tau", "test_acc_uncorrected", "val_balanced_agreement",
                                              "val_balanced_agreement_uncorrected") if k in final})
            results[row].append(rec)
            print(f"[{row} seed {seed}] test {res.test_acc:.4f} val {res.val_acc:.4f} kept {res.kept}/{res.candidates} "
                  f"({rec['seconds']:.0f}s)", flush=True)
            atomic_write_json(res_file, {"args": {k: v for k, v in vars(args).items() if k != "test_dir"},
                                         "results": results})

    def ms(vals):
        v = np.array([x for x in vals if x is not None], float)
        return f"{100 * v.mean():.2f} ± {100 * v.std(ddof=1 if len(v) > 1 else 0):.2f}" if len(v) else "-"

    print()
    print("| row | FMNIST test acc (%) | web val: agreement with teacher (%) | web val: query acc (%) | "
          "kept / candidates (last epoch) | min per run |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        rs = results[row]
        kept = f"{np.mean([r['kept'] for r in rs]):.0f} / {np.mean([r['candidates'] for r in rs]):.0f}"
        print(f"| {ROWS[row][0]} | {ms([r['test_acc'] for r in rs])} | {ms([r['val_agreement'] for r in rs])} | "
              f"{ms([r['val_acc'] for r in rs])} | {kept} | {np.mean([r['seconds'] for r in rs]) / 60:.1f} |")
    any_run = next((r for row, rs in results.items() if row != "kd_fmnist" for r in rs),
                   next(r for rs in results.values() for r in rs))  # teacher_val_acc: the web validation rows
    if not args.tag:  # ablation runs (--tag) keep their own results file only
        write_summary(results, rows, args.tiny_clothing)
    print(f"\nteacher: FMNIST test {100 * teacher_metrics['test_acc']:.2f}%, web val {100 * (any_run['teacher_val_acc'] or 0):.2f}%;"
          f" student parameters {any_run['parameters']:,}; seeds {args.seeds}; epochs {args.epochs}; "
          f"total {(time.time() - t_all) / 60:.0f} min")


# runs recorded under an earlier name of their row
ALIASES = {"soft_default_pc": "soft_default"}


def merged(parts: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Per-row records from several results files (the first record of a row and seed wins), rows
    renamed by ALIASES; a corrected run's `test_acc_uncorrected` is also the record of its row without
    the correction (`soft_default` -> `soft_nopc`: the same trained student, tau 0)."""
    out: dict[str, list[dict]] = {}
    for results in parts:
        for row, recs in results.items():
            row = ALIASES.get(row, row)
            have = {r["seed"] for r in out.get(row, [])}
            out.setdefault(row, []).extend(r for r in recs if r["seed"] not in have)
    have = {r["seed"] for r in out.get("soft_nopc", [])}
    out.setdefault("soft_nopc", []).extend(
        {**r, "test_acc": r.get("test_acc_uncorrected", r["test_acc"]), "post_hoc_from": "soft_default"}
        for r in out.get("soft_default", []) if "prior_tau" in r and r["seed"] not in have)   # tau 0: the same
    return out


def write_summary(results: dict[str, list[dict]], rows: list[str], tiny: bool = False) -> None:
    """bench/results/fashion_web.json (bench/summary.py's shape) from the per-run records of the pool
    with the Tiny ImageNet clothing queries (the benchmark's scenario since 2026-12-02); the smaller
    pool without them (the demo's) writes fashion_web_small.json."""
    command = " ".join(["python", "bench/fashion_web.py"] + sys.argv[1:])
    out = summarize(results, rows, {r: ROLES.get(r) for r in rows}, command)
    path = SUMMARY if tiny else SUMMARY.with_name("fashion_web_small.json")
    atomic_write_json(path, out)
    print(f"summary: {path}")


if __name__ == "__main__":
    main()
