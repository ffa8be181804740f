"""The cifar-tinyimagenet benchmark (issue 11): distill a CIFAR-10 teacher into a compact student
from Tiny ImageNet photos found by class-name queries, and compare recipes on CIFAR-10 test.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cifar_tinyimagenet.py [--pool-size 8000] [--seeds 0 1]
        [--epochs 12] [--rows upper_bound,vanilla_kd,...] [--fresh] [--train-teacher --ship-teacher]

- teacher: resnet_narrow width 16 (CIFAR-style ResNet) trained by flows/cifar.py on CIFAR-10 train
  (JPEG copy), cached in .cache/teachers/, shipped in flows/assets/cifar_teacher.safetensors;
- web pool: a seeded subset (--pool-size) of the 60,600 Tiny ImageNet photos, as the stored JPEG
  files in folders named by their class name (the query); flows/configs/cifar_tinyimagenet.yaml
  maps the queries a person would map to CIFAR-10 classes, every other query is off-class;
- validation: a held-out content-hash slice of the pool (data.val_fraction, no CIFAR image);
  checkpoints and every recipe choice use it. Test: CIFAR-10 test, read once at the end of a run;
- rows: the same student and the same budget in optimisation steps (train.steps_per_epoch, from
  the pool size) for every row; mean and spread over seeds; minutes per run. The upper bound is
  KD on a CIFAR-10 train subset the size of the pool (its own run with its own source folder).
Results per row and seed go to <out>/results.json (resumed: finished runs are skipped, a killed
run resumes from its last checkpoint), the summary to bench/results/cifar_tinyimagenet.json.
"""
from __future__ import annotations

import argparse
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
from webkd.flows import cifar  # noqa: E402
from webkd.flows.demo import cache_dir  # noqa: E402
from webkd.flows.stages import distill as distill_stages  # noqa: E402
from webkd.pipeline import datasets  # noqa: E402
from webkd.pipeline.config import load_config  # noqa: E402
from webkd.pipeline.storage import atomic_write_json, read_json  # noqa: E402

OUT = ROOT / "bench" / "out" / "cifar_tinyimagenet"
RESULTS = ROOT / "bench" / "results" / "cifar_tinyimagenet.json"
CURATED = ["manifest.parquet", "quarantine.parquet", "ingest_state.parquet", "pixels", "features", "index", "test"]

NO_ARGS = "train.method_args={}"
KD3P = "train.method_args={kd3: {kd_weight: 1.0}}"    # the shipped default objective: KD^3 + logit KD
# function matching (Beyer et al. 2022): same augmented view for teacher and student, mixup on every
# batch (alpha 1), teacher online, T = 1
FUNMATCH = "train.method_args={kd: {mixup: 1.0, temperature: 1.0, kd_weight: 1.0}}"
def rel(ood: float = 0.0, query: float = 0.0, disc: float = 0.0, knn: float = 0.0) -> list[str]:
    """Every relevance weight of a selecting row, spelled out: a row never inherits the YAML's (the shipped
    config sets ood 0 and discrepancy 1, which the first kd_bal_q* rows of this session inherited unawares)."""
    return [f"selection.relevance.ood_weight={ood}", f"selection.relevance.query_weight={query}",
            f"selection.relevance.discrepancy_weight={disc}", f"selection.relevance.knn_weight={knn}"]


def bal(keep: float, **weights: float) -> list[str]:
    return ["selection.mode=balanced", f"selection.budget.keep={keep}"] + rel(**weights)


