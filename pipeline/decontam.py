"""Decontamination: pool images that are exact or near duplicates of an evaluation image.

DataComp removes near duplicates of evaluation images from its pools; so does this stage. Each
evaluation source (`data.decontaminate`, and `data.test_source` with `decontam.test_source`) is
ingested as a run of its own (`RunPaths.eval_set` / `RunPaths.test_dir`: manifest, pixel cache,
features), then every pool row is compared with every evaluation image by up to three methods:

- `exact`: the same bytes (the record id is the sha256 of the file);
- `phash`: a 64-bit DCT perceptual hash (pHash: the 32 x 32 grey image's 8 x 8 lowest DCT
  frequencies against their median) of the pixel cache, matched within `phash_max_bits` bits
  through an exact FAISS binary index (`pipeline.index.hamming_knn`). It survives resizing and
  JPEG re-encoding; crops survive because each evaluation image is also hashed at the centre
  crops `phash_crops`. A hash match counts only when the standardised colour thumbnails of the
  two images (the matched crop) also agree (cosine >= `phash_verify`): distinct line drawings on
  white share most of their 64 bits;
- `embedding`: the cosine of the encoder's cached embeddings (both centred on the pool mean, as
  the run's index is), nearest evaluation image through a FAISS index, >= `embedding_threshold`.

A matched row gets manifest status `eval_duplicate` (`dup_of` = the evaluation image's id), so it
is never a training candidate and never a scored validation row (`selection.counts`), plus one
quarantine row (reason `eval_duplicate`, detail: method, similarity, the evaluation image) and
one row per (pool row, method) in `eval_duplicates.parquet`. Marks are recomputed from scratch on
every run: a row no longer matched goes back to `ok` (the index stage regroups it), and no
evaluation source clears every mark. The thresholds are measured by bench/decontam.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from webkd.pipeline.config import DecontamConfig, IndexConfig, IngestConfig
from webkd.pipeline.config_io import ConfigError
from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import (EVAL_DUPLICATE, OK, QuarantineRow, load_manifest, load_quarantine,
                                    quarantine_to_table, records_to_table)
from webkd.pipeline.storage import atomic_write_table, commit_files

log = logging.getLogger(__name__)

HASH_SIDE = 32            # pHash: the grey image is brought to 32 x 32 ...
HASH_LOW = 8              # ... and its 8 x 8 lowest DCT frequencies make the 64 bits
FLAT_STD = 1.0            # grey std (0-255) below which an image is flat and gets no pHash
METHODS = ("exact", "phash", "embedding")   # also the order of precedence for the reported match


# --------------------------------------------------------------------------------------------
# perceptual hash
# --------------------------------------------------------------------------------------------
def _area_matrix(src: int, dst: int, lo: float = 0.0, hi: float | None = None) -> np.ndarray:
    """(dst, src) area-averaging resampling matrix with fractional bin edges, of the window
    [lo, hi) of the source axis (default: all of it)."""
    edges = np.linspace(lo, src if hi is None else hi, dst + 1)
    j = np.arange(src)
    m = np.clip(np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j), 0, None)  # overlaps
    return (m / m.sum(1, keepdims=True)).astype(np.float32)


def phash(pixels: np.ndarray, block: int = 8192, crop: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """64-bit DCT perceptual hashes of uint8 RGB (N, S, S, 3) images.

    Grey (ITU-R 601 luma) -> area-resampled to 32 x 32 -> 2-D DCT-II -> the 8 x 8 lowest
    frequencies -> bit = coefficient > their median (Zauner's pHash, as `imagehash.phash`).
    Returns (codes uint8 (N, 8) packed bits, valid bool (N,)); a flat image (a black row of a
    failed decode, a blank page) is not valid: its bits are noise and it matches nothing."""
    n, s = len(pixels), pixels.shape[1]
    margin = s * (1 - crop) / 2
    a = _area_matrix(s, HASH_SIDE, margin, s - margin)                           # (32, S)
    k = np.arange(HASH_LOW)[:, None]
    dct = np.cos(np.pi * (2 * np.arange(HASH_SIDE)[None, :] + 1) * k / (2 * HASH_SIDE)).astype(np.float32)  # (8, 32)
    left = dct @ a                                                               # (8, S): resample, then DCT
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    codes = np.zeros((n, HASH_LOW * HASH_LOW // 8), np.uint8)
    valid = np.zeros(n, bool)
    for lo in range(0, n, block):
        g = np.asarray(pixels[lo:lo + block], np.float32) @ luma                # (B, S, S)
        low = (left @ g @ left.T).reshape(len(g), -1)                            # (B, 64)
        codes[lo:lo + len(g)] = np.packbits(low > np.median(low, axis=1, keepdims=True), axis=1)
        valid[lo:lo + len(g)] = (a @ g @ a.T).reshape(len(g), -1).std(1) > FLAT_STD
    return codes, valid


def thumbnails(pixels: np.ndarray, crop: float = 1.0, side: int = 16, block: int = 8192) -> np.ndarray:
    """Per-image standardised colour thumbnails (side x side, area-averaged from the centre crop
    `crop`), L2-normalised float32 (N, 3 side^2): the check behind a pHash match. 64 bits of grey
    DCT signs cannot tell two line drawings on white apart; their colour thumbnails can."""
    n, s = len(pixels), pixels.shape[1]
    margin = s * (1 - crop) / 2
    a = _area_matrix(s, side, margin, s - margin)                                # (side, S)
    out = np.empty((n, 3 * side * side), np.float32)
    for lo in range(0, n, block):
        x = np.asarray(pixels[lo:lo + block], np.float32).transpose(0, 3, 1, 2)   # (B, 3, S, S)
        t = (a @ x @ a.T).reshape(len(x), -1)                                    # (B, 3 side^2)
        t -= t.mean(1, keepdims=True)
        t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-6
        out[lo:lo + len(x)] = t
    return out


def phash_nearest(eval_pixels: np.ndarray, pool_pixels: np.ndarray, crops: Sequence[float] = (1.0,)
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pool image, the evaluation image (any of its centre crops) with the nearest pHash
    (FAISS binary index): (Hamming bits (N,) int32, 64 for an invalid hash; eval row (N,) int64;
    thumbnail cosine (N,) float32 between the pool image and that evaluation crop)."""
    from webkd.pipeline.index import hamming_knn

    m, n = len(eval_pixels), len(pool_pixels)
    hashed = [phash(eval_pixels, crop=c) for c in crops]                         # (M, 8) codes per crop
    codes = np.concatenate([c for c, _ in hashed])                               # (C M, 8)
    keep = np.flatnonzero(np.concatenate([v for _, v in hashed]))
    pcodes, pvalid = phash(pool_pixels)
    bits = np.full(n, 64, np.int32)
    rows = np.full(n, -1, np.int64)
    cos = np.zeros(n, np.float32)
    if not len(keep) or not n:
        return bits, rows, cos
    d, j = hamming_knn(codes[keep], pcodes, 1)
    hit = keep[j[:, 0]]                                                          # (N,) row of the C M codes
    bits = np.where(pvalid, d[:, 0], 64).astype(np.int32)
    rows = hit % m
    pt = thumbnails(pool_pixels)
    for c_idx, c in enumerate(crops):                                            # thumbnail of the matched crop
        sel = np.flatnonzero(hit // m == c_idx)
        if len(sel):
            cos[sel] = np.einsum("nd,nd->n", pt[sel], thumbnails(eval_pixels[rows[sel]], crop=c))
    return bits, rows, cos


# --------------------------------------------------------------------------------------------
# evaluation sets
# --------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One evaluation source, row-aligned: ids (sha256), uris, pixels (M, S, S, 3), embeddings (M, D)."""

    source: str
    ids: list[str]
    uris: list[str]
    pixels: np.ndarray
    embeddings: np.ndarray | None = None


def load_eval_set(source: str, root: str | Path, image_size: int, fit: str,
                  encoder: tuple[str, Callable, str] | None = None, batch_size: int = 256,
                  device: Any = "cpu", where: str = "evaluation source") -> EvalSet:
    """Ingest `source` into the run folder `root` (incrementally, as `data.test_source` is) and
    build its pixel cache at the pool's `image_size` / `fit`; with `encoder` = (cache key, model,
    fingerprint) its embeddings too (cached in `root/features/`). A source with no readable
    image is a ValueError naming `where`, the source and the quarantine reasons."""
    from collections import Counter

    from webkd.pipeline.features import build_pixel_cache, extract_features
    from webkd.pipeline.ingest import run_ingest

    epaths = RunPaths(Path(root))
    run_ingest([source], epaths, IngestConfig(min_side=1))
    records = load_manifest(epaths.manifest)
    if not records:
        why = Counter(q.reason for q in load_quarantine(epaths.quarantine))
        detail = ", ".join(f"{r} {n}" for r, n in why.most_common()) or "no image files listed"
        raise ConfigError(f"{where}: {source} has no readable image ({detail}); give a folder:, manifest: or "
                          "wds: source of evaluation images")
    pix = build_pixel_cache(records, epaths.pixels(image_size, fit), image_size, fit)
    emb = None
    if encoder is not None:
        key, model, fp = encoder
        cache = extract_features(model, pix, key, fp, epaths, batch_size=batch_size, device=device,
                                 row_ids=[r.id for r in records])
        emb = np.asarray(cache.embeddings, np.float32)
    return EvalSet(source=source, ids=[r.id for r in records], uris=[r.uri for r in records], pixels=pix,
                   embeddings=emb)


# --------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------
@dataclass
class Matches:
    """Per pool row and method, the nearest evaluation image (-1: none within the threshold)
    and its similarity (exact 1; phash 1 - bits / 64; embedding the cosine)."""

    eval_row: dict[str, np.ndarray]       # method -> (N,) int64 row into the concatenated eval sets
    similarity: dict[str, np.ndarray]     # method -> (N,) float32
    hamming: np.ndarray | None = None     # (N,) int32 pHash distance to that image (-1 none)

    def flagged(self) -> np.ndarray:
        return np.any([r >= 0 for r in self.eval_row.values()], axis=0) if self.eval_row else np.zeros(0, bool)


def embedding_nearest(pool_emb: np.ndarray, eval_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cosine (N,), eval row (N,)) of each pool row's nearest evaluation image, both sets centred
    on the pool mean and L2-normalised, searched through an exact FAISS index over the eval set."""
    from webkd.pipeline.index import build_index, index_vectors, search

    pool = np.asarray(pool_emb, np.float32)
    center = pool.mean(0)
    index = build_index(index_vectors(eval_emb, center), IndexConfig(factory="Flat", use_gpu="never"))
    sims, ids = search(index, index_vectors(pool, center), 1)
    return sims[:, 0], ids[:, 0]


def find_eval_duplicates(pool_ids: Sequence[str], pool_pixels: np.ndarray | None, pool_emb: np.ndarray | None,
                         evals: Sequence[EvalSet], cfg: DecontamConfig) -> Matches:
    """Match every pool row against the evaluation sets (concatenated, in order) with cfg.methods."""
    rows: dict[str, np.ndarray] = {}
    sims: dict[str, np.ndarray] = {}
    hamming = None
    eval_ids = [i for e in evals for i in e.ids]
    if "exact" in cfg.methods:
        where = {i: k for k, i in reversed(list(enumerate(eval_ids)))}
        rows["exact"] = np.array([where.get(i, -1) for i in pool_ids], np.int64)
        sims["exact"] = (rows["exact"] >= 0).astype(np.float32)
    if "phash" in cfg.methods and eval_ids:
        if pool_pixels is None:
            raise ValueError("decontam method phash needs the pool's pixel cache")
        bits, near, tcos = phash_nearest(np.concatenate([e.pixels for e in evals]), pool_pixels, cfg.phash_crops)
        ok = (bits <= cfg.phash_max_bits) & (tcos >= cfg.phash_verify)
        near = np.where(ok, near, -1)
        hamming = np.where(ok, bits, -1).astype(np.int32)
        rows["phash"] = near
        sims["phash"] = np.where(near >= 0, 1 - hamming / 64.0, 0).astype(np.float32)
    if "embedding" in cfg.methods and eval_ids:
        if pool_emb is None or any(e.embeddings is None for e in evals):
            raise ValueError("decontam method embedding needs the encoder's embeddings of the pool and of every "
                             "evaluation set")
        cos, j = embedding_nearest(pool_emb, np.concatenate([e.embeddings for e in evals]))
        hit = cos >= cfg.embedding_threshold
        rows["embedding"] = np.where(hit, j, -1)
        sims["embedding"] = np.where(hit, cos, 0).astype(np.float32)
    return Matches(rows, sims, hamming)


# --------------------------------------------------------------------------------------------
# the pipeline stage
# --------------------------------------------------------------------------------------------
@dataclass
class DecontamReport:
    eval_sources: list[str]
    eval_images: int
    rows: int
    flagged: int                          # rows with status eval_duplicate now
    by_method: dict[str, int] = field(default_factory=dict)   # rows each method matched (a row may count twice)
    changed: int = 0                      # rows whose status changed in this run
    seconds: float = 0.0

    def __str__(self) -> str:
        if not self.eval_sources:
            return f"decontamination: off ({self.changed} eval_duplicate marks cleared)"
        how = ", ".join(f"{m} {k}" for m, k in self.by_method.items())
        return (f"decontamination against {self.eval_images} evaluation images ({len(self.eval_sources)} source(s)): "
                f"{self.flagged} of {self.rows} pool rows are eval_duplicate ({how}), {self.changed} changed, "
                f"{self.seconds:.1f}s")


def _evidence_table(records: list, matches: Matches, evals: Sequence[EvalSet]) -> Any:
    import pyarrow as pa

    source = [e.source for e in evals for _ in e.ids]
    eids = [i for e in evals for i in e.ids]
    euris = [u for e in evals for u in e.uris]
    cols: dict[str, list] = {k: [] for k in ("row", "id", "uri", "method", "similarity", "hamming",
                                              "eval_source", "eval_row", "eval_id", "eval_uri")}
    for m, er in matches.eval_row.items():
        for row in np.flatnonzero(er >= 0).tolist():
            j = int(er[row])
            vals = (row, records[row].id, records[row].uri, m, float(matches.similarity[m][row]),
                    int(matches.hamming[row]) if m == "phash" else -1, source[j], j, eids[j], euris[j])
            for k, v in zip(cols, vals):
                cols[k].append(v)
    schema = pa.schema([("row", pa.int64()), ("id", pa.string()), ("uri", pa.string()), ("method", pa.string()),
                        ("similarity", pa.float32()), ("hamming", pa.int32()), ("eval_source", pa.string()),
                        ("eval_row", pa.int64()), ("eval_id", pa.string()), ("eval_uri", pa.string())])
    return pa.table(cols, schema=schema)


def decontaminate_run(paths: RunPaths, evals: Sequence[EvalSet], pixels: np.ndarray | None,
                      embeddings: np.ndarray | None, cfg: DecontamConfig) -> DecontamReport:
    """Mark the run's eval duplicates (see the module docstring); manifest, quarantine and
    `eval_duplicates.parquet` are committed together (`pipeline.storage.commit_files`)."""
    t0 = time.perf_counter()
    records = load_manifest(paths.manifest)
    n = len(records)
    for name, arr in (("pixel cache", pixels), ("feature cache", embeddings)):
        if arr is not None and len(arr) != n:
            raise ValueError(f"decontamination: the {name} has {len(arr)} rows, the manifest {n}: "
                             "re-run `webkd features`")
    if evals:
        matches = find_eval_duplicates([r.id for r in records], pixels, embeddings, evals, cfg)
    else:
        matches = Matches({}, {}, None)
    flagged = matches.flagged() if evals else np.zeros(n, bool)
    eids = [i for e in evals for i in e.ids]
    euris = [u for e in evals for u in e.uris]
    source = [e.source for e in evals for _ in e.ids]

    quarantine = [q for q in load_quarantine(paths.quarantine) if q.reason != EVAL_DUPLICATE]
    changed = 0
    for row, r in enumerate(records):
        if flagged[row]:
            m = next(m for m in METHODS if m in matches.eval_row and matches.eval_row[m][row] >= 0)
            j = int(matches.eval_row[m][row])
            new = (EVAL_DUPLICATE, eids[j])
            detail = "; ".join(
                f"{k} {'same bytes' if k == 'exact' else f'{matches.hamming[row]}/64 bits' if k == 'phash' else f'cosine {matches.similarity[k][row]:.4f}'}"
                f" to {euris[int(er[row])]}" for k, er in matches.eval_row.items() if er[row] >= 0)
            quarantine.append(QuarantineRow(uri=r.uri, source=r.source, reason=EVAL_DUPLICATE,
                                            detail=f"{detail} (evaluation source {source[j]})", id=r.id,
                                            web_label=r.web_label, dup_of=eids[j], batch=r.batch))
        elif r.status == EVAL_DUPLICATE:
            new = (OK, None)           # no longer matched: back in the pool (the index stage regroups it)
        else:
            continue
        if (r.status, r.dup_of) != new:
            changed += 1
            r.status, r.dup_of = new
    evidence = _evidence_table(records, matches, evals)
    if changed == 0 and _unchanged(paths, quarantine, evidence):
        log.debug("decontamination: nothing changed, nothing rewritten")
    else:
        _commit(paths, records, quarantine, evidence)
    report = DecontamReport(eval_sources=[e.source for e in evals], eval_images=len(eids), rows=n,
                            flagged=int(flagged.sum()),
                            by_method={m: int((er >= 0).sum()) for m, er in matches.eval_row.items()},
                            changed=changed, seconds=time.perf_counter() - t0)
    log.info("%s", report)
    return report


def _unchanged(paths: RunPaths, quarantine: list, evidence: Any) -> bool:
    """The quarantine and the evidence on disk are what this run would write."""
    import pyarrow.parquet as pq

    if not (paths.eval_duplicates.exists() and paths.quarantine.exists()):
        return False
    try:
        return (pq.read_table(paths.eval_duplicates).equals(evidence)
                and load_quarantine(paths.quarantine) == quarantine)
    except Exception:  # unreadable: rewrite
        return False


def _commit(paths: RunPaths, records: list, quarantine: list, evidence: Any) -> None:
    commit_files(paths.decontam_stage, [
        (paths.manifest, lambda p: atomic_write_table(p, records_to_table(records))),
        (paths.quarantine, lambda p: atomic_write_table(p, quarantine_to_table(quarantine))),
        (paths.eval_duplicates, lambda p: atomic_write_table(p, evidence))])
