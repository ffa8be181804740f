"""What the review page precomputes from a run's caches: "more like this" (each page row's nearest
neighbours in the run's FAISS index, `index/<encoder>.faiss`, with their cosine similarity) and
the teachers' probabilities behind the likely-label-error ranking (`selection.label_errors`).

The encoder is the run's index encoder as the resolved config.yaml names it (`index.encoder`,
else the first teacher's cache key), else the only index in `index/`. Any cache that is missing
or does not cover the manifest is skipped with a log line: the page works without it.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import yaml

from webkd.pipeline.features import load_features
from webkd.pipeline.paths import RunPaths

log = logging.getLogger(__name__)

NEIGHBOURS = 8        # "more like this" per page row (bounds the page: 2 x 8 numbers a row)


def _config(paths: RunPaths) -> dict:
    try:
        raw = yaml.safe_load(paths.config.read_text()) if paths.config.exists() else {}
    except (yaml.YAMLError, OSError) as exc:
        log.warning("%s unreadable (%s)", paths.config, exc)
        return {}
    return raw if isinstance(raw, dict) else {}


def teacher_keys(paths: RunPaths) -> list[str]:
    """Cache keys of the run's teachers (config.yaml `teachers[].key`, else the name)."""
    out = []
    for t in _config(paths).get("teachers") or []:
        if isinstance(t, dict) and (t.get("key") or t.get("name")):
            out.append(str(t.get("key") or str(t["name"]).replace("/", "_")))
    return out


def index_encoder(paths: RunPaths) -> str | None:
    """The encoder of the run's FAISS index (see the module docstring)."""
    key = (_config(paths).get("index") or {}).get("encoder") or next(iter(teacher_keys(paths)), None)
    if key and paths.index(str(key)).exists():
        return str(key)
    found = sorted(paths.index_dir.glob("*.faiss")) if paths.index_dir.is_dir() else []
    return found[0].stem if len(found) == 1 else None


def teacher_probs(paths: RunPaths, rows: np.ndarray, num_classes: int, n_manifest: int) -> np.ndarray | None:
    """(n, K) softmax of the mean cached teacher logits of manifest `rows`, or None unless every
    teacher of the run's classes has a cache of all `n_manifest` rows."""
    from webkd.selection.label_errors import softmax

    caches = [load_features(paths, k) for k in teacher_keys(paths)]
    if not caches or num_classes < 2 or any(c is None or c.rows != n_manifest for c in caches):
        return None
    same = [c for c in caches if c.num_classes == num_classes]
    if not same:
        return None
    logits = np.mean([np.asarray(c.logits[rows], np.float32) for c in same], axis=0)   # (n, K)
    return softmax(logits)


def page_neighbours(paths: RunPaths, rows: Sequence[int], n_manifest: int, k: int = NEIGHBOURS,
                    nprobe: int = 8) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Nearest neighbours of the page rows among the page rows.

    rows: (n,) manifest row of each page row. Returns (nb (n, k) int64 page positions, -1 where
    fewer; sim (n, k) float32 cosine similarity from the index; encoder), or None without an
    index of the whole manifest.
    """
    from webkd.pipeline.index import index_vectors, load_index, load_index_center, search

    key = index_encoder(paths)
    if key is None:
        return None
    cache = load_features(paths, key)
    if cache is None or cache.rows != n_manifest:
        log.info("no %s feature cache of all %d manifest rows: no 'more like this'", key, n_manifest)
        return None
    try:
        idx = load_index(paths.index(key), nprobe=nprobe)
    except Exception as exc:   # a damaged index must not stop the review page
        log.warning("%s unreadable (%s): no 'more like this'", paths.index(key), exc)
        return None
    if idx.ntotal != n_manifest:
        log.info("%s holds %d vectors, the manifest %d rows: no 'more like this'", paths.index(key), idx.ntotal, n_manifest)
        return None
    rows = np.asarray(rows, np.int64)
    pos = np.full(n_manifest, -1, np.int64)
    ok = (rows >= 0) & (rows < n_manifest)
    pos[rows[ok]] = np.flatnonzero(ok)
    nb = np.full((len(rows), k), -1, np.int64)
    sim = np.full((len(rows), k), np.nan, np.float32)
    if not ok.any():
        return nb, sim, key
    q = index_vectors(cache.embeddings[rows[ok]], load_index_center(paths.index(key)))   # (q, D)
    extra = min(idx.ntotal, k + 1 + 2 * k)          # room for self and rows the page lacks
    s, found = search(idx, q, extra)                 # (q, extra) manifest rows, best first
    for out_i, me, srow, frow in zip(np.flatnonzero(ok).tolist(), rows[ok].tolist(), s, found):
        keep = [(int(pos[j]), float(v)) for j, v in zip(frow.tolist(), srow.tolist())
                if 0 <= j < n_manifest and j != me and pos[j] >= 0][:k]
        for c, (j, v) in enumerate(keep):
            nb[out_i, c], sim[out_i, c] = j, v
    return nb, sim, key
