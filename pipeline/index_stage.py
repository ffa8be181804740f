"""The index stage (`index_run`) and the index at scale: built over the memory-mapped float16
feature cache in blocks, trained on a seeded sample, extended with only the new rows when the
pool grows, and checked against brute force on a sample of rows.

- `build_blocked`: the factory `choose_factory` picks (IVF-PQ from `IndexConfig.ivfpq_min`
  vectors on, or past the memory budget), trained on `train_rows` (FAISS guidelines: 30..256
  vectors per list), then filled block by block: only one block of float32 vectors is in memory
  besides the training sample and the index itself.
- `plan`: a saved index whose build inputs (encoder fingerprint, index settings) are unchanged
  and whose rows are a prefix of the manifest is *extended* (`extend`: the new rows added with the
  saved centring vector; the trained quantiser and every old row's code stay as they are, so
  searches over the old rows give the same results). It is trained again (rebuilt) only once the
  pool holds more than `retrain_factor` x the rows it was trained on, or when anything it was
  built from changed.
- `sampled_recall`: recall@10 of the index against an exact numpy search (the base streamed in
  blocks) for `recall_queries` seeded rows; reported in the index sidecar and the stage report.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from webkd.pipeline import near_dup
from webkd.pipeline.config import IndexConfig
from webkd.pipeline.index import (_PROGRESS_MIN_BLOCKS, choose_factory, index_meta_path, index_vectors,
                                  load_index, load_index_center, new_index, normalize, perceptual_vectors, recall_at_k,
                                  resolve_nprobe, save_index, search, set_k_factor, set_nprobe, to_device,
                                  train_rows)
from webkd.pipeline.paths import RunPaths
from webkd.pipeline.progress import tqdm
from webkd.pipeline.records import (NEAR_DUPLICATE, OK, QuarantineRow, load_manifest, load_quarantine, save_manifest,
                                    save_quarantine)
from webkd.pipeline.storage import atomic_write_json, ids_sha256, read_json

log = logging.getLogger(__name__)

ADD_BLOCK = 65536       # vectors converted to float32 and added per step
RECALL_K = 10
# settings that change what the index holds; the rest (nprobe, k, near-duplicate settings,
# the extension / mmap / recall knobs) never force a rebuild
_STRUCTURE_FIELDS = ("factory", "flat_max", "memory_budget_mb", "ivfpq_min", "train_per_list", "center")


def pool_mean(emb: np.ndarray, block: int = ADD_BLOCK) -> np.ndarray:
    """float32 (D,) mean of the rows of a (memory-mapped) array, accumulated in float64 by blocks."""
    total = np.zeros(emb.shape[1], np.float64)
    for lo in range(0, len(emb), block):
        total += np.asarray(emb[lo:lo + block], np.float64).sum(0)
    return (total / max(1, len(emb))).astype(np.float32)


def structure(features_meta: dict | None, cfg: IndexConfig) -> str:
    """Digest of what the index contents depend on besides the rows: the encoder's cache
    fingerprint and the index settings that shape it."""
    fm = features_meta or {}
    parts = [fm.get("fingerprint"), fm.get("dim"), {f: getattr(cfg, f) for f in _STRUCTURE_FIELDS}]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def plan(meta: dict[str, Any], struct: str, ids: list[str], cfg: IndexConfig, path: Path) -> tuple[str, str]:
    """("extend" | "build", why) for an index over the rows `ids` given the saved sidecar."""
    rows, trained = int(meta.get("rows", -1)), int(meta.get("trained_rows", 0) or 0)
    if not path.exists() or not meta:
        return "build", "no saved index"
    if meta.get("structure") != struct:
        return "build", "encoder or index settings changed"
    if rows < 0 or rows > len(ids) or meta.get("ids_sha256") != ids_sha256(ids[:rows]):
        return "build", "the manifest's first rows are not the indexed ones"
    if trained <= 0 or len(ids) > cfg.retrain_factor * trained:
        return "build", f"pool grew to {len(ids)} rows, past {cfg.retrain_factor:g} x the {trained} trained on"
    return "extend", f"{len(ids) - rows} new rows added to the index trained on {trained}"


def extend(index: faiss.Index, emb: np.ndarray, center: np.ndarray | None, start: int,
           block: int = ADD_BLOCK) -> int:
    """Add rows start.. of `emb` (ids = row numbers, appended in order); returns how many."""
    n = len(emb)
    if index.ntotal != start:
        raise ValueError(f"index holds {index.ntotal} vectors, expected {start} before adding rows {start}..{n}")
    starts = range(start, n, block)
    for lo in tqdm(starts, desc="index add", unit="block", disable=len(starts) < _PROGRESS_MIN_BLOCKS):
        index.add(index_vectors(emb[lo:lo + block], center))
    return n - start


def build_blocked(emb: np.ndarray, center: np.ndarray | None, cfg: IndexConfig,
                  seed: int = 0) -> tuple[faiss.Index, str]:
    """(index, factory) over every row of `emb` (float16 memory map is fine), trained on a sample."""
    n, d = emb.shape
    factory = choose_factory(n, d, cfg)
    index = to_device(new_index(d, factory, cfg), factory, cfg)
    t0 = time.perf_counter()
    if not index.is_trained:
        rows = train_rows(n, cfg, seed)
        index.train(index_vectors(emb[rows] if len(rows) < n else emb, center))
    t1 = time.perf_counter()
    extend(index, emb, center, 0)
    log.info("built %s over %d x %d: trained in %.2fs, filled in %.2fs", factory, n, d, t1 - t0,
             time.perf_counter() - t1)
    return index, factory


def exact_knn_blocked(emb: np.ndarray, center: np.ndarray | None, queries: np.ndarray, k: int,
                      block: int = ADD_BLOCK) -> np.ndarray:
    """Exact top-k ids (Q, k) of L2-normalised `queries` over every row of `emb` (transformed as
    the index holds them), the base streamed in blocks so memory stays at one block."""
    q = np.ascontiguousarray(queries, np.float32)                 # (Q, D)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for lo in range(0, len(emb), block):
        # faiss's exact k-NN of the block keeps only (Q, k) per block: a (Q, B) score matrix with
        # its argpartition was ~1.5 GB at Q 1000, B 65536
        base = index_vectors(emb[lo:lo + block], center)
        s, i = faiss.knn(q, base, min(k, len(base)), metric=faiss.METRIC_INNER_PRODUCT)   # (Q, k)
        s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + lo], 1)
        kk = min(k, s.shape[1])
        top = np.argsort(-s, axis=1, kind="stable")[:, :kk]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def sampled_recall(index: faiss.Index, emb: np.ndarray, center: np.ndarray | None, cfg: IndexConfig,
                   factory: str, seed: int = 0) -> dict[str, Any] | None:
    """{"recall_at_10", "queries", "seconds"} of `index` against brute force for a seeded sample of
    its rows as queries; None for an exact (Flat) index or when `cfg.recall_queries` is 0."""
    n = len(emb)
    if factory == "Flat" or cfg.recall_queries == 0 or n == 0:
        return None
    t0 = time.perf_counter()
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, cfg.recall_queries), replace=False))
    q = index_vectors(emb[rows], center)
    k = min(RECALL_K, n)
    _, approx = search(index, q, k, cfg.block_size)
    exact = exact_knn_blocked(emb, center, q, k)
    recall = recall_at_k(approx, exact)
    return {"recall_at_10": round(recall, 4), "queries": int(len(rows)), "nprobe": resolve_nprobe(cfg, factory),
            "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------------
# the pipeline stage
# --------------------------------------------------------------------------------------------
@dataclass
class IndexReport:
    key: str
    rows: int
    dim: int
    factory: str
    path: Path
    threshold: float | None
    candidates: int        # rows considered for near-duplicate grouping (status ok/near_duplicate)
    groups: int            # groups with more than one member
    near_duplicates: int   # rows marked near_duplicate (non-representatives)
    changed: int           # rows whose status or dup_of changed in this run
    seconds: float
    action: str = "build"     # build (trained on a sample, filled) | extend (only the new rows added)
    added: int = 0            # vectors added to the index by this run
    recall: dict | None = None  # recall@10 vs brute force on sampled rows (None: exact index)
    up_to_date: bool = False  # inputs unchanged since the last build: nothing rebuilt or rewritten
    decontam: object = None   # the decontamination stage's report when it ran first (pipeline/decontam.py)
    near_dup: object = None   # near_dup.NearDupPlan: how the marks were found (full | incremental) when they ran

    def __str__(self) -> str:
        nd = ("near-duplicates: off" if self.threshold is None else
              f"near-duplicates (cosine >= {self.threshold}): {self.near_duplicates} rows in "
              f"{self.groups} groups of {self.candidates} candidates, {self.changed} changed")
        dc = f"\n{self.decontam}" if self.decontam is not None else ""
        nd = nd + (f"\n{self.near_dup}" if self.near_dup is not None else "")
        rc = f", recall@10 {self.recall['recall_at_10']:.3f} ({self.recall['queries']} sampled rows)" \
            if self.recall else ""
        how = "unchanged" if self.up_to_date else ("built" if self.action == "build" else f"extended by {self.added} rows")
        return (f"index {self.key}: {self.rows} x {self.dim} {self.factory} -> {self.path} ({how}{rc})\n"
                f"{nd}{dc}\ntime {self.seconds:.1f}s")


def _index_inputs(paths: RunPaths, key: str, cfg: IndexConfig, records: list, pixels: np.ndarray | None) -> str:
    """Digest of what an index build reads: the feature cache (encoder fingerprint, row ids), the
    index settings, the manifest rows that take part in near-duplicate grouping, and the pixel
    cache's shape when near duplicates are found in pixel space."""

    cand = [r.id for r in records if r.status in (OK, NEAR_DUPLICATE)]
    parts = [read_json(paths.features_meta(key), default=None), cfg.model_dump(mode="json"),
             ids_sha256(cand),
             list(pixels.shape) if pixels is not None and cfg.near_dup_space == "pixels" else None]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _unchanged_report(key: str, meta: dict, records: list, dim: int, path: Path, cfg: IndexConfig,
                      seconds: float) -> "IndexReport":
    """The report of an index whose inputs did not change, from the saved meta and the manifest."""
    cand = [r for r in records if r.status in (OK, NEAR_DUPLICATE)]
    dups = [r for r in cand if r.status == NEAR_DUPLICATE]
    return IndexReport(key=key, rows=int(meta.get("rows", len(records))), dim=dim, factory=str(meta.get("factory")),
                       path=path, threshold=cfg.near_dup_threshold, candidates=len(cand),
                       groups=len({r.dup_of for r in dups}), near_duplicates=len(dups), changed=0,
                       seconds=seconds, up_to_date=True)


