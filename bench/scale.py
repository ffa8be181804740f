"""The scale benchmark (issue 13, item 5): how each curation stage's cost grows with the pool size N,
for the one-process runner and for Dask, and what a +10% refresh costs at the largest N.

    .venv/bin/python bench/scale.py --sizes 10000 100000 1000000 --runners local dask --refresh
    # a check at small N (IVF-PQ reached through an override, which the results' setup records):
    .venv/bin/python bench/scale.py --sizes 2000 6000 --runners local dask --refresh \\
        --set index.ivfpq_min=1000 --out bench/out/scale_small --results bench/out/scale_small/scale.json

The index stage's near-duplicate search (pixel thumbnails, 768 dims, pipeline/near_dup.py) is an
exact k-NN up to `index.near_dup_exact_max` candidates (20,000) and an IVF{~2 sqrt N},SQ8 search past
it; a refresh searches and groups only the new rows. `--set index.near_dup_threshold=null`
measures everything else without it (the override is recorded in the results' setup).
`--encoder`: the shipped, trained CIFAR-10 teacher by default (realistic D = 128 embeddings, so
recall@10 means something); `--encoder cnn_tiny` is the smallest project encoder (D = 16, random
weights) for a cheaper feature stage. The stage is the same code a GPU user runs with a big encoder.

The pool (generated once, reported apart, never counted as ingest)
-----------------------------------------------------------------
Real photos from ../shared/data: Tiny ImageNet (60,600) and CIFAR-10 (train + test, 60,000), B =
120,600 bases in one seeded order. Pool image g (0, 1, 2, ...) is base perm[g mod B], copy c = g // B.
Copy 0 is the stored JPEG file as it is; copy c >= 1 is the base decoded, shifted by 1 or 2 px
(edge-padded) with a brightness step of 0 or +-6 (variant (c - 1 + base) mod 72, so the copies
of one base are all different) and re-encoded (JPEG q90): every image has its own bytes, so
ingest's content hash keeps all of them (no exact duplicates), and the decoded pixels differ.
What near-duplicate detection (index stage, `index.near_dup_space: pixels`, standardised 16 px
thumbnails, cosine >= 0.99) then does with them, measured on 300 Tiny ImageNet photos: a 1 px
shift keeps a median thumbnail cosine of 0.946 (1% of copies reach 0.99), 2 px or a diagonal
shift 0.72..0.89, so the copies are NOT marked near_duplicate (a brightness step alone would be:
the thumbnails are standardised, 0.9998); they stay rows of their own, like re-cropped
re-uploads. Up to 120,600 images the pool has no copies at all; at 1M each base appears about
8 times, so a row's exact 10 nearest neighbours in embedding space are mostly its own shifted
copies: recall@10 at 1M is measured on such a pool (more redundant than 1M distinct photos).

Images are written the way img2dataset writes them: uncompressed tar shards of
`--shard-images` samples (`<key>.jpg`, `<key>.txt` caption, `<key>.json` metadata) with a
per-shard `<shard>.parquet` (key, url, caption, label, status, ...). A pool of N is the
first N / shard-images shards (`wds:<pool>/{00000..0000k}.tar`); a larger N reuses the
smaller one's shards, so each shard is generated once (deterministic from --seed; its
generation time is kept in `pool.json`). The +10% refresh adds the next shards as a second
source (a new crawl), the first source's spelling unchanged so ingest sees its entries as
unchanged.

What is measured (each stage in its own process: peak RSS = VmHWM, plus the peak of anonymous
memory sampled every 0.2 s, which leaves out the memory-mapped cache pages RSS also counts)
--------------------------------------------------------------------------------------------
For each size N and runner, in `<out>/runs/<N>-<runner>/`, with the library's stage functions
(`flows/stages/curate.py`, the code the CLI and the flows run):
  ingest    list the shards, read, hash, decode, validate, merge into the manifest (images/s over
            the entries read: all of them in a full run, the new ones in a refresh)
  pixels    the decoded pixel cache (`pipeline/pixels.py`; not sharded: it runs in the flow's own
            process whatever the runner)
  features  the encoder over the pixel cache (`--encoder`), embeddings + logits cached
  index     the index stage: FAISS index over the embeddings (IVF-PQ from `index.ivfpq_min` on,
            library default 1M), recall@10 against brute force on `index.recall_queries` sampled
            rows (library default 1000), then the near-duplicate marks (the k nearest neighbours of
            every candidate row in thumbnail space; of the new rows only in a refresh). Its time is
            split into build (train + fill), recall check, near-duplicate search (near_dup: of it,
            near_dup_vectors computing the thumbnails) and the rest (manifest reads / writes, marks)
  query     k = 10 search of `--queries` sampled rows against the saved index (batched), and the
            latency of 200 single-row searches
  knn       the k nearest neighbours of every row through the saved index (`training.pool.
            neighbors_of`, what `selection.knn` and the relevance k-NN term use): the all-rows
            k-NN over N x D embeddings
Runners: `local` = the library's one-process runner (`local_map`, what `webkd curate --no-flow`
and the CLI verbs run; no Prefect). `dask` = the curate flow's own Prefect tasks
(`flows/curate.py` ingest / features, shards mapped with `.map`) in a Prefect flow on
`flows.task_runner=dask`: a LocalCluster of `--workers` single-threaded worker processes (the
README's "More than one machine"), against one temporary Prefect server the bench starts (its
start is not counted; the cluster start is, as `cluster_s`, outside the stage seconds). Only
the sharded stages (ingest, features) differ between runners: dask reuses the local run's pixel
cache when both manifests hold the same ids (hard link, checked by the library), and the index,
query and knn stages are measured once (local). `flow` = the same Prefect flow with the default
(thread-pool) task runner, to separate Prefect's own cost from Dask's. Threads: the local runner
uses torch's and FAISS's defaults (all cores unless OMP_NUM_THREADS says otherwise); Dask workers
run one thread each. Each row records its threads and the machine's load average.

Refresh (`--refresh`, at the largest N, local runner): the run directory of the full run is
snapshotted (hard links: the library replaces every run file atomically, never in place), the
next N/10 images arrive as new shards, and ingest, pixels, features and index run again (the
index is extended with only the new rows); their total is compared with the full run's
(ingest + pixels + features + index at N).

Resumable: every (size, runner, phase, stage) row goes into `--results` (atomically) as soon as
it is measured; a re-run skips recorded rows, and a killed stage resumes where the library's
caches allow (ingest and feature shard files are kept; the pixel cache and the index restart);
such a row says `resumed`. Results of another setup (encoder, --set overrides, seed, shard size,
...) are refused: use --fresh (deletes the recorded rows and run directories, keeps the pools).

Output: a markdown table (size, runner, stage, seconds, images/s, peak MB), the growth of each
stage's time with N (log-log slope), where the time goes per size, the refresh ratio;
`--results` (rows, command, commit, machine, setup, summary) and a log-log plot beside it
(`scale.png`: seconds vs N per stage).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # shared cores: OpenMP threads yield, not spin

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_PREPROCESS = {"size": 32, "channels": 3, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
# --encoder: the project encoders (training/archs.py). cifar_teacher is the shipped, trained CIFAR-10
# teacher (D = 128); the others are seeded random initialisations saved once under <out>/encoders/
# (the same weights in every process, so Dask workers and the flow agree on the fingerprint).
ENCODERS = {
    "cifar_teacher": {"name": "resnet_narrow", "kwargs": {"width": 16}, "weights": "flows/assets/cifar_teacher.safetensors",
                      "about": "resnet_narrow width 16, 0.70M parameters, the shipped CIFAR-10 teacher, D = 128"},
    "cnn_small": {"name": "cnn_small", "kwargs": {"width": 32}, "weights": None,
                  "about": "cnn_small width 32, 0.13M parameters, seeded random weights, D = 96"},
    "cnn_tiny": {"name": "cnn_tiny", "kwargs": {}, "weights": None,
                 "about": "cnn_tiny, the smallest project encoder: 3,050 parameters, seeded random weights, D = 16"},
}
STAGES = ("ingest", "pixels", "features", "index", "query", "knn")
SHARDED = ("ingest", "pixels", "features")           # what a non-local runner measures
REFRESH_STAGES = ("ingest", "pixels", "features", "index")
FULL_RUN = ("ingest", "pixels", "features", "index")  # the curation stages a refresh is compared with
VARIANTS = [(dx, dy, db) for db in (0, -6, 6) for dx in range(-2, 3) for dy in range(-2, 3) if (dx, dy) != (0, 0)]
TAR_MTIME = 1_700_000_000                               # fixed: a regenerated shard has the same bytes


# ============================================================================================
# small helpers
# ============================================================================================
def _rss_mb(field: str, pid: int | str = "self") -> float:
    """A VmRSS-like field of /proc/<pid>/status in MB (0 where unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemSampler:
    """Peak anonymous memory (RssAnon: heap and arrays, not the file pages of memory-mapped caches
    that RSS also counts) of this process, sampled every `every` seconds in a daemon thread; with
    `tree` also of its descendants (Dask workers): the largest worker's RSS and anonymous memory,
    and the anonymous memory of the whole tree."""

    def __init__(self, tree: bool = False, every: float = 0.2):
        self.tree, self.every = tree, every
        self.peak_self = self.peak_tree = self.peak_worker_anon = self.peak_worker_rss = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        own = _rss_mb("RssAnon")
        self.peak_self = max(self.peak_self, own)
        if self.tree:
            try:
                import psutil

                kids = [p.pid for p in psutil.Process().children(recursive=True)]
            except Exception:  # psutil missing, or a process gone meanwhile
                kids = []
            anon = [_rss_mb("RssAnon", k) for k in kids]
            self.peak_worker_anon = max([self.peak_worker_anon] + anon)
            self.peak_worker_rss = max([self.peak_worker_rss] + [_rss_mb("VmRSS", k) for k in kids])
            self.peak_tree = max(self.peak_tree, own + sum(anon))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> "MemSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


def _atomic_json(path: Path, obj: Any) -> None:
    from webkd.pipeline.storage import atomic_write_json

    atomic_write_json(path, obj)


def _read_json(path: Path, default: Any = None) -> Any:
    from webkd.pipeline.storage import read_json

    try:
        return read_json(path, default=default)
    except ValueError:               # a damaged file (it is written atomically: only by hand)
        return default


def machine() -> dict[str, Any]:
    """Cores, RAM, CPU model, load average, Python: what the numbers were measured on."""
    model, mem_gb = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
        with open("/proc/meminfo") as fh:
            mem_gb = round(int(next(ln for ln in fh if ln.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cores": os.cpu_count(), "ram_gb": mem_gb, "cpu": model, "platform": platform.platform(),
            "python": platform.python_version(), "load_average": [round(x, 2) for x in load],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "nice": os.nice(0) if hasattr(os, "nice") else None}


def git_commit() -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from summary import git_commit as commit

    return commit()


# ============================================================================================
# the pool: real photos + cheap per-copy changes, img2dataset-style tar shards + Parquet
# ============================================================================================
class Bases:
    """The B = 120,600 real JPEG files (Tiny ImageNet, CIFAR-10 train, CIFAR-10 test) in one seeded order."""

    def __init__(self, seed: int):
        import numpy as np

        from webkd.pipeline import datasets

        tiny = np.load(datasets.find_file(datasets.TINYIMAGENET_FILE))
        cifar = np.load(datasets.find_file(datasets.CIFAR10_FILE))
        tnames = [str(c) for c in tiny["class_names"]]
        cnames = [str(c) for c in cifar["class_names"]]
        self.parts = [("tinyimagenet", tiny["jpeg"], tiny["offsets"], [tnames[i] for i in tiny["labels"]]),
                      ("cifar10-train", cifar["train_jpeg"], cifar["train_offsets"],
                       [cnames[i] for i in cifar["train_labels"]]),
                      ("cifar10-test", cifar["test_jpeg"], cifar["test_offsets"], [cnames[i] for i in cifar["test_labels"]])]
        self.starts = np.cumsum([0] + [len(p[2]) - 1 for p in self.parts])
        self.n = int(self.starts[-1])
        self.perm = np.random.default_rng(seed).permutation(self.n)

    def base(self, b: int) -> tuple[str, int, bytes, str]:
        """(data set, index in it, JPEG bytes, label) of base b (after the seeded permutation)."""
        import numpy as np

        j = int(self.perm[b])
        part = int(np.searchsorted(self.starts, j, side="right") - 1)
        name, buf, off, labels = self.parts[part]
        i = j - int(self.starts[part])
        return name, i, buf[off[i]:off[i + 1]].tobytes(), labels[i]


def variant(jpeg: bytes, copy: int, base: int) -> bytes:
    """Copy `copy` >= 1 of a base image: shifted by (dx, dy) px (edge-padded) and brightened by db,
    re-encoded as JPEG q90; distinct for every copy < 73 of one base."""
    import numpy as np
    from PIL import Image

    if copy > len(VARIANTS):
        raise ValueError(f"copy {copy} of a base: more than {len(VARIANTS) + 1} copies per base are not distinct")
    dx, dy, db = VARIANTS[(copy - 1 + base) % len(VARIANTS)]
    a = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.int16)
    h, w = a.shape[:2]
    p = np.pad(a, ((2, 2), (2, 2), (0, 0)), mode="edge")[2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
    out = io.BytesIO()
    Image.fromarray(np.clip(p + db, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def shard_name(i: int) -> str:
    return f"{i:05d}"


def write_shard(pool: Path, i: int, k: int, bases: Bases) -> dict[str, Any]:
    """Shard i of the pool: images [i*k, (i+1)*k) as an img2dataset tar + Parquet, written atomically."""
    import tarfile

    import pyarrow as pa

    from webkd.pipeline.storage import atomic_path, atomic_write_table

    t0 = time.perf_counter()
    rows: dict[str, list] = {c: [] for c in ("key", "url", "caption", "label", "status", "error_message", "width",
                                             "height", "base", "copy")}
    members: list[tuple[str, bytes]] = []
    for g in range(i * k, (i + 1) * k):
        b, c = g % bases.n, g // bases.n
        name, idx, jpeg, label = bases.base(b)
        data = jpeg if c == 0 else variant(jpeg, c, b)
        key = f"{g:010d}"
        url = f"https://example.invalid/{name}/{idx}.jpg" + (f"?copy={c}" if c else "")
        caption = f"a photo of a {label}"
        meta = {"key": key, "url": url, "caption": caption, "label": label, "status": "success",
                "width": 32, "height": 32, "base": f"{name}/{idx}", "copy": c}
        members += [(f"{key}.jpg", data), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
        for col, v in (("key", key), ("url", url), ("caption", caption), ("label", label), ("status", "success"),
                       ("error_message", None), ("width", 32), ("height", 32), ("base", f"{name}/{idx}"), ("copy", c)):
            rows[col].append(v)
    stem = pool / shard_name(i)
    atomic_write_table(stem.with_suffix(".parquet"), pa.table(rows))
    with atomic_path(stem.with_suffix(".tar"), suffix=".tar") as tmp, \
            tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            tf.addfile(info, io.BytesIO(data))
    return {"seconds": round(time.perf_counter() - t0, 3), "images": k,
            "bytes": stem.with_suffix(".tar").stat().st_size + stem.with_suffix(".parquet").stat().st_size}


def make_encoder(name: str, path: Path, seed: int) -> None:
    import torch

    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.training.models import build_model, save_weights

    enc = ENCODERS[name]
    torch.manual_seed(seed)
    spec = ModelSpec(name=enc["name"], kwargs=enc["kwargs"], preprocess=PreprocessSpec(**CIFAR_PREPROCESS))
    save_weights(build_model(spec, len(CIFAR10_CLASSES)), path)


def child_generate(pool: Path, k: int, n_shards: int, seed: int) -> dict[str, Any]:
    """Generate the missing shards 0..n_shards-1; each is recorded in pool.json once written."""
    meta_path = pool / "pool.json"
    meta = _read_json(meta_path) or {"seed": seed, "shard_images": k, "shards": {}}
    todo = [i for i in range(n_shards) if shard_name(i) not in meta["shards"]
            or not (pool / f"{shard_name(i)}.tar").exists()]
    if todo:
        bases = Bases(seed)
        meta["bases"] = {name: len(off) - 1 for name, _, off, _ in bases.parts}
        for i in todo:
            meta["shards"][shard_name(i)] = write_shard(pool, i, k, bases)
            _atomic_json(meta_path, meta)
    peak = _rss_mb("VmHWM")
    meta["peak_mb"] = max(float(meta.get("peak_mb", 0.0)), peak) if todo else meta.get("peak_mb", peak)
    _atomic_json(meta_path, meta)
    return {"generated": len(todo), "peak_mb": peak}


def wds_source(pool: Path, lo: int, hi: int) -> str:
    """The `wds:` source of shards lo..hi-1."""
    return f"wds:{pool}/{{{shard_name(lo)}..{shard_name(hi - 1)}}}.tar"


# ============================================================================================
# stage children: one process per stage, peak memory of that stage alone
# ============================================================================================
def _mem(sampler: MemSampler, base_mb: float) -> dict[str, Any]:
    """peak_mb: this process's peak RSS (VmHWM: of this program only; `ru_maxrss` would carry the
    parent's RSS at fork across exec); anon_peak_mb: sampled peak of anonymous memory; base_mb: RSS
    after the imports, before the stage."""
    out = {"peak_mb": round(_rss_mb("VmHWM"), 1), "anon_peak_mb": round(sampler.peak_self, 1), "base_mb": round(base_mb, 1)}
    if sampler.tree:
        out.update(tree_anon_peak_mb=round(sampler.peak_tree, 1), worker_anon_peak_mb=round(sampler.peak_worker_anon, 1),
                   worker_peak_mb=round(sampler.peak_worker_rss, 1))
    return out


def _shard_files(root: Path, prefix: str) -> int:
    d = root / "shards"
    return sum(1 for s in d.glob(f"{prefix}*") for f in s.iterdir()) if d.exists() else 0


def _threads() -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "faiss" in sys.modules:
        out["faiss_threads"] = sys.modules["faiss"].omp_get_max_threads()
    return out


def stage_flow_factory():
    """A Prefect flow that runs one curate-flow stage task (flows/curate.py) on the config's runner."""
    from prefect import flow

    from webkd.flows import curate as cf
    from webkd.pipeline.config import load_config

    @flow(name="webkd-bench-scale", log_prints=True)
    def stage_flow(config_path: str, overrides: list[str], stage: str) -> dict[str, Any]:
        cfg = load_config(config_path, overrides)
        t0 = time.perf_counter()
        if stage == "ingest":
            rep = cf.run_stage(cf.ingest_task, cfg, "ingest")
            out = {"images": rep.new, "listed": rep.seen, "records": rep.total_records, "kept": rep.kept,
                   "quarantined": rep.n_quarantined, "up_to_date": rep.up_to_date}
        else:
            feats = cf.run_stage(cf.features_task, cfg, "features")
            (key, fs), = feats.items()
            out = {"images": fs.computed, "rows": fs.rows, "dim": fs.dim, "up_to_date": fs.computed == 0}
        out["seconds"] = time.perf_counter() - t0
        return out

    return stage_flow


def _ingest(cfg: Any, runner: str, config_path: str, overrides: list[str]) -> dict[str, Any]:
    resumed = _shard_files(cfg.paths.root, "ingest") > 0
    if runner == "local":
        from webkd.flows.stages import curate as stages

        t0 = time.perf_counter()
        rep = stages.ingest(cfg)
        return {"seconds": time.perf_counter() - t0, "images": rep.new, "listed": rep.seen, "records": rep.total_records,
                "kept": rep.kept, "quarantined": rep.n_quarantined, "up_to_date": rep.up_to_date, "resumed": resumed}
    return {**_flow(cfg, config_path, overrides, "ingest"), "resumed": resumed}


def _flow(cfg: Any, config_path: str, overrides: list[str], stage: str) -> dict[str, Any]:
    """Run one stage in the bench's Prefect flow on cfg.flows' task runner; `cluster_s` is what the
    flow call took beyond the stage itself (task runner / cluster start and stop, flow run records)."""
    from webkd.flows.prefect_env import local_defaults

    local_defaults()
    import logging

    from webkd.flows.runners import with_task_runner

    logging.getLogger("httpx").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    out = with_task_runner(stage_flow_factory(), cfg)(config_path=config_path, overrides=overrides, stage=stage)
    out["cluster_s"] = round(time.perf_counter() - t0 - out["seconds"], 2)
    return out


def _pixels(cfg: Any, reuse: str | None) -> dict[str, Any]:
    from webkd.flows.stages import curate as stages
    from webkd.pipeline.pixels import pixel_meta_path
    from webkd.pipeline.records import load_manifest
    from webkd.pipeline.storage import ids_sha256

    path = cfg.paths.pixels(cfg.data.image_size, cfg.data.fit)
    out: dict[str, Any] = {}
    if reuse and not path.exists():          # the local run's cache of the same size and fit
        src = Path(reuse) / path.relative_to(cfg.paths.root)
        sm = _read_json(pixel_meta_path(src)) or {}
        ids = [r.id for r in load_manifest(cfg.paths.manifest)]
        if src.exists() and sm.get("ids_sha256") == ids_sha256(ids):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(pixel_meta_path(src), pixel_meta_path(path))
            os.link(src, path)
            out["reused"] = str(src)
    before = (_read_json(pixel_meta_path(path)) or {}).get("rows", 0) if path.exists() else 0
    t0 = time.perf_counter()
    records = load_manifest(cfg.paths.manifest)
    pix = stages.pixels(cfg, records)
    out.update(seconds=time.perf_counter() - t0, images=len(pix) - before, rows=len(pix),
               up_to_date=before == len(pix), failed=int(sum(r.status == "source_missing" for r in records)),
               cache_mb=round(path.stat().st_size / 2**20, 1))
    return out


def _forward_rate(cfg: Any) -> float:
    """Pure forward images/s of the encoder on random tensors of one batch (after a warm-up)."""
    import torch

    from webkd.flows.stages import curate as stages
    from webkd.pipeline.features import resolve_device

    dev = resolve_device(cfg.device)
    (_, model, _), = stages.build_teachers(cfg, str(dev))
    x = torch.rand(cfg.features.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=dev)
    with torch.inference_mode():
        model(x)
        t0, reps = time.perf_counter(), 0
        while reps < 3 or time.perf_counter() - t0 < 1.0:
            model(x)
            reps += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return reps * len(x) / (time.perf_counter() - t0)


def _features(cfg: Any, runner: str, config_path: str, overrides: list[str]) -> dict[str, Any]:
    import torch

    from webkd.flows.stages import curate as stages
    from webkd.pipeline.features import resolve_device

    resumed = _shard_files(cfg.paths.root, "features") > 0
    if runner == "local":
        t0 = time.perf_counter()
        feats = stages.features(cfg)
        (key, fs), = feats.items()
        out = {"seconds": time.perf_counter() - t0, "images": fs.computed, "rows": fs.rows, "dim": fs.dim,
               "up_to_date": fs.computed == 0}
    else:
        out = _flow(cfg, config_path, overrides, "features")
    out.update(resumed=resumed, device=str(resolve_device(cfg.device)), forward_ips=round(_forward_rate(cfg), 1),
               torch_threads=torch.get_num_threads())
    return out


def _index(cfg: Any) -> dict[str, Any]:
    """The index stage (`flows.stages.curate.index`), its time split by wrapping the library
    functions it calls (timers only: the calls and their arguments are the stage's own)."""
    import faiss

    import webkd.pipeline.index_stage as ist
    from webkd.flows.stages import curate as stages
    from webkd.pipeline import near_dup

    parts: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    for mod, name, part in ((ist, "build_blocked", "build"), (ist, "extend", "fill"), (ist, "sampled_recall", "recall"),
                            (ist, "perceptual_vectors", "near_dup_vectors"),
                            (near_dup, "group", "near_dup"), (ist, "load_manifest", "manifest_io"),
                            (ist, "save_manifest", "manifest_io"), (ist, "save_quarantine", "manifest_io"),
                            (ist, "load_quarantine", "manifest_io"), (stages, "load_manifest", "manifest_io"),
                            (stages, "decontaminate", "decontaminate"),
                            (stages, "pixels", "pixel_cache_check")):
        setattr(mod, name, timed(part, getattr(mod, name)))
    t0 = time.perf_counter()
    rep = stages.index(cfg)
    seconds = time.perf_counter() - t0
    known = parts.get("build", 0.0) + (parts.get("fill", 0.0) if "build" not in parts else 0.0)
    split = {k: round(v, 3) for k, v in parts.items()}
    nested = ("build", "fill", "near_dup_vectors")       # the thumbnails are computed inside near_dup
    split["other"] = round(seconds - known - sum(v for k, v in parts.items() if k not in nested), 3)
    recall = rep.recall or {}
    return {"seconds": seconds, "images": rep.rows, "rows": rep.rows, "dim": rep.dim, "factory": rep.factory,
            "action": rep.action, "added": rep.added, "up_to_date": rep.up_to_date,
            "recall_at_10": recall.get("recall_at_10"), "recall_queries": recall.get("queries"),
            "nprobe": recall.get("nprobe", cfg.index.nprobe), "near_dup_space": cfg.index.near_dup_space,
            "near_dup_threshold": cfg.index.near_dup_threshold, "near_duplicates": rep.near_duplicates,
            "candidates": rep.candidates, "index_mb": round(rep.path.stat().st_size / 2**20, 1),
            "split_s": split, "faiss_threads": faiss.omp_get_max_threads()}


def _query(cfg: Any, n_queries: int, seed: int) -> dict[str, Any]:
    import faiss
    import numpy as np

    from webkd.flows.stages.curate import index_key
    from webkd.pipeline.index import index_nprobe, index_vectors, load_index, load_index_center, search

    key = index_key(cfg)
    path = cfg.paths.index(key)
    t0 = time.perf_counter()
    index = load_index(path, nprobe=cfg.index.nprobe, mmap_over_mb=cfg.index.mmap_budget_mb)
    load_s = time.perf_counter() - t0
    emb = np.load(cfg.paths.features(key), mmap_mode="r")
    rows = np.sort(np.random.default_rng(seed + 1).choice(len(emb), min(len(emb), n_queries), replace=False))
    q = index_vectors(emb[rows], load_index_center(path))
    k = min(10, len(emb))
    t0 = time.perf_counter()
    _, ids = search(index, q, k, cfg.index.block_size)
    seconds = time.perf_counter() - t0
    singles = q[:200]
    t0 = time.perf_counter()
    for i in range(len(singles)):
        search(index, singles[i:i + 1], k)
    single_ms = 1000 * (time.perf_counter() - t0) / max(1, len(singles))
    self_hit = float(np.mean(ids[:, 0] == rows))
    return {"seconds": seconds, "images": len(rows), "queries": int(len(rows)), "k": k, "load_s": round(load_s, 3),
            "single_query_ms": round(single_ms, 3), "self_top1": round(self_hit, 4), "nprobe": index_nprobe(index),
            "rows": int(len(emb)), "faiss_threads": faiss.omp_get_max_threads()}


def _knn(cfg: Any) -> dict[str, Any]:
    import faiss

    from webkd.flows.stages.curate import index_key
    from webkd.training.pool import NeighborSearch, neighbors_of

    # the neighbour search curate's `pool()` builds (flows/stages/curate.py)
    search = NeighborSearch(index_key(cfg), cfg.selection.knn.k, cfg.index.nprobe, cfg.index.block_size,
                            cfg.index.mmap_budget_mb)
    from webkd.pipeline.index import index_meta_path, resolve_nprobe
    from webkd.pipeline.storage import read_json

    t0 = time.perf_counter()
    nb = neighbors_of(cfg.paths, search)
    seconds = time.perf_counter() - t0
    factory = (read_json(index_meta_path(cfg.paths.index(search.encoder)), default=None) or {}).get("factory") or ""
    return {"seconds": seconds, "images": int(len(nb)), "rows": int(len(nb)), "k": search.k, "factory": factory,
            "nprobe": search.nprobe if search.nprobe is not None else resolve_nprobe(cfg.index, factory),
            "faiss_threads": faiss.omp_get_max_threads()}


def run_child(job: dict[str, Any]) -> None:
    """Body of `--child JSON`: one stage, its result written atomically to job['result']."""
    if job["stage"] == "encoder":
        make_encoder(job["encoder"], Path(job["path"]), job["seed"])
        _atomic_json(Path(job["result"]), {"path": job["path"]})
        return
    if job["stage"] == "generate":
        with MemSampler() as sampler:
            base = _rss_mb("VmRSS")
            out = child_generate(Path(job["pool"]), job["shard_images"], job["shards"], job["seed"])
        out.update(_mem(sampler, base))
        _atomic_json(Path(job["result"]), out)
        return
    from webkd.pipeline.config import load_config

    cfg = load_config(job["config"], job["overrides"])
    runner, stage = job["runner"], job["stage"]
    with MemSampler(tree=runner != "local") as sampler:
        base = _rss_mb("VmRSS")
        if stage == "ingest":
            out = _ingest(cfg, runner, job["config"], job["overrides"])
        elif stage == "pixels":
            out = _pixels(cfg, job.get("reuse_pixels"))
        elif stage == "features":
            out = _features(cfg, runner, job["config"], job["overrides"])
        elif stage == "index":
            out = _index(cfg)
        elif stage == "query":
            out = _query(cfg, job["queries"], job["seed"])
        elif stage == "knn":
            out = _knn(cfg)
        else:
            raise ValueError(f"unknown stage {stage!r}")
    out.update(_mem(sampler, base))
    out.update({k: v for k, v in _threads().items() if k not in out})
    out["seconds"] = round(out["seconds"], 3)
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]    # other work on the machine meanwhile
    _atomic_json(Path(job["result"]), out)


# ============================================================================================
# the parent: pools, configs, stages in order, results
# ============================================================================================
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.results_path = Path(args.results).resolve()
        self.plot_path = Path(args.plot).resolve() if args.plot else self.results_path.with_suffix(".png")
        self.results_recorded = {} if args.fresh else (_read_json(self.results_path) or {})
        self.k = shard_images(args, self.results_recorded.get("setup"))
        self.pool = self.out / f"pool-s{args.seed}-k{self.k}"
        self.setup = {"encoder": args.encoder, "encoder_about": ENCODERS[args.encoder]["about"],
                      "overrides": list(args.set), "seed": args.seed, "shard_images": self.k, "queries": args.queries,
                      "workers": args.workers, "image_size": 32, "pool": str(self.pool)}
        self.server: Any = None
        self.failed: list[str] = []
        self.results: dict[str, Any] = {}

    # ---------------------------------------------------------------- results
    def load(self) -> None:
        if self.args.fresh:
            for d in ("runs", "measured", "configs", "logs"):
                shutil.rmtree(self.out / d, ignore_errors=True)
            (self.out / "setup.json").unlink(missing_ok=True)
            self.results_path.unlink(missing_ok=True)
        res = self.results_recorded
        for where, setup in (("results " + str(self.results_path), res.get("setup")),
                             ("run directories " + str(self.out), _read_json(self.out / "setup.json"))):
            if setup is not None and setup != self.setup:
                diff = {k: (setup.get(k), v) for k, v in self.setup.items() if setup.get(k) != v}
                raise SystemExit(f"the {where} were measured with another setup ({diff}, recorded vs now): "
                                 "pass the same options, or --fresh to start again, or another --out / --results")
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.out / "setup.json", self.setup)
        self.results = {"rows": res.get("rows", []), "setup": self.setup, "commands": res.get("commands", [])}
        cmd = "python bench/scale.py " + " ".join(self.argv)
        if cmd not in self.results["commands"]:
            self.results["commands"].append(cmd)
        self.results["command"] = cmd

    def row(self, size: int, runner: str, phase: str, stage: str) -> dict | None:
        return next((r for r in self.results["rows"] if (r["size"], r["runner"], r["phase"], r["stage"]) ==
                     (size, runner, phase, stage)), None)

    def record(self, row: dict[str, Any]) -> None:
        self.results["rows"] = [r for r in self.results["rows"] if (r["size"], r["runner"], r["phase"], r["stage"]) !=
                                (row["size"], row["runner"], row["phase"], row["stage"])] + [row]
        self.save()

    def save(self) -> None:
        self.results.update(commit=self.commit, machine=machine(), summary=summarize(self.results["rows"]))
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.results_path, self.results)

    # ---------------------------------------------------------------- children
    def child(self, job: dict[str, Any], log_name: str) -> dict[str, Any] | None:
        """Run one stage process; its result dict, or None when it failed (the log's tail is printed)."""
        log = self.out / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.server is not None:
            env["PREFECT_API_URL"] = self.server.api_url
        t0 = time.perf_counter()
        with open(log, "ab") as fh:
            fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(job)}\n".encode())
            fh.flush()
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
        wall = time.perf_counter() - t0
        res = _read_json(Path(job["result"])) if rc == 0 else None
        if res is None:
            tail = log.read_text(errors="replace")[-2500:]
            print(f"  ! {log_name} failed (exit {rc}); log {log}:\n{tail}", flush=True)
            self.failed.append(log_name)
            return None
        res["process_s"] = round(wall, 2)
        return res

    # ---------------------------------------------------------------- pool and configs
    def ensure_pool(self, n_images: int, size: int, phase: str) -> bool:
        """Shards for the first n_images, and the `generate` row of (size, phase)."""
        n_shards = n_images // self.k
        meta = _read_json(self.pool / "pool.json") or {}
        missing = [i for i in range(n_shards) if shard_name(i) not in meta.get("shards", {})]
        res = None
        if missing:
            print(f"generating pool shards {shard_name(missing[0])}..{shard_name(missing[-1])} "
                  f"({len(missing) * self.k} images) in {self.pool}", flush=True)
            self.pool.mkdir(parents=True, exist_ok=True)
            res = self.child({"stage": "generate", "pool": str(self.pool), "shard_images": self.k, "shards": n_shards,
                              "seed": self.args.seed, "result": str(self.out / "measured" / "generate.json")},
                             f"generate-{n_shards}")
            if res is None:
                return False
            meta = _read_json(self.pool / "pool.json") or {}
        if self.row(size, "-", phase, "generate") is None:
            lo = (size // self.k) if phase == "refresh" else 0
            shards = [meta["shards"][shard_name(i)] for i in range(lo, n_shards)]
            secs = sum(s["seconds"] for s in shards)
            self.record({"size": size, "runner": "-", "phase": phase, "stage": "generate", "seconds": round(secs, 3),
                         "images": (n_shards - lo) * self.k,
                         "images_per_s": round((n_shards - lo) * self.k / max(secs, 1e-9), 1),
                         "peak_mb": (res or {}).get("peak_mb", meta.get("peak_mb")),
                         "anon_peak_mb": (res or {}).get("anon_peak_mb"),
                         "pool_mb": round(sum(s["bytes"] for s in shards) / 2**20, 1), "shards": n_shards - lo,
                         "commit": self.commit})
        return True

    def config(self, size: int, runner: str, phase: str) -> tuple[str, Path]:
        """The YAML config of one run (the shipped flows/configs/*.yaml shape); (path, run dir)."""
        import yaml

        enc = ENCODERS[self.args.encoder]
        weights = ROOT / enc["weights"] if enc["weights"] else self.out / "encoders" / f"{self.args.encoder}.safetensors"
        run = self.out / "runs" / (f"{size}-{runner}" + ("-refresh" if phase == "refresh" else ""))
        sources = [wds_source(self.pool, 0, size // self.k)]
        if phase == "refresh":
            sources.append(wds_source(self.pool, size // self.k, (size + size // 10) // self.k))
        cfg = {"name": f"scale-{size}-{runner}-{phase}", "run_dir": str(run), "seed": self.args.seed,
               "data": {"sources": sources, "classes": CIFAR10_CLASSES, "image_size": 32, "fit": "squash"},
               "teachers": [{"key": self.args.encoder, "library": "project", "name": enc["name"], "kwargs": enc["kwargs"],
                             "weights": str(weights), "preprocess": CIFAR_PREPROCESS}],
               "student": {"name": "cnn_tiny", "preprocess": CIFAR_PREPROCESS},
               "flows": {"task_runner": "local" if runner in ("local", "flow") else runner, "n_workers": self.args.workers,
                         "curate_cron": None, "refresh_cron": None}}
        path = self.out / "configs" / f"{run.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(cfg, sort_keys=False)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return str(path), run

    def ensure_encoder(self) -> bool:
        """Seeded random weights of a project encoder, saved once (in a child: this process stays
        free of torch, whose RSS every child would otherwise start from)."""
        enc = ENCODERS[self.args.encoder]
        path = self.out / "encoders" / f"{self.args.encoder}.safetensors"
        if enc["weights"] or path.exists():
            return True
        return self.child({"stage": "encoder", "encoder": self.args.encoder, "path": str(path), "seed": self.args.seed,
                           "result": str(self.out / "measured" / "encoder.json")}, "encoder") is not None

    # ---------------------------------------------------------------- stages
    def stage(self, size: int, runner: str, phase: str, stage: str, extra: dict | None = None) -> bool:
        """Measure one stage unless recorded; False when it failed (its dependants are skipped)."""
        if self.row(size, runner, phase, stage) is not None:
            return True
        config, run = self.config(size, runner, phase)
        name = f"{run.name}-{stage}"
        result = self.out / "measured" / f"{name}.json"
        res = _read_json(result)                 # measured by a run killed before it recorded the row
        if res is None:
            print(f"{size:>9} {runner:<6} {phase:<8} {stage:<9} ...", flush=True)
            job = {"stage": stage, "runner": runner, "config": config, "overrides": list(self.args.set),
                   "result": str(result), "queries": self.args.queries, "seed": self.args.seed, **(extra or {})}
            res = self.child(job, name)
            if res is None:
                return False
            for later in STAGES[STAGES.index(stage) + 1:]:   # measured on this run's older state: stale now
                (self.out / "measured" / f"{run.name}-{later}.json").unlink(missing_ok=True)
        row = {"size": size, "runner": runner, "phase": phase, "stage": stage, **res,
               "images_per_s": round(res["images"] / res["seconds"], 1) if res.get("seconds") and res.get("images") else None,
               "commit": self.commit}
        if res.get("up_to_date") and stage in ("ingest", "pixels", "features") and not res.get("reused"):
            row["lost"] = True   # the work was done by a run killed before recording it: not a measurement
        self.record(row)
        print("  " + table_line(row), flush=True)
        return True

    def full(self, size: int, runner: str) -> None:
        stages = [s for s in self.args.stages if runner == "local" or s in SHARDED]
        for stage in stages:
            extra = {}
            if stage == "pixels" and runner != "local":
                _, local_run = self.config(size, "local", "full")
                extra["reuse_pixels"] = str(local_run)
            if not self.stage(size, runner, "full", stage, extra):
                print(f"  skipping the rest of {size} {runner}", flush=True)
                return

    def refresh(self, size: int) -> None:
        runner = "local" if "local" in self.args.runners else self.args.runners[0]
        extra = size // 10
        if extra % self.k:
            print(f"refresh: {extra} new images is not a whole number of {self.k}-image shards; skipped", flush=True)
            return
        if not self.ensure_pool(size + extra, size, "refresh"):
            return
        stages = [s for s in REFRESH_STAGES if s in self.args.stages and (runner == "local" or s in SHARDED)]
        if any(self.row(size, runner, "full", s) is None for s in stages):
            print(f"refresh at {size}: the full run's stages are not all recorded; skipped", flush=True)
            return
        _, src = self.config(size, runner, "full")
        _, dst = self.config(size, runner, "refresh")
        if not dst.exists():
            # snapshot of the full run: hard links (the library replaces run files atomically, never in place)
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, copy_function=os.link, ignore=shutil.ignore_patterns("run.lock*"))
            tmp.rename(dst)
        for stage in stages:
            if not self.stage(size, runner, "refresh", stage):
                return

    def start_server(self) -> None:
        """One temporary Prefect server for the flow runners' children (a watchdog stops it if this
        process is killed)."""
        prefect_home = self.out / "prefect"
        os.environ.setdefault("PREFECT_HOME", str(prefect_home))
        from webkd.flows.prefect_env import local_defaults

        local_defaults()
        from webkd.flows import watchdog

        watchdog.start()
        from prefect.server.api.server import SubprocessASGIServer

        print("starting a temporary Prefect server for the flow runners ...", flush=True)
        t0 = time.perf_counter()
        self.server = SubprocessASGIServer()
        self.server.start(timeout=300)
        print(f"  Prefect server at {self.server.api_url} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def run(self, argv: list[str]) -> int:
        self.argv = argv
        self.commit = git_commit()
        self.load()
        sizes = self.args.sizes
        for n in sizes + ([max(sizes) // 10] if self.args.refresh else []):
            if n % self.k:
                raise SystemExit(f"--shard-images {self.k} does not divide {n}: pick a shard size that divides every "
                                 f"size (and a tenth of the largest with --refresh)")
        if not self.ensure_encoder():
            return 1
        try:
            for size in sizes:
                if not self.ensure_pool(size, size, "full"):
                    continue
                for runner in self.args.runners:
                    pending = [s for s in self.args.stages if (runner == "local" or s in SHARDED)
                               and self.row(size, runner, "full", s) is None]
                    if runner != "local" and pending and self.server is None:
                        self.start_server()
                    self.full(size, runner)
            if self.args.refresh:
                self.refresh(max(sizes))
        finally:
            self.stop_server()
        self.save()
        report(self.results, self.plot_path)
        print(f"results: {self.results_path}")
        if self.failed:
            print(f"\nfailed: {', '.join(self.failed)} (logs in {self.out / 'logs'})")
        return 1 if self.failed else 0


# ============================================================================================
# summary, table, plot
# ============================================================================================
def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _notes(r: dict[str, Any]) -> str:
    bits = []
    if r["stage"] == "index":
        bits.append(f"{r.get('factory')} {r.get('rows')}x{r.get('dim')}, {r.get('action')}")
        if r.get("recall_at_10") is not None:
            bits.append(f"recall@10 {r['recall_at_10']:.3f} ({r.get('recall_queries')} rows, nprobe {r.get('nprobe')})")
        else:
            bits.append("exact (no recall check)")
        bits.append(f"near-dups {r.get('near_duplicates')}")
        sp = r.get("split_s") or {}
        top = sorted(((v, k) for k, v in sp.items() if v > 0), reverse=True)[:3]
        bits.append("time: " + ", ".join(f"{k} {v:.1f}s" for v, k in top))
    elif r["stage"] == "query":
        bits.append(f"{r.get('queries')} queries k={r.get('k')}, {r.get('single_query_ms')} ms single, "
                    f"nprobe {r.get('nprobe')}")
    elif r["stage"] == "knn":
        bits.append(f"k={r.get('k')} of all {r.get('rows')} rows, nprobe {r.get('nprobe')}")
    elif r["stage"] == "features":
        bits.append(f"D={r.get('dim')}, forward-only {_fmt(r.get('forward_ips'), 0)} img/s, {r.get('device')}, "
                    f"torch threads {r.get('torch_threads')}")
    elif r["stage"] == "ingest":
        bits.append(f"{r.get('images')} read of {r.get('listed')} listed, {r.get('records')} records, "
                    f"{r.get('quarantined')} quarantined")
    elif r["stage"] == "pixels" and r.get("reused"):
        bits.append("local run's cache (same ids), checked")
    elif r["stage"] == "generate":
        bits.append(f"{r.get('shards')} shards, {r.get('pool_mb')} MB")
    if r.get("cluster_s") is not None:
        bits.append(f"flow + cluster start/stop {r['cluster_s']:.1f}s")
    if r.get("worker_peak_mb"):
        bits.append(f"largest worker {r['worker_peak_mb']:.0f} MB RSS / {r.get('worker_anon_peak_mb', 0):.0f} MB anon")
    if r.get("resumed"):
        bits.append("RESUMED after a kill: partial time")
    if r.get("lost"):
        bits.append("LOST: done by a killed run, re-run with --fresh")
    return "; ".join(bits)


def table_line(r: dict[str, Any]) -> str:
    stage = r["stage"] + (" (+10%)" if r["phase"] == "refresh" else "")
    return (f"| {r['size']:,} | {r['runner']} | {stage} | {_fmt(r.get('seconds'), 2)} | {_fmt(r.get('images_per_s'), 0)} | "
            f"{_fmt(r.get('peak_mb'), 0)} | {_fmt(r.get('anon_peak_mb'), 0)} | {_notes(r)} |")


def _order(r: dict[str, Any]) -> tuple:
    stages = ("generate",) + STAGES
    runners = ("-", "local", "flow", "dask")
    return (r["size"], r["phase"] != "full", runners.index(r["runner"]) if r["runner"] in runners else 9, r["runner"],
            stages.index(r["stage"]) if r["stage"] in stages else 99)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth with N per (runner, stage), where the time goes per size, the refresh ratio."""
    import numpy as np

    full = [r for r in rows if r["phase"] == "full" and r.get("seconds") and not r.get("lost")]
    whole = [r for r in full if not r.get("resumed")]      # a resumed stage's time is partial: not fitted
    growth = {}
    for key in sorted({(r["runner"], r["stage"]) for r in whole}):
        pts = sorted((r["size"], r["seconds"], r.get("images_per_s"), r.get("peak_mb"), r.get("anon_peak_mb"))
                     for r in whole if (r["runner"], r["stage"]) == key and not r.get("reused"))
        if len(pts) < 2:
            continue
        n, s = np.log([p[0] for p in pts]), np.log([max(p[1], 1e-6) for p in pts])
        g = {"sizes": [p[0] for p in pts], "slope": round(float(np.polyfit(n, s, 1)[0]), 3)}
        if pts[0][2] and pts[-1][2]:
            g["rate_largest_over_smallest"] = round(pts[-1][2] / pts[0][2], 3)
        if all(p[4] for p in pts):
            g["anon_mb"] = [p[4] for p in pts]
        growth[f"{key[0]}/{key[1]}"] = g
    where = {}
    for size in sorted({r["size"] for r in full}):
        for runner in sorted({r["runner"] for r in full if r["size"] == size and r["runner"] != "-"}):
            rs = {r["stage"]: r for r in full if r["size"] == size and r["runner"] == runner and r["stage"] in FULL_RUN}
            total = sum(r["seconds"] for r in rs.values())
            if total:
                where[f"{size}/{runner}"] = {"total_s": round(total, 2), "partial": any(r.get("resumed") for r in rs.values()),
                                             "missing": [st for st in FULL_RUN if st not in rs
                                                         and (runner == "local" or st in SHARDED)],
                                             "share": {
                    k: round(v["seconds"] / total, 3) for k, v in sorted(rs.items(), key=lambda kv: -kv[1]["seconds"])},
                    "index_split_s": (rs.get("index") or {}).get("split_s")}
    refresh = {}
    for r in rows:
        if r["phase"] == "refresh" and r["stage"] in FULL_RUN:
            key = f"{r['size']}/{r['runner']}"
            refresh.setdefault(key, {"stages": {}})["stages"][r["stage"]] = r["seconds"]
    for key, v in refresh.items():
        size, runner = key.split("/")
        base = {r["stage"]: r["seconds"] for r in full if r["size"] == int(size) and r["runner"] == runner
                and r["stage"] in v["stages"]}
        v["refresh_s"] = round(sum(v["stages"].values()), 2)
        if set(base) == set(v["stages"]) and sum(base.values()):
            v["full_s"] = round(sum(base.values()), 2)
            v["ratio"] = round(v["refresh_s"] / v["full_s"], 3)
    return {"growth": growth, "where_time_goes": where, "refresh": refresh, "targets": targets(whole, growth, refresh)}


def targets(full: list[dict[str, Any]], growth: dict[str, Any], refresh: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's done-when checks on what is recorded (at the largest N measured)."""
    out = []
    for key, g in growth.items():
        runner, stage = key.split("/")
        if stage in ("ingest", "features") and "rate_largest_over_smallest" in g:
            r = g["rate_largest_over_smallest"]
            out.append({"target": f"{key}: images/s at N={g['sizes'][-1]:,} within 20% of N={g['sizes'][0]:,}",
                        "value": r, "ok": r >= 0.8})
    local = [r for r in full if r["runner"] == "local"]
    if local:
        n = max(r["size"] for r in local)
        idx = next((r for r in local if r["size"] == n and r["stage"] == "index"), None)
        knn = next((r for r in local if r["size"] == n and r["stage"] == "knn"), None)
        if idx and knn:
            rc = idx.get("recall_at_10")
            out.append({"target": f"k-NN of all {n:,} rows x D={idx.get('dim')} through {idx.get('factory')} < 60 s "
                                  f"at recall@10 >= 0.9 (index build {(idx.get('split_s') or {}).get('build', 0):.1f} s "
                                  "apart)",
                        "value": {"knn_s": knn["seconds"], "recall_at_10": rc},
                        "ok": bool("PQ" in str(idx.get("factory")) and knn["seconds"] < 60 and rc is not None and rc >= 0.9)})
    for key, v in refresh.items():
        if "ratio" in v:
            out.append({"target": f"+10% refresh at N={key} <= 15% of the full run", "value": v["ratio"],
                        "ok": v["ratio"] <= 0.15})
    return out


def report(results: dict[str, Any], plot_path: Path) -> None:
    rows = sorted(results["rows"], key=_order)
    print(f"\nencoder {results['setup']['encoder_about']}; overrides {results['setup']['overrides'] or 'none'}; "
          f"machine {results['machine']['cores']} cores, {results['machine']['ram_gb']} GB RAM, load "
          f"{results['machine']['load_average']}\n")
    print("| size | runner | stage | seconds | images/s | peak RSS MB | peak anon MB | notes |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(table_line(r))
    s = results["summary"]
    if s["growth"]:
        print("\ngrowth with N (time ~ N^slope; images/s at the largest N / at the smallest):")
        for k, g in s["growth"].items():
            rate = f", rate ratio {g['rate_largest_over_smallest']:.2f}" if "rate_largest_over_smallest" in g else ""
            mem = f", anon MB {' -> '.join(f'{m:.0f}' for m in g['anon_mb'])}" if "anon_mb" in g else ""
            print(f"  {k:<16} slope {g['slope']:.2f} over N = {', '.join(f'{n:,}' for n in g['sizes'])}{rate}{mem}")
    if s["where_time_goes"]:
        print("\nwhere the time goes (ingest + pixels + features + index):")
        for k, w in s["where_time_goes"].items():
            share = ", ".join(f"{st} {100 * v:.0f}%" for st, v in w["share"].items())
            inner = w.get("index_split_s") or {}
            top = sorted(((v, n) for n, v in inner.items() if v > 0), reverse=True)[:3]
            idx = f"; inside index: {', '.join(f'{n} {v:.1f}s' for v, n in top)}" if top else ""
            part = " (a resumed stage: partial time)" if w.get("partial") else ""
            part += "" if k.endswith("/local") else " (sharded stages; index as local)"
            part += f" (not measured: {', '.join(w['missing'])})" if w.get("missing") else ""
            print(f"  N={k}: {w['total_s']:.1f} s{part} = {share}{idx}")
    for k, v in s["refresh"].items():
        if "ratio" in v:
            print(f"\nrefresh +10% at N={k}: {v['refresh_s']:.1f} s = {100 * v['ratio']:.1f}% of the full run "
                  f"({v['full_s']:.1f} s); " + ", ".join(f"{st} {t:.1f}s" for st, t in v["stages"].items()))
    if s.get("targets"):
        print("\nissue 13 targets (on the sizes recorded):")
        for t in s["targets"]:
            print(f"  [{'ok' if t['ok'] else 'NOT MET'}] {t['target']}: {t['value']}")
    try:
        plot(results, plot_path)
        print(f"\nplot: {plot_path}")
    except Exception as exc:  # the plot is a convenience: never lose the run for it
        print(f"(plot not written: {type(exc).__name__}: {exc})")


COLORS = {"generate": (140, 140, 140), "ingest": (31, 119, 180), "pixels": (255, 127, 14), "features": (44, 160, 44),
          "index": (214, 39, 40), "query": (148, 103, 189), "knn": (140, 86, 75), "total": (0, 0, 0)}


def plot(results: dict[str, Any], path: Path) -> None:
    """Log-log seconds vs N per stage (solid: local, dashed: other runners), with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in results["rows"] if r["phase"] == "full" and r.get("seconds") and not r.get("lost")
            and not r.get("resumed")]
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("reused"):
            continue
        series.setdefault((r["runner"], r["stage"]), []).append((r["size"], r["seconds"]))
    totals: dict[int, float] = {}
    for size in {r["size"] for r in rows}:       # sizes whose four curation stages are all measured
        rs = [r for r in rows if r["size"] == size and r["runner"] == "local" and r["stage"] in FULL_RUN]
        if len(rs) == len(FULL_RUN):
            totals[size] = sum(r["seconds"] for r in rs)
    if totals:
        series[("local", "total")] = sorted(totals.items())
    if not series:
        return
    W, H, L, R, T, B = 1100, 680, 90, 300, 60, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:
        font = ImageFont.load_default()
    xs = [n for pts in series.values() for n, _ in pts]
    ys = [max(s, 1e-3) for pts in series.values() for _, s in pts]
    x0, x1 = math.floor(math.log10(min(xs)) - 0.1), math.ceil(math.log10(max(xs)) + 0.1)
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    y1 = max(y1, y0 + 1)

    def px(n: float, s: float) -> tuple[float, float]:
        return (L + (math.log10(n) - x0) / (x1 - x0) * (W - L - R),
                H - B - (math.log10(max(s, 1e-3)) - y0) / (y1 - y0) * (H - T - B))

    for e in range(x0, x1 + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if x0 <= math.log10(v) <= x1:
                x, _ = px(v, 10 ** y0)
                d.line([(x, T), (x, H - B)], fill=(225, 225, 225) if m > 1 else (190, 190, 190))
                if m == 1 or (x1 - x0) <= 2:
                    label = f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"
                    d.text((x - 12, H - B + 8), label, fill="black", font=font)
    for e in range(y0, y1 + 1):
        _, y = px(10 ** x0, 10 ** e)
        d.line([(L, y), (W - R, y)], fill=(190, 190, 190))
        d.text((8, y - 8), f"{10 ** e:g} s", fill="black", font=font)
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.text((L, 15), "webkd scale bench: seconds vs pool size N (log-log); solid local, dashed dask, dotted flow",
           fill="black", font=font)
    d.text((L, 35), f"{results['setup']['encoder_about']}; {results['machine']['cores']} cores",
           fill=(80, 80, 80), font=font)
    d.text(((L + W - R) / 2 - 60, H - 30), "pool size N (images)", fill="black", font=font)
    # a reference slope: time proportional to N, through the smallest total
    if totals:
        n0, t0 = min(totals.items())
        a, b = px(n0, t0), px(max(xs), t0 * max(xs) / n0)
        _dashed(d, a, b, (170, 170, 170), 2, 3)
    ly = T
    for (runner, stage), pts in sorted(series.items(), key=lambda kv: (kv[0][1] == "total", kv[0][0] != "local", kv[0])):
        pts = sorted(pts)
        col = COLORS.get(stage, (0, 0, 0))
        xy = [px(n, s) for n, s in pts]
        width = 3 if stage == "total" else 2
        for a, b in zip(xy, xy[1:]):
            if runner in ("local", "-"):
                d.line([a, b], fill=col, width=width)
            else:
                _dashed(d, a, b, col, width, 8 if runner == "dask" else 3)
        for x, y in xy:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col if runner in ("local", "-") else "white", outline=col, width=2)
        sx = W - R + 20
        if runner in ("local", "-"):
            d.line([(sx, ly + 8), (sx + 30, ly + 8)], fill=col, width=width)
        else:
            _dashed(d, (sx, ly + 8), (sx + 30, ly + 8), col, width, 6 if runner == "dask" else 3)
        label = f"{stage} ({runner})" if stage != "total" else "ingest+pixels+features+index"
        d.text((sx + 38, ly), label, fill="black", font=font)
        ly += 22
    _dashed(d, (W - R + 20, ly + 8), (W - R + 50, ly + 8), (170, 170, 170), 2, 3)
    d.text((W - R + 58, ly), "proportional to N", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _dashed(d: Any, a: tuple[float, float], b: tuple[float, float], col: Any, width: int, dash: float) -> None:
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    if length == 0:
        return
    steps = int(length // dash)
    for i in range(0, steps + 1, 2):
        t0, t1 = i * dash / length, min(1.0, (i + 1) * dash / length)
        d.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=col, width=width)


# ============================================================================================
# command line
# ============================================================================================
def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="What is measured, and how: the docstring at the top of bench/scale.py.")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="pool sizes N")
    ap.add_argument("--runners", nargs="+", default=["local", "dask"], choices=["local", "dask", "flow"])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES),
                    help="stages to measure (default all; dask / flow measure ingest, pixels, features only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "scale"), help="pools, run directories, logs")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "scale.json"))
    ap.add_argument("--plot", default=None, help="log-log plot PNG (default: --results with .png)")
    ap.add_argument("--refresh", action="store_true", help="also a +10%% refresh at the largest size")
    ap.add_argument("--encoder", default="cifar_teacher", choices=sorted(ENCODERS),
                    help="feature encoder: " + "; ".join(f"{k}: {v['about']}" for k, v in ENCODERS.items()))
    ap.add_argument("--fresh", action="store_true", help="forget recorded rows and run directories (pools are kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-images", type=int, default=None,
                    help="images per tar shard (default 10000, img2dataset's default, or the largest that divides "
                         "every size)")
    ap.add_argument("--queries", type=int, default=10_000, help="sampled rows searched (k=10) by the query stage")
    ap.add_argument("--workers", type=int, default=2, help="Dask LocalCluster workers (flows.n_workers)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (e.g. index.ivfpq_min=1000 to reach IVF-PQ at a small N); "
                         "recorded in the results' setup")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is None:
        args.sizes = sorted(set(args.sizes))
        args.runners = list(dict.fromkeys(args.runners))
        args.stages = [s for s in STAGES if s in args.stages]
    return args


def shard_images(args: argparse.Namespace, recorded: dict | None) -> int:
    """--shard-images, else the recorded results' value when it fits these sizes, else 10000
    (img2dataset's default) when it divides every size (and a tenth of the largest with
    --refresh), else their greatest common divisor."""
    if args.shard_images:
        return args.shard_images
    need = args.sizes + ([max(args.sizes) // 10] if args.refresh else [])
    k = (recorded or {}).get("shard_images")
    if k and all(n % k == 0 for n in need):
        return int(k)
    g = 0
    for n in need:
        g = math.gcd(g, n)
    return 10_000 if g % 10_000 == 0 else g


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child is not None:
        run_child(json.loads(args.child))
        return 0
    return Bench(args).run(argv)


if __name__ == "__main__":
    sys.exit(main())
