"""Near-duplicate marks for the index stage, at any pool size and incremental on refresh.

The grouping is `pipeline.index.leader_groups` (leader grouping in row order, decisions on exact
float32 cosines). What this module adds is how it scales:

- the vectors are computed block by block from their source (`vectors(rows)`: perceptual
  thumbnails of the pixel cache, or the indexed embeddings), never held for the whole pool;
- the search index is exact `Flat` up to `IndexConfig.near_dup_exact_max` candidates, past that
  `IVF{~2 sqrt N},SQ8` (trained on a seeded sample, one byte per dimension, `near_dup_nprobe`
  lists probed). At 1M candidates in the 768-d thumbnail space that is ~0.8 GB of codes instead
  of an O(N^2) exact search (~2-3 h on one core);
- the index is saved (`index/near_dup_<space>.faiss` + a JSON sidecar written after the
  manifest). When the candidate rows of the last run are a prefix of today's, their marks in the
  manifest are the ones it committed (a digest) and nothing the grouping depends on changed, only
  the new rows are searched and grouped; the old rows keep their marks (leader grouping looks
  back only; a regroup from scratch could differ only where a row has more than k near
  neighbours in one search block).
  Anything else (a row left or changed status, settings, the space, an IVF pool grown past
  `retrain_factor` x the rows it was trained on, a kill between the files) groups every row
  again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from webkd.pipeline.config import IndexConfig
from webkd.pipeline.index import leader_groups, load_index, near_dup_factory, save_index, set_nprobe
from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import NEAR_DUPLICATE
from webkd.pipeline.storage import atomic_write_json, ids_sha256, read_json

log = logging.getLogger(__name__)

TRAIN_PER_LIST = 40      # IVF training sample per list (faiss wants >= 39): the partition only needs to be coarse
TRAIN_ITER = 10          # k-means iterations (faiss default 25)
APPROX_MARGIN = 0.02     # score error allowed for SQ8 codes when deciding which neighbours to follow

Vectors = Callable[[np.ndarray], np.ndarray]


def near_dup_path(paths: RunPaths, key: str, space: str) -> Path:
    """The saved search index: the pixel space is the same for every encoder, the embedding
    space is the indexed encoder's."""
    return paths.index_dir / ("near_dup_pixels.faiss" if space == "pixels" else f"near_dup_{key}.faiss")


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


@dataclass
class NearDupPlan:
    """What `group` did and what `commit` writes once the manifest holds the marks."""
    path: Path
    meta: dict[str, Any]
    action: str            # full | incremental
    new_rows: int          # candidate rows searched and grouped by this run
    seconds: float
    why: str = ""          # why every row was grouped again, or how many rows are new

    def __str__(self) -> str:
        return (f"near-duplicate search {self.meta['factory']}: {self.action} ({self.why}), {self.new_rows} of "
                f"{self.meta['rows']} candidates grouped in {self.seconds:.1f}s")


def _fingerprint(cfg: IndexConfig, space: Any) -> str:
    """What the marks depend on besides the rows: the settings and a description of the space."""
    parts = [cfg.near_dup_space, cfg.near_dup_side if cfg.near_dup_space == "pixels" else None,
             cfg.near_dup_threshold, cfg.k, cfg.near_dup_nprobe, cfg.near_dup_exact_max, space]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _prefix_reps(cand_ids: list[str], statuses: list[str], dup_of: list[str | None], m: int) -> np.ndarray | None:
    """Local representatives of the first m candidates from their manifest marks (None when a
    mark points outside them: the marks are not from the saved grouping)."""
    rep = np.arange(m, dtype=np.int64)
    dups = [p for p in range(m) if statuses[p] == NEAR_DUPLICATE]
    if not dups:
        return rep
    pos = {cid: p for p, cid in enumerate(cand_ids[:m])}
    for p in dups:
        q = pos.get(dup_of[p]) if dup_of[p] is not None else None
        if q is None or q >= p:
            return None
        rep[p] = q
    return rep


def _marks_digest(rep: np.ndarray) -> str:
    """Digest of a grouping (local representative of each candidate): an incremental run starts
    only from the marks the saved search committed, not from marks changed since (a row that left
    the candidates and came back, a grouping made in another space)."""
    return hashlib.sha256(np.ascontiguousarray(rep, np.int64).tobytes()).hexdigest()