KD = ["train.method=kd", NO_ARGS]
DEFAULT = KD + bal(0.25, query=1.0, disc=1.0)   # the shipped cifar_tinyimagenet.yaml, the same settings as kd_qdisc25
# name: (label, role or None, base pool "web" | "cifar", overrides); random_selection gets its size at run time
ROWS: dict[str, tuple[str, str | None, str, list[str]]] = {
    "upper_bound": ("KD on CIFAR-10 train (upper bound)", "upper_bound", "cifar",
                    ["train.method=kd", "selection.mode=none", NO_ARGS]),
    "vanilla_kd": ("vanilla KD, whole pool", "vanilla_kd", "web", ["train.method=kd", "selection.mode=none", NO_ARGS]),
    "function_matching": ("KD with function matching (mixup, same view), whole pool", "function_matching", "web",
                          ["train.method=kd", "selection.mode=none", FUNMATCH]),
    "paper_kd3": ("KD^3 as specified (selection + feature alignment + MixDistribution)", "paper_kd3", "web",
                  ["train.method=kd3", "selection.mode=kd3", NO_ARGS]),
    # the shipped flows/configs/cifar_tinyimagenet.yaml: vanilla KD + per pseudo-class budgets keep 0.25 by the web
    # query prior + KL(p_T || p_S) of the current student, re-scored every epoch (the same settings as kd_qdisc25;
    # the previous default, keep 0.5 by KL alone, is kd_disc50)
    "default": ("product default: vanilla KD + keep 0.25 per class by web query prior + KL(p_T||p_S) (student in the loop)",
                "default", "web", DEFAULT),
    "random_selection": ("vanilla KD, a fixed random subset of the default's kept share", "random_selection", "web",
                         ["train.method=kd", NO_ARGS]),
    "kd3p_nosel": ("KD^3 + logit KD, no selection (the previous default)", None, "web",
                   ["train.method=kd3", "selection.mode=none", KD3P]),
    # ablations
    "default_sel": ("KD^3 + logit KD with KD^3 selection", None, "web", ["train.method=kd3", "selection.mode=kd3", KD3P]),
    "kd3_nosel": ("KD^3 without selection", None, "web", ["train.method=kd3", "selection.mode=none", NO_ARGS]),
    "kd3_nomd": ("KD^3 without MixDistribution", None, "web",
                 ["train.method=kd3", "selection.mode=kd3", "train.method_args={kd3: {mixdist: false}}"]),
    "kd_sel": ("vanilla KD with KD^3 selection", None, "web", ["train.method=kd", "selection.mode=kd3", NO_ARGS]),
    # [project] selection building blocks (selection/budgets.py) on the KD^3 + logit KD objective
    **{name: (label, None, "web", ["train.method=kd3", KD3P] + sel) for name, (label, sel) in {
        "sel_bal": ("KD^3 + logit KD, class-balanced budgets on teacher energy", bal(0.5, ood=1.0)),
        "sel_bal_q": ("KD^3 + logit KD, balanced budgets, energy + web query prior", bal(0.5, ood=1.0, query=1.0)),
        "sel_bal_qk": ("KD^3 + logit KD, balanced budgets, energy + query prior + k-NN agreement",
                       bal(0.5, ood=1.0, query=1.0, knn=1.0)),
        "sel_soft": ("KD^3 + logit KD, soft relevance weights, energy + query prior",
                     ["selection.mode=soft"] + rel(ood=1.0, query=1.0)),
    }.items()},
    # [project] the same budgets on the function-matching objective (KD, mixup, same view, T 1)
    **{f"fm_bal{'_q' if q else ''}{int(100 * k)}": (
        f"function matching, balanced budgets keep {k:g}, energy{' + query prior' if q else ''}", None, "web",
        ["train.method=kd", FUNMATCH] + bal(k, ood=1.0, query=float(q))) for k in (0.1, 0.25, 0.5) for q in (0, 1)},
    # [project] the student in the loop: per pseudo-class budgets on KL(p_T || p_S) at each reselection
    **{f"fm_disc{int(100 * k)}": (
        f"function matching, balanced budgets keep {k:g} on teacher-student discrepancy (re-scored every epoch)",
        None, "web", ["train.method=kd", FUNMATCH] + bal(k, disc=1.0)) for k in (0.25, 0.5)},
    **{f"kd_disc{int(100 * k)}": (
        f"vanilla KD, balanced budgets keep {k:g} on teacher-student discrepancy (re-scored every epoch)",
        None, "web", KD + bal(k, disc=1.0)) for k in (0.25, 0.5)},
    # [project] relevance on the vanilla KD objective: teacher energy + web query prior (kd_eq), the query prior
    # with the student in the loop (kd_qdisc: the web query says what is relevant, the student what is still to
    # learn), and all three (kd_eqdisc)
    **{f"kd_{name}{int(100 * k)}": (f"vanilla KD, balanced budgets keep {k:g}, {label}", None, "web", KD + bal(k, **w))
       for k in (0.1, 0.15, 0.25, 0.5) for name, label, w in (
           ("eq", "energy + query prior", {"ood": 1.0, "query": 1.0}),
           ("qdisc", "query prior + teacher-student discrepancy", {"query": 1.0, "disc": 1.0}),
           ("q2disc", "query prior x2 + teacher-student discrepancy", {"query": 2.0, "disc": 1.0}),
           ("eqdisc", "energy + query prior + teacher-student discrepancy", {"ood": 1.0, "query": 1.0, "disc": 1.0}))},
    # [project] the default's relevance with budgets shared out by m_c^beta instead of the share of each
    # pseudo-class (selection.budget.class_power): beta 0 the same count for every pseudo-class (the kept set
    # no longer inherits the teacher's class mix on the pool: frog 9,659 vs horse 2,817 candidates), 0.5 between
    **{f"kd_qdisc25_{tag}": (f"vanilla KD, keep 0.25 by query prior + KL(p_T||p_S), budgets ~ m_c^{b:g} ({label})",
                             None, "web", DEFAULT + [f"selection.budget.class_power={b}"])
       for tag, b, label in (("eq", 0.0, "the same count per pseudo-class"), ("sqrt", 0.5, "square root"))},
    # fixed random subsets of a stated share (selection.random_seed = the run's seed)
    **{f"random_{int(100 * k)}": (f"vanilla KD, a fixed random {k:g} of the candidates", None, "web",
                                  ["train.method=kd", NO_ARGS, "selection.mode=random", f"selection.random_keep={k}"])
       for k in (0.25, 0.5)},
    # [project] the KD temperature, chosen on validation (the default objective uses T 4)
    **{f"vanilla_t{t}": (f"vanilla KD at T {t}, whole pool", None, "web",
                         ["train.method=kd", "selection.mode=none", f"train.method_args={{kd: {{temperature: {t}.0}}}}"])
       for t in (1, 2, 8)},
}
# [project] the prior correction (export.prior_correction, training/prior.py): the shipped config turns it on
# (tau auto); every other row spells it out, off unless the row is a `_pc` row (bench/prior_correction.py
# computes a `_pc` row from its source row's finished runs: training and checkpoint are the same)
PC_ON, PC_OFF = "export.prior_correction.tau=auto", "export.prior_correction.tau=0"
ROWS["default_nopc"] = ("the product default without the prior correction", None, "web", DEFAULT + [PC_OFF])
ROWS["default"] = (ROWS["default"][0] + " + prior correction", "default", "web", DEFAULT + [PC_ON])
# [project] the default re-selected every 2nd epoch only (selection.reselect_every): half the student scoring
# passes over the pool, the kept set held for two epochs (the default's cost at 24 epochs is ~2x vanilla KD)
ROWS["default_r2"] = ("the product default re-selected every 2nd epoch + prior correction", None, "web",
                      DEFAULT + ["selection.reselect_every=2", PC_ON])
