"""Incremental refresh vs full run, on the fashion-web pool, through the real Prefect flows.

The pool (clothing photos under their queries + PACS images as off-class queries, written as
JPEG files by pipeline.datasets.write_fashion_web) is split once, seeded: the "old" pool and
--new-fraction more images (new / old, default 10%) that arrive later. Teacher: the
Fashion-MNIST CNN of the demo (flows/demo.py, cached in .cache/teachers; trained if missing;
--teacher-width / --teacher-epochs pick a cheaper one).

Measured, all in one process against one temporary Prefect server (its start-up is reported
apart and in neither number):
  initial    distill flow on the old pool (curate stages + training from scratch): the champion
  refresh    the new files are added; refresh flow: ingest / embed only the new files, index,
             teacher selection, challenger warm-started from the champion for
             flows.refresh_epochs epochs, champion vs challenger on the same validation split,
             promotion if better, gallery
  full       distill flow on the final pool in a fresh run directory: what the refresh saves
  no-op      refresh flow again with nothing new
The ratio refresh / full is the cost of taking in +10% images incrementally (goal <= 0.2).

    .venv/bin/python bench/refresh.py                        # 20 epochs, refresh 2
    .venv/bin/python bench/refresh.py --epochs 10 --refresh-epochs 1 --pacs 600
"""
import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_HOME", str(ROOT / "bench" / "out" / "prefect"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from webkd.flows.prefect_env import local_defaults  # noqa: E402

local_defaults()  # Prefect settings, before Prefect is imported
from webkd.flows.distill import distill_flow  # noqa: E402
from webkd.flows.refresh import refresh_flow  # noqa: E402
from webkd.pipeline.report import pct  # noqa: E402
from webkd.pipeline import datasets  # noqa: E402
from webkd.pipeline.storage import atomic_write_json  # noqa: E402
from prefect import flow  # noqa: E402


@flow(name="webkd-bench-warmup")
def warmup() -> int:
    return 1


