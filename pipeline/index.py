"""FAISS index over cached embeddings: build / search / save / load, numpy brute force as the
reference, and near-duplicate groups.

All vectors are L2-normalised float32 and compared by inner product, so every score is a cosine.
The index type is chosen by size (exact `Flat` for small pools, `IVF{nlist},Flat` for larger,
`IVF{nlist},PQ{m}` past a memory budget) unless a factory string is given. Searches run in
blocks of queries (as faiss `contrib/exhaustive_search.py` does) so memory stays bounded, and a
numpy brute force is the reference every fast path is checked against (faiss
`contrib/evaluation.py` habit). faiss is imported only in this module.

Index ids are manifest rows: row i of `features/<key>.npy` is vector i of `index/<key>.faiss`.
"""
from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
from webkd.pipeline.progress import tqdm

from webkd.pipeline.config import IndexConfig
from webkd.pipeline.storage import atomic_path, read_json

log = logging.getLogger(__name__)

MIN_POINTS_PER_LIST = 39          # faiss k-means warns below 39 training points per centroid
PQ_MIN_TRAIN = 256                # 8-bit PQ needs at least 2^8 training vectors
_PROGRESS_MIN_BLOCKS = 4          # show a progress bar when a search has at least this many blocks


# --------------------------------------------------------------------------------------------
# vectors
# --------------------------------------------------------------------------------------------
def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised float32 copy (C-contiguous, as faiss wants). Non-finite values
    become 0 and all-zero rows stay zero (they score 0 against everything) instead of NaN."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")  # (N, D)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of embeddings, got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        log.warning("%d non-finite embedding values set to 0", int(bad.sum()))
        x[bad] = 0.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