ROWS["default_r2_nopc"] = ("the product default re-selected every 2nd epoch", None, "web",
                           DEFAULT + ["selection.reselect_every=2", PC_OFF])
for _src in ("vanilla_kd", "random_selection", "kd_disc50", "function_matching", "kd_qdisc25_eq", "kd_qdisc25_sqrt",
             "kd_qdisc10", "kd_qdisc15", "random_25"):
    _label, _, _base, _over = ROWS[_src]
    ROWS[f"{_src}_pc"] = (f"{_label} + prior correction", None, _base, _over + [PC_ON])
for _name, (_label, _role, _base, _over) in list(ROWS.items()):
    if not any(o.startswith("export.prior_correction") for o in _over):
        ROWS[_name] = (_label, _role, _base, _over + [PC_OFF])
DEFAULT_ROWS = ["upper_bound", "vanilla_kd", "function_matching", "paper_kd3", "default", "random_selection"]
# the random row copies the kept share of the product's selection; while the default selects
# nothing (mode none) it copies the first of these rows that does select
RANDOM_SIZE_FROM = ["default", "default_sel", "paper_kd3"]
SAME = ("pool_size", "epochs", "steps_per_epoch", "batch_size", "test_size", "teacher", "set")  # settings a resumed run must share


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-size", type=int, default=8000, help="Tiny ImageNet images in the web pool (of 60,600)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps-per-epoch", type=int, default=None,
                    help="the step budget per epoch of every row (default: one pass over the pool's training share); "
                         "with a pool larger than the budget, selection chooses what the steps are spent on")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--fresh", action="store_true", help="forget recorded results and run directories")
    ap.add_argument("--summary-only", action="store_true",
                    help="train nothing: print the table and write --results from the runs recorded in --out "
                         "(and in each --merge-from folder's results.json recorded under the same settings)")
    ap.add_argument("--merge-from", type=Path, nargs="*", default=[],
                    help="other --out folders of the same settings (parallel jobs) whose runs are added")
    ap.add_argument("--test-size", type=int, default=None, help="a seeded subset of CIFAR-10 test (tests only)")
    ap.add_argument("--train-teacher", action="store_true", help="train (or reuse the cached) teacher, not the shipped one")
    ap.add_argument("--ship-teacher", action="store_true", help="copy the trained teacher into flows/assets/")
    ap.add_argument("--teacher-epochs", type=int, default=cifar.TEACHER_RECIPE["epochs"])
    ap.add_argument("--teacher-only", action="store_true", help="train (and with --ship-teacher ship) the teacher, then stop")
    ap.add_argument("--teacher-train-size", type=int, default=None, help="CIFAR-10 train subset (smoke tests)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra config overrides for every run")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--data", type=Path, default=None, help="where the pool and test folders are written "
                                                            "(default .cache/cifar_tinyimagenet)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; valid: {list(ROWS)}")
    return args