def _try_incremental(path: Path, meta: dict[str, Any], fp: str, factory: str, cand_ids: list[str],
                     statuses: list[str], dup_of: list[str | None], cfg: IndexConfig
                     ) -> tuple[faiss.Index, int, np.ndarray, int] | str:
    """(index, m, prefix reps, trained rows) to extend, or why every row is grouped again."""
    n, m = len(cand_ids), int(meta.get("rows", -1))
    if not meta or not path.exists():
        return "no saved near-duplicate index"
    if meta.get("fingerprint") != fp:
        return "near-duplicate settings or space changed"
    if m <= 0 or m > n or meta.get("ids_sha256") != ids_sha256(cand_ids[:m]):
        return "the candidate rows of the last run are not a prefix of today's"
    saved, trained = str(meta.get("factory")), int(meta.get("trained_rows", 0) or 0)
    if saved == "Flat" and factory != "Flat":
        return f"{n} candidates: past near_dup_exact_max, an IVF search replaces the exact one"
    if saved != "Flat" and n > cfg.retrain_factor * max(1, trained):
        return f"{n} candidates, past {cfg.retrain_factor:g} x the {trained} the IVF was trained on"
    rep = _prefix_reps(cand_ids, statuses, dup_of, m)
    if rep is None or meta.get("marks_sha256") != _marks_digest(rep):
        return "the manifest's near-duplicate marks are not those of the saved grouping"
    try:
        index = load_index(path)
    except RuntimeError as exc:
        return f"saved near-duplicate index unreadable ({exc})"
    if index.ntotal != m:
        return f"saved near-duplicate index holds {index.ntotal} vectors, its sidecar says {m}"
    return index, m, rep, trained


def group(paths: RunPaths, key: str, cfg: IndexConfig, cand_ids: list[str], statuses: list[str],
          dup_of: list[str | None], vectors: Vectors, dim: int, space: Any, seed: int = 0
          ) -> tuple[np.ndarray, NearDupPlan]:
    """Local representative of each candidate (positions in `cand_ids`), and the plan whose
    sidecar `commit` writes after the manifest.

    `statuses` / `dup_of`: the candidates' current manifest marks (read for an incremental run);
    `vectors(positions)`: their L2-normalised float32 vectors; `space`: a JSON-able description
    of the space (a change groups every row again)."""
    t0 = time.perf_counter()
    n = len(cand_ids)
    path = near_dup_path(paths, key, cfg.near_dup_space)
    fp = _fingerprint(cfg, space)
    factory = near_dup_factory(n, cfg.near_dup_exact_max)
    meta = read_json(_sidecar(path), default=None) or {}
    got = _try_incremental(path, meta, fp, factory, cand_ids, statuses, dup_of, cfg)
    if isinstance(got, str):
        why, start, prefix = got, 0, None
        factory_used = factory
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        trained = n
        if not index.is_trained:
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.niter, nlist = TRAIN_ITER, ivf.nlist
            n_train = min(n, nlist * TRAIN_PER_LIST)
            rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
            index.train(np.ascontiguousarray(vectors(rows), np.float32))
    else:
        index, start, prefix, trained = got
        factory_used, why = str(meta["factory"]), f"{n - start} new candidates"
    set_nprobe(index, cfg.near_dup_nprobe)
    action = "full" if prefix is None else "incremental"
    log.info("near duplicates: %s grouping with %s (%s)", action, factory_used, why)
    rep = leader_groups(vectors, n, float(cfg.near_dup_threshold), index, k=cfg.k, block_size=cfg.block_size,
                        start=start, rep=prefix, margin=1e-4 if factory_used == "Flat" else APPROX_MARGIN)
    save_index(index, path)
    plan = NearDupPlan(path=path, action=action, new_rows=n - start, seconds=time.perf_counter() - t0,
                       meta={"fingerprint": fp, "rows": n, "ids_sha256": ids_sha256(cand_ids),
                             "factory": factory_used, "trained_rows": int(trained),
                             "marks_sha256": _marks_digest(rep)}, why=why)
    return rep, plan


def commit(plan: NearDupPlan) -> None:
    """Write the sidecar: from now on the saved index and the manifest's marks go together."""
    atomic_write_json(_sidecar(plan.path), plan.meta)


def clear(paths: RunPaths, key: str, cfg: IndexConfig) -> None:
    """Forget a saved near-duplicate search (near duplicates switched off)."""
    path = near_dup_path(paths, key, cfg.near_dup_space)
    for p in (_sidecar(path), path):
        p.unlink(missing_ok=True)