def _build_or_extend(paths: RunPaths, key: str, cfg: IndexConfig, records: list, emb: np.ndarray,
                     meta: dict) -> tuple[faiss.Index, dict]:
    """The index over every row of `emb`: the saved one extended with the new rows when
    `index_plan` allows it, else built again (trained on a sample, filled in blocks); saved
    with its sidecar fields (written by the caller once the near-duplicate marks are in)."""
    path = paths.index(key)
    ids = [r.id for r in records]
    struct = structure(read_json(paths.features_meta(key), default=None), cfg)
    action, why = plan(meta, struct, ids, cfg, path)
    index = None
    if action == "extend":
        try:
            index = load_index(path)                       # read whole: a memory map cannot grow
        except RuntimeError as exc:                        # damaged file: build it again
            action, why = "build", f"saved index unreadable ({exc})"
    if index is not None and index.ntotal != int(meta["rows"]):
        action, why, index = "build", f"saved index holds {index.ntotal} vectors, its sidecar says {meta['rows']}", None
    if index is not None:
        center = load_index_center(path)
        factory, trained = str(meta["factory"]), int(meta["trained_rows"])
        added = extend(index, emb, center, index.ntotal)
    else:
        center = pool_mean(emb) if cfg.center and len(emb) else None
        index, factory = build_blocked(emb, center, cfg)
        trained = added = len(emb)
    set_nprobe(index, resolve_nprobe(cfg, factory))
    set_k_factor(index, cfg.refine_k_factor)
    recall = meta.get("recall") if action == "extend" and added == 0 else \
        sampled_recall(index, emb, center, cfg, factory)
    if action == "build" or added:
        save_index(index, path)
    log.info("index %s: %s (%s)%s", key, action, why,
             f"; recall@10 {recall['recall_at_10']:.3f} on {recall['queries']} sampled rows" if recall else "")
    # the caller writes the sidecar last; a kill before that leaves the old sidecar, whose row
    # count no longer matches the file's vectors: the next run sees it (ntotal check) and rebuilds
    return index, {"key": key, "factory": factory, "rows": int(len(emb)),
                   "center": center.tolist() if center is not None else None, "structure": struct,
                   "ids_sha256": ids_sha256(ids), "trained_rows": int(trained), "action": action, "why": why,
                   "added": int(added), "recall": recall}