def teacher(args) -> tuple[Path, dict]:
    """The shipped teacher, or (--train-teacher, or none shipped yet) one trained and cached by recipe."""
    shipped = cifar.shipped_teacher()
    if shipped and not args.train_teacher:
        return shipped[0], shipped[1]["metrics"]
    recipe = {"epochs": args.teacher_epochs, "train_size": args.teacher_train_size}
    t0 = time.time()
    weights, metrics = cifar.train_cifar_teacher(recipe, test_size=args.test_size)
    print(f"teacher: {metrics} ({time.time() - t0:.0f}s; cached)", flush=True)
    if args.ship_teacher:
        print(f"shipped: {cifar.ship_teacher(weights, metrics, recipe)}")
    return weights, metrics


def write_data(args) -> dict[str, Path]:
    """Pool, CIFAR-10 test and (for the upper bound) a CIFAR-10 train subset as image folders."""
    data = Path(args.data or cache_dir() / "cifar_tinyimagenet")
    web = data / f"web_n{args.pool_size}"
    counts = datasets.write_tinyimagenet_pool(web, args.pool_size)
    test = datasets.write_cifar10_folder(data / f"test_n{args.test_size or 'all'}", "test", args.test_size)
    cifar_train = datasets.write_cifar10_folder(data / f"cifar_train_n{args.pool_size}", "train", args.pool_size)
    print(f"pool: {sum(counts.values())} images under {len(counts)} queries in {web}")
    return {"web": web, "test": test, "cifar": cifar_train}