# --------------------------------------------------------------------------------------------
# choosing and building an index
# --------------------------------------------------------------------------------------------
def _nlist(n: int, per_sqrt: float = 4.0) -> int:
    """~per_sqrt * sqrt(n) inverted lists, clamped so each list gets >= 39 training points."""
    return max(1, min(int(round(per_sqrt * math.sqrt(n))), n // MIN_POINTS_PER_LIST))


def _pq_m(n: int, d: int, budget_bytes: float) -> int:
    """Number of PQ sub-quantisers: a divisor of d, at most 64 and at most d/2 (>= 2 dims per
    sub-vector), the largest whose codes (n*m bytes) fit the budget; else the smallest divisor."""
    divisors = [m for m in range(1, d + 1) if d % m == 0 and m <= 64 and (m <= d // 2 or d == 1)]
    fitting = [m for m in divisors if n * m <= budget_bytes]
    return max(fitting) if fitting else min(divisors)


FAST_SCAN_LISTS_PER_SQRT = 2.0   # IVF{2 sqrt N} for the fast-scan IVF-PQ (measured at 1M: BENCHMARKS.md, Scale)
FAST_SCAN_NPROBE = 10            # its default probes (nprobe 8: recall@10 0.916, 12: 0.942 at 1M)
FLAT_NPROBE = 16                 # the IVF-Flat default probes (recall@10 0.96-0.97 from 60k to 1M rows)


def is_fast_scan(factory: str) -> bool:
    """A 4-bit fast-scan PQ factory (`PQ{m}x4fs`): FAISS's SIMD-scanned codes."""
    return re.search(r"(^|,)PQ\d+x4fs", factory) is not None


def metric_for(factory: str) -> int:
    """The FAISS metric an index of this factory is built with. Every vector is L2-normalised, so
    inner product and L2 rank neighbours alike (|a - b|^2 = 2 - 2 cos). Fast-scan PQ is built with
    L2: with inner product FAISS 1.15's fast-scan IVF-PQ found 0.23-0.46 of the true 10 neighbours
    (0.49-0.95 with L2) on the scale bench's embeddings, whatever nprobe. `search` turns L2
    distances back into cosines, so callers always get cosines."""
    return faiss.METRIC_L2 if is_fast_scan(factory) else faiss.METRIC_INNER_PRODUCT


def default_nprobe(factory: str) -> int:
    return FAST_SCAN_NPROBE if is_fast_scan(factory) else FLAT_NPROBE


def choose_factory(n: int, d: int, cfg: IndexConfig) -> str:
    """The FAISS factory string for n vectors of dimension d (`cfg.factory` wins when given).

    - exact `Flat` for n <= cfg.flat_max;
    - `IVF{4 sqrt n},Flat` above that;
    - from cfg.ivfpq_min vectors on, while the raw float32 vectors (n*d*4 bytes) fit
      cfg.memory_budget_mb: `IVF{2 sqrt n},PQ{m}x4fs,RFlat`, 4-bit fast-scan PQ codes (m = d/2,
      at most 64) scanned with SIMD, the k x `refine_k_factor` best re-ranked by exact cosines
      (the index also holds the raw vectors). At 1M x 128 on one core: all-rows k-NN 41-49 s at
      recall@10 0.92-0.94 vs 228 s at 0.965 for IVF4000,Flat (nprobe 16);
    - `IVF{4 sqrt n},PQ{m}` (8-bit codes, no raw vectors) when the raw vectors exceed the memory
      budget, as long as there are enough vectors to train 8-bit PQ codebooks.
    """
    if cfg.factory:
        return cfg.factory
    if n < 1 or d < 1:
        raise ValueError(f"cannot index {n} vectors of dimension {d}")
    budget = cfg.memory_budget_mb * 2**20
    if n * d * 4 > budget:
        if n >= PQ_MIN_TRAIN:
            return f"IVF{_nlist(n)},PQ{_pq_m(n, d, budget)}"
        log.warning("raw vectors exceed the memory budget but %d vectors are too few to train PQ; "
                    "using an exact Flat index", n)
        return "Flat"
    if n >= cfg.ivfpq_min and n >= PQ_MIN_TRAIN:
        m = _pq_m(n, d, math.inf)   # the most sub-quantisers _pq_m allows: 4-bit codes, no budget to fit
        return f"IVF{_nlist(n, FAST_SCAN_LISTS_PER_SQRT)},PQ{m}x4fs,RFlat"
    if n <= cfg.flat_max:
        return "Flat"
    return f"IVF{_nlist(n)},Flat"


def new_index(d: int, factory: str, cfg: IndexConfig) -> faiss.Index:
    """An empty (untrained) index of `factory` with its metric (`metric_for`), polysemous
    training off and the refinement's k factor set."""
    index = faiss.index_factory(d, factory, metric_for(factory))
    _no_polysemous(index)
    set_k_factor(index, cfg.refine_k_factor)
    return index


def to_device(index: faiss.Index, factory: str, cfg: IndexConfig) -> faiss.Index:
    """`index` on every GPU faiss sees when `cfg.use_gpu == "auto"`, else (or when the GPU
    kernels refuse it) the CPU index itself."""
    if cfg.use_gpu == "auto" and _gpu_count() > 0:
        try:
            index = faiss.index_cpu_to_all_gpus(index)
            log.info("FAISS index %s on %d GPU(s)", factory, _gpu_count())
        except RuntimeError as exc:  # e.g. a PQ size the GPU kernels do not support
            log.warning("FAISS GPU index for %s failed (%s); staying on CPU", factory, exc)
    return index


def set_k_factor(index: faiss.Index, k_factor: float) -> None:
    """How many candidates (k x k_factor) a refining index (`...,RFlat`) re-ranks exactly."""
    inner = faiss.downcast_index(index)
    if hasattr(inner, "k_factor"):
        inner.k_factor = float(k_factor)


def train_rows(n: int, cfg: IndexConfig, seed: int = 0) -> np.ndarray:
    """Sorted rows an IVF index is trained on: `cfg.train_per_list` vectors per list (at least
    PQ_MIN_TRAIN * 40, so PQ codebooks get enough), a seeded sample when the pool has more."""
    n_train = min(n, max(_nlist(n) * cfg.train_per_list, PQ_MIN_TRAIN * 40))
    if n_train >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))


def _gpu_count() -> int:
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set the number of probed lists on an IVF index (CPU, also inside a refining index; GPU, or
    replicated over several GPUs); a no-op for index types without lists (Flat)."""
    try:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
        return
    except (RuntimeError, TypeError, AttributeError):
        pass   # not a CPU IVF index: the parameter space knows GPU and replicated indexes
    space = faiss.GpuParameterSpace() if _gpu_count() > 0 and hasattr(faiss, "GpuParameterSpace") \
        else faiss.ParameterSpace()
    try:
        space.set_index_parameter(index, "nprobe", nprobe)
    except RuntimeError:
        pass  # not an IVF index: nothing to probe


def index_nprobe(index: faiss.Index) -> int | None:
    """The probes a (CPU) IVF index searches with; None for an index without lists."""
    try:
        return int(faiss.extract_index_ivf(index).nprobe)
    except (RuntimeError, TypeError, AttributeError):
        return None


def resolve_nprobe(cfg: IndexConfig, factory: str) -> int:
    """`cfg.nprobe`, or the factory's default (`default_nprobe`) when it is unset."""
    return int(cfg.nprobe) if cfg.nprobe is not None else default_nprobe(factory)


def _no_polysemous(index: faiss.Index) -> None:
    """Switch off polysemous PQ training (on by default for factory PQ indexes). It only serves
    Hamming-distance pre-filtering, which we never use, and costs minutes of simulated annealing
    even on a few thousand vectors."""
    try:
        inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    except (RuntimeError, TypeError):
        inner = faiss.downcast_index(index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def build_index(embeddings: np.ndarray, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """Build (train when needed, add, set nprobe) an inner-product index over the L2-normalised
    embeddings. Runs on the GPU(s) when faiss has any and `cfg.use_gpu == "auto"`; the returned
    index may then be a GPU index (`save_index` always writes a CPU copy)."""
    x = normalize(embeddings)  # (N, D)
    n, d = x.shape
    factory = choose_factory(n, d, cfg)
    index = to_device(new_index(d, factory, cfg), factory, cfg)
    t0 = time.perf_counter()
    if not index.is_trained:
        rows = train_rows(n, cfg, seed)
        index.train(x if len(rows) == n else x[rows])
    step = max(cfg.block_size * 16, 65536)
    for lo in tqdm(range(0, n, step), desc=f"index add ({factory})", unit="block",
                   disable=n <= step * _PROGRESS_MIN_BLOCKS):
        index.add(x[lo:lo + step])
    set_nprobe(index, resolve_nprobe(cfg, factory))
    log.info("built %s over %d x %d in %.2fs", factory, n, d, time.perf_counter() - t0)
    return index


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------
def search(index: faiss.Index, queries: np.ndarray, k: int, block_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """k-NN search in blocks of `block_size` queries (L2-normalised here).

    Returns (scores float32 (Q, k), ids int64 (Q, k)), best first; missing neighbours (k larger
    than what the index can return) have id -1 and score -inf, as faiss reports them.
    """
    q = normalize(queries)  # (Q, D)
    nq = q.shape[0]
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index {index.d}")
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    starts = range(0, nq, block_size)
    for lo in tqdm(starts, desc="knn search", unit="block", disable=len(starts) < _PROGRESS_MIN_BLOCKS):
        s, i = index.search(q[lo:lo + block_size], k)
        scores[lo:lo + block_size], ids[lo:lo + block_size] = s, i
    if index.metric_type == faiss.METRIC_L2:   # squared distances of unit vectors -> cosines (missing: -inf)
        scores = np.where(ids >= 0, 1.0 - scores / 2.0, -np.inf).astype(np.float32)
    return scores, ids


def brute_force_knn(base: np.ndarray, queries: np.ndarray, k: int, block_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact reference k-NN with numpy, in blocks of queries: cosines of the L2-normalised
    float32 vectors, accumulated in float64 so the result does not depend on the block size.

    Ties are broken by the smaller id, so the result is deterministic.
    Same return convention as `search`.
    """
    b = normalize(base).astype(np.float64)     # (N, D)
    q = normalize(queries).astype(np.float64)  # (Q, D)
    n, nq = b.shape[0], q.shape[0]
    kk = min(k, n)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    starts = range(0, nq, block_size)
    for lo in tqdm(starts, desc="brute-force knn", unit="block", disable=len(starts) < _PROGRESS_MIN_BLOCKS):
        sims = q[lo:lo + block_size] @ b.T  # (B, N)
        if kk < n:
            part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]  # (B, kk) unordered top-k
            # ties at the cut: take every column scoring >= the k-th value, then sort stably
            kth = np.take_along_axis(sims, part, 1).min(axis=1, keepdims=True)  # (B, 1)
            cand = [np.flatnonzero(row >= t) for row, t in zip(sims, kth[:, 0])]
        else:
            cand = [np.arange(n)] * sims.shape[0]
        for r, (row, c) in enumerate(zip(sims, cand)):
            order = c[np.lexsort((c, -row[c]))][:kk]  # by score desc, then id asc
            ids[lo + r, :kk] = order
            scores[lo + r, :kk] = row[order]
    return scores, ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of each row's exact k neighbours found by the approximate search (-1 ignored)."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError("approx and exact results have different numbers of queries")
    k = exact_ids.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / k) if hits else 1.0


def hamming_knn(base_codes: np.ndarray, query_codes: np.ndarray, k: int = 1,
                block_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """k nearest base codes of each query by Hamming distance, through an exact FAISS binary index
    (`IndexBinaryFlat`), in blocks of queries. Codes are packed bits, uint8 (N, B) (B bytes = 8B
    bits; perceptual hashes from pipeline/decontam.py). Returns (distances int32 (Q, k), ids int64
    (Q, k)), nearest first; missing neighbours (k > N) have id -1."""
    base = np.ascontiguousarray(base_codes, np.uint8)      # (N, B)
    q = np.ascontiguousarray(query_codes, np.uint8)         # (Q, B)
    if base.ndim != 2 or q.ndim != 2 or base.shape[1] != q.shape[1]:
        raise ValueError(f"binary codes must be (N, B) uint8 with the same B, got {base.shape} and {q.shape}")
    index = faiss.IndexBinaryFlat(8 * base.shape[1])
    index.add(base)
    dist = np.empty((len(q), k), np.int32)
    ids = np.full((len(q), k), -1, np.int64)
    for lo in range(0, len(q), block_size):
        d, i = index.search(q[lo:lo + block_size], k)
        dist[lo:lo + block_size], ids[lo:lo + block_size] = d, i
    return dist, ids


# --------------------------------------------------------------------------------------------
# disk
# --------------------------------------------------------------------------------------------
def save_index(index: faiss.Index, path: str | Path) -> Path:
    """Write the index atomically; a GPU index is copied to the CPU first."""
    if "Gpu" in type(index).__name__ or _gpu_count() > 0:
        try:
            index = faiss.index_gpu_to_cpu(index)
        except (RuntimeError, AttributeError):
            pass  # already a CPU index
    with atomic_path(path, suffix=".faiss") as tmp:
        faiss.write_index(index, str(tmp))
    return Path(path)


def load_index(path: str | Path, nprobe: int | None = None, mmap_over_mb: float | None = None) -> faiss.Index:
    """Read a saved (CPU) index; set nprobe when given and the index is IVF. A file larger than
    `mmap_over_mb` is memory-mapped (faiss.IO_FLAG_MMAP): searched from the page cache, never
    read whole into memory. A memory-mapped index is for searching only (never add to it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no FAISS index at {path}: run `webkd index` first")
    mmap = mmap_over_mb is not None and path.stat().st_size > mmap_over_mb * 2**20
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP) if mmap else faiss.read_index(str(path))
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return index


# --------------------------------------------------------------------------------------------
# near duplicates
# --------------------------------------------------------------------------------------------
def perceptual_vectors(pixels: np.ndarray, side: int = 16) -> np.ndarray:
    """Teacher-independent vectors for near-duplicate search: each image area-averaged to a
    side x side colour thumbnail, standardised per image (zero mean, unit variance), float32
    (N, 3*side*side). Re-encoded, resized or lightly recompressed copies of a photo score a
    cosine near 1; distinct photos of the same kind of object on the same background do not.
    Measured at side 16: on the fashion-web pool (product photos on plain backgrounds, the hard
    case) the closest distinct pair scores 0.984 and an exact re-upload 0.9999; JPEG q60/q95
    re-encodes and resized copies of real photos score >= 0.99 (a 32 px photo shrunk by 6 px and
    blown up again: 0.9898). Hence the default threshold 0.99."""
    n, s = len(pixels), pixels.shape[1]
    out = np.empty((n, 3 * side * side), np.float32)
    # area-average pooling with fractional bin edges, as a (side, s) matrix applied on both axes
    edges = np.linspace(0, s, side + 1)
    pool = np.zeros((side, s), np.float32)
    for i in range(side):
        for j in range(s):
            pool[i, j] = max(0.0, min(edges[i + 1], j + 1) - max(edges[i], j))
    pool /= pool.sum(1, keepdims=True)
    block = max(1, 2 ** 24 // (s * s * 3))                                  # ~64 MB of float32 per block
    for start in range(0, n, block):
        x = np.asarray(pixels[start:start + block], np.float32).transpose(0, 3, 1, 2)  # (B, 3, S, S)
        t = pool @ x @ pool.T                                                # (B, 3, side, side)
        t = t.reshape(len(x), -1)
        t -= t.mean(1, keepdims=True)
        t /= t.std(1, keepdims=True) + 1e-6
        out[start:start + len(x)] = t
    return out


def near_dup_factory(n: int, exact_max: int) -> str:
    """The FAISS factory for a near-duplicate search over n vectors: exact `Flat` up to
    `exact_max`, else `IVF{~2 sqrt n},SQ8`. Near duplicates sit at cosine >= ~0.99, so a coarse
    partition (a few probed lists) finds them; 8-bit scalar codes hold the index at one byte per
    dimension; every decision is then made on exact float32 cosines (`leader_groups`)."""
    if n <= exact_max:
        return "Flat"
    return f"IVF{_nlist(n, 2.0)},SQ8"


def leader_groups(vectors: Callable[[np.ndarray], np.ndarray], n: int, threshold: float, index: faiss.Index,
                  k: int = 10, block_size: int = 4096, start: int = 0, rep: np.ndarray | None = None,
                  add: bool = True, margin: float = 1e-4) -> np.ndarray:
    """Representative row of each of n rows by leader grouping in row order (see
    `near_duplicate_groups`), streamed in blocks so only one block of vectors is in memory.

    `vectors(rows)` returns the L2-normalised float32 vectors of the given rows (any order).
    `index` searches them by inner product: with `add`, it holds rows 0..start-1 and each block is
    added before it is searched (a row's neighbours are then earlier rows and its own block);
    without, it already holds all n rows. Rows before `start` keep the representatives in `rep`
    (a refresh groups only the new rows). A neighbour j of row i is only followed when its search
    score can be within reach of the threshold: on the sphere, cos(i, rep[j]) >= t and
    cos(j, rep[j]) >= t need cos(i, j) >= cos(2 arccos t), less `margin` for an approximate
    index's score error. The representative is chosen on exact float32 cosines."""
    out = np.arange(n, dtype=np.int64)
    if rep is not None:
        out[:start] = np.asarray(rep, np.int64)[:start]
    if add and index.ntotal != start:
        raise ValueError(f"index holds {index.ntotal} vectors, expected the {start} rows before the first new one")
    if not add and index.ntotal != n:
        raise ValueError(f"index holds {index.ntotal} vectors, embeddings have {n} rows")
    reach = math.cos(min(math.pi, 2 * math.acos(min(1.0, max(-1.0, threshold))))) - margin  # -inf: follow all
    kk = k + 1                                                  # +1 for the row itself
    starts = range(start, n, block_size)
    for lo in tqdm(starts, desc="near-duplicate search", unit="block", disable=len(starts) < _PROGRESS_MIN_BLOCKS):
        rows = np.arange(lo, min(n, lo + block_size))
        v = np.ascontiguousarray(vectors(rows), np.float32)     # (B, D)
        if add:
            index.add(v)
        scores, ids = index.search(v, min(kk, int(index.ntotal)))  # (B, kk)
        near = (ids >= 0) & (ids < rows[:, None]) & (scores >= reach)
        if not near.any():
            continue
        # every representative a row of this block can meet: its near neighbours and, for those
        # before the block, their representatives (those within the block are found in the loop
        # and are themselves near neighbours or representatives of earlier ones)
        nb = np.unique(ids[near])
        need = np.union1d(nb, out[nb[nb < lo]])
        outside = need[need < lo]
        vec = {int(r): v[r - lo] for r in need[need >= lo]}
        if len(outside):
            vec.update(zip(outside.tolist(), np.ascontiguousarray(vectors(outside), np.float32)))
        for b in np.flatnonzero(near.any(1)):
            i = lo + int(b)
            cands = {int(out[j]) for j in ids[b][near[b]]}
            c = np.fromiter(cands, np.int64)
            cos = np.array([float(vec[int(r)] @ v[b]) for r in c])  # exact cosines to the leaders
            best = int(np.argmax(cos))
            if cos[best] >= threshold:
                out[i] = c[best]
    return out


def near_duplicate_groups(embeddings: np.ndarray, threshold: float, k: int = 10, block_size: int = 4096,
                          index: faiss.Index | None = None) -> np.ndarray:
    """Representative row of each row's near-duplicate group.

    Leader grouping in row order: row i joins the group of an earlier representative r only if
    cos(i, r) >= `threshold` (the closest such r among i's k nearest neighbours and their
    representatives); otherwise it leads a group of its own. Every member is within the
    threshold of its representative (no chains of "similar to something similar"), and since
    rows are only ever appended, representatives stay stable as the pool grows. Rows with
    `rep[i] == i` are kept. `index` (built over the same rows) is used for the search when
    given; otherwise an exact Flat index filled block by block (`leader_groups`).
    """
    x = normalize(embeddings)  # (N, D)
    n = x.shape[0]
    if n < 2:
        return np.arange(n, dtype=np.int64)
    add = index is None
    if add:
        index = faiss.IndexFlatIP(x.shape[1])
    # a given index may be approximate (PQ scores): follow every neighbour it proposes
    return leader_groups(lambda rows: x[rows], n, threshold, index, k=k, block_size=block_size, add=add,
                         margin=1e-4 if add else math.inf)


def index_vectors(embeddings: np.ndarray, center: np.ndarray | None) -> np.ndarray:
    """What the index holds: embeddings minus the pool mean (when centring), L2-normalised."""
    x = np.asarray(embeddings, np.float32)
    return normalize(x - center if center is not None else x)


def index_meta_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def load_index_center(path: str | Path) -> np.ndarray | None:
    """The centring vector saved beside an index (None: the index is not centred)."""
    meta = read_json(index_meta_path(path), default=None) or {}
    return np.asarray(meta["center"], np.float32) if meta.get("center") is not None else None