def task_times(flow_run_id) -> dict[str, float]:
    """Seconds per task name of one flow run (from the Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    out: dict[str, float] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    for r in runs:
        name = r.name.rsplit("-", 1)[0]
        secs = (r.end_time - r.start_time).total_seconds() if r.start_time and r.end_time else 0.0
        out[name] = out.get(name, 0.0) + secs
    return out


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    state = fn(*args, return_state=True, **kwargs)
    secs = time.perf_counter() - t0
    return state.result(), secs, task_times(state.state_details.flow_run_id)


def split_pool(web: Path, new_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in web.rglob("*") if p.is_file())
    rng = np.random.default_rng(seed)
    n_new = int(round(len(files) * new_fraction / (1 + new_fraction)))
    pick = set(rng.choice(len(files), n_new, replace=False).tolist())
    return [f for i, f in enumerate(files) if i not in pick], [f for i, f in enumerate(files) if i in pick]


def link_into(files: list[Path], src_root: Path, dst_root: Path) -> None:
    for f in files:
        dst = dst_root / f.relative_to(src_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.link(f, dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "refresh")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of a full run")
    ap.add_argument("--refresh-epochs", type=int, default=2, help="epochs of the warm-started challenger")
    ap.add_argument("--new-fraction", type=float, default=0.10, help="new images / old images")
    ap.add_argument("--pacs", type=int, default=1500, help="PACS images in the pool (off-class queries)")
    ap.add_argument("--clothing-fraction", type=float, default=1.0)
    ap.add_argument("--teacher-width", type=int, default=32, help="width of the cnn_fmnist teacher (demo: 32)")
    ap.add_argument("--teacher-epochs", type=int, default=4, help="its Fashion-MNIST epochs (demo: 4)")
    ap.add_argument("--onnx", action="store_true", help="also export ONNX in every run (as the demo config does)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = args.out
    data = out / "data"
    sc = datasets.write_fashion_web(data, pacs_images=args.pacs, clothing_fraction=args.clothing_fraction,
                                    write_test=False, seed=args.seed)
    old, new = split_pool(sc.web_dir, args.new_fraction, args.seed)
    for d in ("web", "run", "run_full"):
        shutil.rmtree(out / d, ignore_errors=True)
    link_into(old, sc.web_dir, out / "web")
    from webkd.flows.demo import train_fmnist_teacher

    teacher, teacher_metrics = train_fmnist_teacher(epochs=args.teacher_epochs, width=args.teacher_width)
    overrides = [f"data.sources=[folder:{out / 'web'}]", "data.test_source=null",
                 f"teachers.0.weights={teacher}", f"teachers.0.kwargs.width={args.teacher_width}",
                 f"train.epochs={args.epochs}",
                 f"flows.refresh_epochs={args.refresh_epochs}", f"export.onnx={str(args.onnx).lower()}",
                 f"seed={args.seed}"]
    config = str(ROOT / "flows" / "configs" / "fashion_web.yaml")
    run, full = [f"run_dir={out / 'run'}"], [f"run_dir={out / 'run_full'}"]

    t0 = time.perf_counter()
    warmup()
    t_server = time.perf_counter() - t0
    r_init, t_init, _ = timed(distill_flow, config, overrides + run)
    link_into(new, sc.web_dir, out / "web")
    r_ref, t_ref, tasks_ref = timed(refresh_flow, config, overrides + run)
    r_full, t_full, tasks_full = timed(distill_flow, config, overrides + full)
    r_noop, t_noop, _ = timed(refresh_flow, config, overrides + run)

    ratio = t_ref / t_full
    rows = [
        ("images: old pool / new / final", f"{len(old)} / {len(new)} / {len(old) + len(new)}"),
        ("initial distill flow (old pool, from scratch)", f"{t_init:.1f} s"),
        ("**full run** (final pool, from scratch)", f"**{t_full:.1f} s**"),
        ("**incremental refresh** (+new images)", f"**{t_ref:.1f} s**"),
        ("**refresh / full**", f"**{ratio:.3f}**"),
        ("no-op refresh (nothing new)", f"{t_noop:.1f} s ({t_noop / t_full:.3f} of full)"),
        ("refresh: records ingested / rows embedded", f"{r_ref['new_records']} / {r_ref['computed']}"),
        ("refresh: challenger", f"{r_ref['version']} ({args.refresh_epochs} epochs, {r_ref['warm_note']})"),
        (f"refresh: {r_ref['metric']} champion / challenger (same {r_ref['validation_rows']} validation rows)",
         f"{pct(r_ref['champion_score'])} / {pct(r_ref['challenger_score'])}"),
        ("refresh: decision", r_ref["decision"]),
        ("full run: validation agreement with the teacher / accuracy on query labels",
         f"{pct(r_full['val_agreement'])} / {pct(r_full['val_acc'])}"),
        ("teacher: cnn_fmnist width / FMNIST epochs / FMNIST test acc",
         f"{args.teacher_width} / {args.teacher_epochs} / {pct(teacher_metrics.get('test_acc'))}"),
        ("no-op: trained / stages with nothing to do", f"{r_noop['trained']} / {', '.join(r_noop['up_to_date'])}"),
        ("Prefect temporary server start (in neither number)", f"{t_server:.1f} s"),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    stage_rows = sorted(set(tasks_ref) | set(tasks_full))
    lines += ["", "| task | refresh s | full s |", "|---|---:|---:|"]
    lines += [f"| {k} | {tasks_ref.get(k, 0):.1f} | {tasks_full.get(k, 0):.1f} |" for k in stage_rows]
    table = "\n".join(lines)
    print(table)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {load[0]:.1f} at the end, "
               f"Python {platform.python_version()}")
    print(f"\nmachine: {machine}\ncommand: {' '.join(['.venv/bin/python', 'bench/refresh.py'] + sys.argv[1:])}")
    atomic_write_json(out / "refresh.json", {
        "args": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "old": len(old), "new": len(new),
        "seconds": {"server": t_server, "initial": t_init, "refresh": t_ref, "full": t_full, "noop": t_noop},
        "ratio": ratio, "tasks_refresh": tasks_ref, "tasks_full": tasks_full,
        "refresh": {k: v for k, v in r_ref.items() if k != "summary"},
        "full": {k: v for k, v in r_full.items() if k != "summary"}, "noop": r_noop})
    return 0 if ratio <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
