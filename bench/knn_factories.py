"""FAISS factories for the all-rows k-NN at scale (issue 13): time and recall@10 of several index
types over the same embeddings, to choose what `pipeline.index.choose_factory` builds past
`index.ivfpq_min`.

    OMP_NUM_THREADS=1 python bench/knn_factories.py --run bench/out/scale/runs/1000000-local \\
        --results bench/results/knn_factories.json

The embeddings are a run's feature cache (`features/<key>.npy`), centred and L2-normalised the
way its index holds them. For each factory: train on a seeded sample (40 vectors a list), add in
blocks of 65,536, then for each (nprobe, k_factor): recall@10 of 1,000 seeded rows against exact
search (`faiss.knn`), and the time of searching a seeded sample of `--timed` rows (k = 11: the
row itself and 10 neighbours, as `training.pool.neighbors_of` asks) scaled to all N rows. Fast-
scan PQ (`x4fs`) is built with L2 on the unit vectors (see `pipeline.index.metric_for`); the
`--ip-fast-scan` flag adds it with inner product too, to show why.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from webkd.pipeline.index import index_vectors, is_fast_scan, load_index_center  # noqa: E402
from webkd.pipeline.storage import atomic_write_json  # noqa: E402

# (factory, [(nprobe, k_factor), ...]); k_factor 0: not a re-ranking index
GRID = [
    ("IVF4000,Flat", [(16, 0), (8, 0)]),
    ("IVF4096,PQ64x4fs,RFlat", [(8, 4), (8, 8), (12, 8), (16, 8)]),
    ("IVF2048,PQ64x4fs,RFlat", [(8, 4), (10, 4), (12, 4)]),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory with features/<key>.npy and index/<key>.json")
    ap.add_argument("--key", default="cifar_teacher")
    ap.add_argument("--timed", type=int, default=50_000, help="rows searched for the time (scaled to all rows)")
    ap.add_argument("--results", default=None)
    ap.add_argument("--ip-fast-scan", action="store_true", help="also fast-scan PQ with inner product")
    args = ap.parse_args(argv)
    run = Path(args.run)
    emb = np.load(run / "features" / f"{args.key}.npy", mmap_mode="r")
    center = load_index_center(run / "index" / f"{args.key}.faiss")
    x = index_vectors(np.asarray(emb), center)
    n, d = x.shape
    rng = np.random.default_rng(0)
    qrows = np.sort(rng.choice(n, 1000, replace=False))
    _, gt = faiss.knn(x[qrows], x, 11, metric=faiss.METRIC_INNER_PRODUCT)
    timed = np.sort(rng.choice(n, min(n, args.timed), replace=False))
    grid = list(GRID) + ([("IVF2048,PQ64x4fs,RFlat/IP", [(8, 4), (16, 4)])] if args.ip_fast_scan else [])
    rows = []
    print(f"{n:,} x {d}, one search thread per process: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'factory':<30} {'metric':<6} {'nprobe':>6} {'k_fac':>5} {'train s':>8} {'add s':>6} "
          f"{'all-rows k-NN s':>15} {'recall@10':>9}")
    for spec, settings in grid:
        factory, _, forced = spec.partition("/")
        metric = faiss.METRIC_INNER_PRODUCT if forced == "IP" or not is_fast_scan(factory) else faiss.METRIC_L2
        index = faiss.index_factory(d, factory, metric)
        nlist = faiss.extract_index_ivf(index).nlist
        train = np.sort(rng.choice(n, min(n, nlist * 40), replace=False))
        t0 = time.perf_counter()
        index.train(x[train])
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for lo in range(0, n, 65536):
            index.add(x[lo:lo + 65536])
        add_s = time.perf_counter() - t0
        for nprobe, k_factor in settings:
            faiss.extract_index_ivf(index).nprobe = nprobe
            if k_factor:
                faiss.downcast_index(index).k_factor = k_factor
            _, ids = index.search(x[qrows], 11)
            recall = float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, gt)]))
            t0 = time.perf_counter()
            for lo in range(0, len(timed), 4096):
                index.search(x[timed[lo:lo + 4096]], 11)
            knn_s = (time.perf_counter() - t0) * n / len(timed)
            row = {"factory": factory, "metric": "L2" if metric == faiss.METRIC_L2 else "IP", "nprobe": nprobe,
                   "k_factor": k_factor or None, "train_s": round(train_s, 1), "add_s": round(add_s, 1),
                   "knn_all_rows_s": round(knn_s, 1), "recall_at_10": round(recall, 4)}
            rows.append(row)
            print(f"{factory:<30} {row['metric']:<6} {nprobe:>6} {k_factor or '-':>5} {train_s:>8.1f} {add_s:>6.1f} "
                  f"{knn_s:>15.1f} {recall:>9.4f}", flush=True)
    if args.results:
        atomic_write_json(Path(args.results), {
            "rows": rows, "n": int(n), "dim": int(d), "run": str(run), "timed_rows": int(len(timed)),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "faiss": faiss.__version__}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