def steps_per_epoch(args, cfg) -> int:
    """The one step budget of every row: --steps-per-epoch, or one pass over the pool's training share."""
    if args.steps_per_epoch:
        return args.steps_per_epoch
    return max(1, int(args.pool_size * (1 - cfg.data.val_fraction)) // args.batch_size)


def base_overrides(args, weights: Path, source: Path, test: Path) -> list[str]:
    return [f"teachers.0.weights={weights}", f"data.sources=['folder:{source}']", f"data.test_source=folder:{test}",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "export.onnx=false"]


def curate_once(overrides: list[str], run_dir: Path) -> float:
    """Ingest + features + index + test ingest into `run_dir` (reused by every run on that pool)."""
    t0 = time.time()
    cfg = load_config(cifar.CONFIG, overrides + [f"run_dir={run_dir}"])
    print("\n".join(distill_stages.prepare(cfg)))
    return time.time() - t0


def clone_curated(base: Path, run_dir: Path) -> None:
    """Hard-link the curated artifacts into a fresh run directory; one that has them already is
    kept as it is (a killed run resumes from its checkpoint)."""
    if (run_dir / "manifest.parquet").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in CURATED:
        src = base / name
        if src.is_dir():
            shutil.copytree(src, run_dir / name, copy_function=os.link, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, run_dir / name)


def kept_fraction(run_dir: Path) -> float:
    """Mean over epochs of kept / candidates, from the run's metrics history (the ledgers' counts)."""
    hist = read_json(run_dir / "metrics.json", {}).get("history", [])
    fr = [h["kept"] / h["candidates"] for h in hist if h.get("candidates")]
    return float(np.mean(fr)) if fr else float("nan")


def random_size(results: dict, seed: int) -> tuple[float, str]:
    """The kept share of the first selecting row of RANDOM_SIZE_FROM: its run with this seed, or (the
    share is set by the config's budget, not by the seed) its run with another seed."""
    for ref in RANDOM_SIZE_FROM:
        recs = results.get(ref, [])
        rec = next((r for r in recs if r["seed"] == seed), recs[0] if recs else None)
        if rec and rec["kept_fraction"] < 0.999:
            return rec["kept_fraction"], ref
    raise SystemExit(f"random_selection needs a finished selecting row for seed {seed} first: one of "
                     f"{RANDOM_SIZE_FROM} (add it to --rows before random_selection)")


def run_rows(args, weights: Path, paths: dict[str, Path]) -> dict[str, list[dict]]:
    rows = args.rows.split(",")
    res_file = args.out / "results.json"
    settings = {k: (str(weights.resolve()) if k == "teacher" else vars(args)[k]) for k in SAME}
    old = read_json(res_file, None) if res_file.exists() else None
    if old and old.get("settings") != settings and not args.fresh:
        print(f"{res_file}: recorded under other settings ({old.get('settings')}); starting afresh")
    if (args.fresh or (old and old.get("settings") != settings)) and args.out.exists():
        shutil.rmtree(args.out)
        old = None
    results: dict[str, list[dict]] = old["results"] if old else {}
    cfg0 = load_config(cifar.CONFIG, base_overrides(args, weights, paths["web"], paths["test"]) + args.set)
    budget = [f"train.steps_per_epoch={steps_per_epoch(args, cfg0)}"]
    bases = {"web": args.out / "base_web", "cifar": args.out / "base_cifar"}
    print(f"curate web pool: {curate_once(base_overrides(args, weights, paths['web'], paths['test']) + args.set, bases['web']):.0f}s")
    if any(ROWS[r][2] == "cifar" for r in rows):
        over = base_overrides(args, weights, paths["cifar"], paths["test"]) + args.set
        print(f"curate CIFAR-10 train subset: {curate_once(over, bases['cifar']):.0f}s")
    for seed in args.seeds:
        for row in rows:
            label, _, base, over = ROWS[row]
            if any(r["seed"] == seed for r in results.get(row, [])):
                continue
            extra: dict = {}
            if row == "random_selection":
                frac, ref = random_size(results, seed)
                over = over + ["selection.mode=random", f"selection.random_keep={frac:.6f}",
                               f"selection.random_seed={seed}"]
                extra = {"random_keep": frac, "random_keep_from": ref}
            elif row.startswith("random_"):
                over = over + [f"selection.random_seed={seed}"]
            run_dir = args.out / f"{row}_s{seed}"
            clone_curated(bases[base], run_dir)
            cfg = load_config(cifar.CONFIG, base_overrides(args, weights, paths[base], paths["test"]) + over + budget
                              + args.set + [f"seed={seed}", f"run_dir={run_dir}"])
            t0 = time.time()
            res = distill_stages.distill(cfg)
            rec = {"seed": seed, "test_acc": res.test_acc, "val_acc": res.val_acc, "val_agreement": res.val_agreement,
                   "teacher_test_acc": res.teacher_test_acc, "teacher_val_acc": res.teacher_val_acc,
                   "kept": res.kept, "candidates": res.candidates, "kept_fraction": kept_fraction(run_dir),
                   "best_epoch": res.best_epoch, "seconds": time.time() - t0, "parameters": res.parameters, **extra}
            results.setdefault(row, []).append(rec)
            print(f"[{row} seed {seed}] test {res.test_acc:.4f} val agreement {res.val_agreement:.4f} kept "
                  f"{rec['kept_fraction']:.3f} ({rec['seconds']:.0f}s)", flush=True)
            atomic_write_json(res_file, {"settings": settings, "results": results})
    return results


UNCORRECTED_TWIN = {"default": "default_nopc", "default_r2": "default_r2_nopc"}


def recorded(args, weights: Path) -> dict[str, list[dict]]:
    """The runs recorded in --out and the --merge-from folders under this invocation's settings
    (one record per row and seed, --out first). A run of a prior-corrected row (`X_pc`, `default`)
    also gives its uncorrected twin (`X`, `default_nopc`) for its seed, from the run's
    metrics.json `test_acc_uncorrected`, unless the twin has a run of its own for that seed."""
    settings = {k: (str(weights.resolve()) if k == "teacher" else vars(args)[k]) for k in SAME}
    out: dict[str, list[dict]] = {}
    for folder in [args.out, *args.merge_from]:
        rec = read_json(folder / "results.json", None)
        if not rec:
            continue
        if rec.get("settings") != settings:
            raise SystemExit(f"{folder / 'results.json'}: recorded under other settings ({rec.get('settings')}), "
                             f"not {settings}")
        for row, runs in rec["results"].items():
            have = {r["seed"] for r in out.get(row, [])}
            out.setdefault(row, []).extend(r for r in runs if r["seed"] not in have)
            twin = UNCORRECTED_TWIN.get(row, row[:-3] if row.endswith("_pc") else None)
            for r in runs:   # a corrected run is also its uncorrected twin's run: same training, same checkpoint
                m = read_json(folder / f"{row}_s{r['seed']}" / "metrics.json", {}).get("final") or {}
                if twin in ROWS and m.get("test_acc_uncorrected") is not None and \
                        all(x["seed"] != r["seed"] for x in out.get(twin, [])):
                    out.setdefault(twin, []).append({**r, "test_acc": m["test_acc_uncorrected"], "uncorrected_of": row})
    return out


def table(results: dict[str, list[dict]], rows: list[str]) -> str:
    def ms(vals):
        v = np.array([x for x in vals if x is not None], float)
        return f"{100 * v.mean():.2f} ± {100 * v.std(ddof=1 if len(v) > 1 else 0):.2f}" if len(v) else "-"

    lines = ["| row | CIFAR-10 test acc (%) | web val: agreement with teacher (%) | kept fraction (mean over epochs) "
             "| min per run | seeds |", "|---|---|---|---|---|---|"]
    for row in rows:
        rs = results.get(row, [])
        if not rs:
            continue
        lines.append(f"| {ROWS[row][0]} | {ms([r['test_acc'] for r in rs])} | {ms([r['val_agreement'] for r in rs])} | "
                     f"{np.mean([r['kept_fraction'] for r in rs]):.3f} | {np.mean([r['seconds'] for r in rs]) / 60:.1f} | "
                     f"{len(rs)} |")
    return "\n".join(lines)


# the comparisons, and the same at equal prior correction (both rows with it, or both without)
PAIRS = [("default", "vanilla_kd"), ("default", "vanilla_kd_pc"), ("default_nopc", "vanilla_kd"),
         ("default", "random_selection"), ("default", "random_selection_pc"), ("default_nopc", "random_selection"),
         ("default", "random_25"), ("default", "random_25_pc"), ("default_nopc", "random_25")]


def paired(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per-seed differences (points of CIFAR-10 test) over the seeds both rows have."""
    out = {}
    for a, b in PAIRS:
        ra = {r["seed"]: r["test_acc"] for r in results.get(a, [])}
        rb = {r["seed"]: r["test_acc"] for r in results.get(b, [])}
        seeds = sorted(set(ra) & set(rb))
        if seeds:
            d = [100 * (ra[s] - rb[s]) for s in seeds]
            out[f"{a} - {b}"] = {"seeds": seeds, "per_seed": [round(x, 2) for x in d], "mean": round(float(np.mean(d)), 2),
                                 "spread": round(float(np.std(d, ddof=1)) if len(d) > 1 else 0.0, 2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_all = time.time()
    weights, t_metrics = teacher(args)
    if args.teacher_only:
        print(f"teacher: {weights}: {t_metrics}")
        return {"teacher": t_metrics}
    if args.summary_only:
        results = recorded(args, weights)
    else:
        paths = write_data(args)
        results = run_rows(args, weights, paths)
    rows = args.rows.split(",")
    print("\n" + table(results, rows))
    any_run = next((r for row in rows if ROWS[row][2] == "web" for r in results.get(row, [])), None)
    print(f"\nteacher: CIFAR-10 test {100 * t_metrics['test_acc']:.2f}%"
          + (f", web val agreement n/a, query acc {100 * (any_run['teacher_val_acc'] or 0):.2f}%; student "
             f"parameters {any_run['parameters']:,}" if any_run else "")
          + f"; seeds {args.seeds}; epochs {args.epochs}; pool {args.pool_size}; total {(time.time() - t_all) / 60:.0f} min")
    command = " ".join(["python", "bench/cifar_tinyimagenet.py"] + argv)
    out = summarize(results, rows, {r: ROWS[r][1] for r in rows}, command)
    out["comparisons"] = paired(results)
    for name, c in out["comparisons"].items():
        print(f"{name}: {c['mean']:+.2f} points (per seed {', '.join(f'{d:+.2f}' for d in c['per_seed'])})")
    out["teacher"] = {k: t_metrics.get(k) for k in ("test_acc", "val_acc", "parameters")}
    out["settings"] = {"pool_size": args.pool_size, "epochs": args.epochs, "batch_size": args.batch_size,
                       "test_size": args.test_size or 10000}
    atomic_write_json(args.results, out)
    return out


if __name__ == "__main__":
    main()