def index_run(paths: RunPaths, key: str, cfg: IndexConfig, pixels: np.ndarray | None = None,
              records: list | None = None) -> IndexReport:
    """Build and save `index/<key>.faiss` over `features/<key>.npy`, then mark near duplicates.

    The index holds the (centred, when `cfg.center`) L2-normalised embeddings; the centring
    vector is saved beside it (`index/<key>.json`) so searches use the same transform.
    Near duplicates are found in `cfg.near_dup_space`: `pixels` (perceptual thumbnails of the
    decoded pixel cache, row-aligned, passed as `pixels`) or `embedding`. Among manifest rows
    whose status is ok or near_duplicate, each non-representative row gets
    `status="near_duplicate"`, `dup_of=<representative id>` and one quarantine row (reason
    near_duplicate). When only new rows arrived since the last run, only they are grouped
    (`pipeline.near_dup`); otherwise every candidate is grouped again: rows whose group
    dissolved go back to ok, and old near_duplicate quarantine rows are replaced, never
    repeated. `near_dup_threshold: null` clears every mark. `records`: the manifest as on disk,
    when the caller has read it already (it is updated in place and saved).
    """
    t0 = time.perf_counter()
    records = load_manifest(paths.manifest) if records is None else records
    feat_path = paths.features(key)
    if not feat_path.exists():
        raise FileNotFoundError(f"no feature cache {feat_path}: run `webkd features` first")
    emb = np.load(feat_path, mmap_mode="r")  # (N, D) float16
    if emb.ndim != 2 or emb.shape[0] != len(records):
        raise ValueError(f"{feat_path} has shape {emb.shape} but the manifest has {len(records)} rows: "
                         "re-run `webkd features` so the cache is row-aligned with the manifest")
    inputs = _index_inputs(paths, key, cfg, records, pixels)
    meta = read_json(index_meta_path(paths.index(key)), default=None) or {}
    if meta.get("inputs") == inputs and paths.index(key).exists():
        report = _unchanged_report(key, meta, records, emb.shape[1], paths.index(key), cfg, time.perf_counter() - t0)
        log.debug("%s", report)
        return report
    index, meta = _build_or_extend(paths, key, cfg, records, emb, meta)
    center = np.asarray(meta["center"], np.float32) if meta["center"] is not None else None

    cand = np.array([r.status in (OK, NEAR_DUPLICATE) for r in records], dtype=bool)
    rows = np.flatnonzero(cand)
    rep_rows = rows.copy()
    vectors, nd_plan = None, None
    if cfg.near_dup_threshold is not None and len(rows) > 1:
        if cfg.near_dup_space == "pixels":
            if pixels is None or len(pixels) != len(records):
                raise ValueError("index.near_dup_space=pixels needs the pixel cache, row-aligned with the manifest")
            side = cfg.near_dup_side

            def vectors(manifest_rows: np.ndarray) -> np.ndarray:
                return normalize(perceptual_vectors(pixels[manifest_rows], side))
            # the cache's shape and its first rows' bytes (another size or fit is another space)
            space = [list(pixels.shape[1:]), hashlib.sha256(np.ascontiguousarray(pixels[:64]).tobytes()).hexdigest()]
            dim = 3 * side * side
        else:
            def vectors(manifest_rows: np.ndarray) -> np.ndarray:
                return index_vectors(emb[manifest_rows], center)
            fm = read_json(paths.features_meta(key), default=None) or {}
            space = [fm.get("fingerprint"), fm.get("dim"), meta["center"]]   # the encoder and the centring
            dim = int(emb.shape[1])
        cand_recs = [records[i] for i in rows.tolist()]
        rep_local, nd_plan = near_dup.group(
            paths, key, cfg, [r.id for r in cand_recs], [r.status for r in cand_recs], [r.dup_of for r in cand_recs],
            lambda pos: vectors(rows[pos]), dim=dim, space=space)
        rep_rows = rows[rep_local]
    else:
        near_dup.clear(paths, key, cfg)

    changed = 0
    old_q = load_quarantine(paths.quarantine)
    kept_q = {q.id: q for q in old_q if q.reason == NEAR_DUPLICATE}
    quarantine = [q for q in old_q if q.reason != NEAR_DUPLICATE]
    dup_pairs = [(row, rep) for row, rep in zip(rows.tolist(), rep_rows.tolist()) if rep != row]
    incremental = nd_plan is not None and nd_plan.action == "incremental"   # old marks kept: their rows too
    fresh = [(row, rep) for row, rep in dup_pairs
             if not (incremental and records[row].id in kept_q and kept_q[records[row].id].dup_of == records[rep].id
                     and records[row].status == NEAR_DUPLICATE)]
    cos = {}
    for lo in range(0, len(fresh), cfg.block_size):                      # the quarantine rows' cosines
        part = fresh[lo:lo + cfg.block_size]
        a, b = np.array([p[0] for p in part]), np.array([p[1] for p in part])
        cos.update(zip(part, np.einsum("ij,ij->i", vectors(a), vectors(b)).tolist()))
    for row, rep in zip(rows.tolist(), rep_rows.tolist()):
        r = records[row]
        new_status, new_dup = (OK, None) if rep == row else (NEAR_DUPLICATE, records[rep].id)
        if (r.status, r.dup_of) != (new_status, new_dup):
            changed += 1
            r.status, r.dup_of = new_status, new_dup
        if rep != row:
            if (row, rep) not in cos:                      # unchanged since the last run: its row as it was
                quarantine.append(kept_q[r.id])
                continue
            quarantine.append(QuarantineRow(uri=r.uri, source=r.source, reason=NEAR_DUPLICATE,
                                            detail=f"cosine {cos[(row, rep)]:.4f} ({cfg.near_dup_space}) to row {rep} "
                                                   f"({records[rep].uri})",
                                            id=r.id, web_label=r.web_label, dup_of=records[rep].id,
                                            batch=r.batch))
    save_manifest(paths.manifest, records)
    save_quarantine(paths.quarantine, quarantine)
    if nd_plan is not None:
        near_dup.commit(nd_plan)
    # written last, with the inputs it was built from: a kill before this line rebuilds next time
    atomic_write_json(index_meta_path(paths.index(key)),
                      {**meta, "inputs": inputs})   # marks move rows only between ok and near_duplicate: same candidates
    n_dup = int((rep_rows != rows).sum())
    report = IndexReport(key=key, rows=int(emb.shape[0]), dim=int(emb.shape[1]), factory=meta["factory"],
                         path=paths.index(key), action=meta["action"], added=meta["added"], recall=meta.get("recall"),
                         threshold=cfg.near_dup_threshold, candidates=len(rows),
                         groups=len(set(rep_rows[rep_rows != rows].tolist())), near_duplicates=n_dup,
                         changed=changed, seconds=time.perf_counter() - t0, near_dup=nd_plan)
    log.info("%s", report)
    return report
