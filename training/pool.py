"""The training pool: what every stage that trains, scores or selects reads about the run's images.

`build_pool` is the one place the pool rules live: the content-hash train/validation split,
web query -> class labels (or refined labels) with the human label corrections of the overrides
store applied (`selection.overrides.apply_labels`: a relabelled row trains, validates and is
selected with its new class; relabelled off-class, its query maps to no class), the teachers' cached logits, FAISS neighbours for
k-NN agreement, and class groups. The distill, curate and refresh stages, the bench scripts and
the refresh's champion/challenger comparison all read the pool through it, once per command.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from webkd.pipeline.config import DataConfig
from webkd.pipeline.features import load_features
from webkd.pipeline.paths import RunPaths
from webkd.pipeline.pixels import pixel_cache
from webkd.pipeline.records import class_index, load_manifest
from webkd.pipeline.storage import ids_sha256
from webkd.selection.counts import scored_validation
from webkd.selection.overrides import apply_labels, load_labels

log = logging.getLogger(__name__)


@dataclass
class Pool:
    """Everything the loop needs about the image pool, row-aligned with the manifest."""

    pixels: np.ndarray                  # (N, S, S, 3) uint8 RGB
    ids: list[str]
    split: np.ndarray                   # (N,) "train" | "val"
    status: np.ndarray                  # (N,) manifest status ("ok", "near_duplicate", ...)
    labels: np.ndarray                  # (N,) int64 training labels (web class or refined), -1 unknown
    web_labels: list[str | None]
    web_class: np.ndarray               # (N,) int64 web query mapped to a teacher class, -1 off-class
    val_labels: np.ndarray              # (N,) int64 labels used for validation accuracy, -1 not scored
    teacher_logits: np.ndarray | None = None   # (N, K) deterministic-view teacher logits (cached)
    neighbors: np.ndarray | None = None        # (N, k) FAISS neighbours, for k-NN agreement
    class_group: np.ndarray | None = None      # (K,) classes in one group count as equal in validation
    label_columns: dict[str, np.ndarray] | None = None  # refined-label columns for the ledger
    relabels: dict[str, str | None] | None = None      # the store's label corrections applied (id -> class)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def candidates(self) -> np.ndarray:
        """Rows that may be trained on: train split, status ok."""
        return (self.split == "train") & (self.status == "ok")

    @property
    def validation_rows(self) -> np.ndarray:
        """(n,) manifest rows every validation score is computed on (`selection.counts.scored_validation`:
        split val, status ok), in the loop's checkpoint choice and in the registry's comparison."""
        return np.flatnonzero(scored_validation(self.split, self.status))


@dataclass(frozen=True)
class NeighborSearch:
    """Where the k-NN neighbours come from: the FAISS index of `encoder` in the run directory."""

    encoder: str
    k: int
    nprobe: int | None = None         # None: the probes saved with the index (its type's default)
    block_size: int = 4096
    mmap_mb: float | None = None      # an index file larger than this is memory-mapped (IO_FLAG_MMAP)


def split_of(record_id: str, val_fraction: float) -> str:
    """Deterministic train/val split from the content hash: stable when the pool grows."""
    return "val" if int(record_id[:8], 16) / 16 ** 8 < val_fraction else "train"


def splits_of(ids: Sequence[str], val_fraction: float) -> np.ndarray:
    """(N,) object array of "train" / "val" for `ids` (see `split_of`)."""
    return np.array([split_of(i, val_fraction) for i in ids], dtype=object)


def class_groups(data: DataConfig) -> np.ndarray | None:
    """(K,) group id per class (the smallest member's index) from `data.class_groups`."""
    if not data.class_groups:
        return None
    lookup = {c: i for i, c in enumerate(data.classes)}
    group = np.arange(len(data.classes))
    for members in data.class_groups:
        idx = [lookup[m] for m in members if m in lookup]
        if len(idx) != len(members):
            raise ValueError(f"data.class_groups entry {members} names classes not in data.classes")
        group[idx] = min(idx)
    return group


def refined_labels(paths: RunPaths, ids: list[str]) -> np.ndarray:
    """Refined labels (PLL two-hot curation) aligned to ids; -1 where none."""
    import pyarrow.parquet as pq

    if not paths.labels.exists():
        raise FileNotFoundError(f"train.label_source=refined but {paths.labels} does not exist: run `webkd refine` first")
    t = pq.read_table(paths.labels, columns=["id", "refined_label"]).to_pydict()
    lookup = dict(zip(t["id"], t["refined_label"]))
    return np.array([lookup.get(i, -1) if lookup.get(i) is not None else -1 for i in ids], np.int64)


def mean_teacher_logits(paths: RunPaths, teacher_keys: Sequence[str], rows: int, num_classes: int) -> np.ndarray | None:
    """Mean cached logits of the teachers over the run's classes, or None unless every teacher
    has a cache of all `rows` rows. Teachers of other tasks (UNIC: other class counts) do not
    take part in curation."""
    caches = [load_features(paths, k) for k in teacher_keys]
    if not caches or not all(c is not None and c.rows == rows for c in caches):
        return None
    same = [c for c in caches if c.num_classes == num_classes]
    return np.mean([np.asarray(c.logits, np.float32) for c in same], axis=0) if same else None


def neighbors_of(paths: RunPaths, search: NeighborSearch) -> np.ndarray:
    """(N, k) FAISS neighbours of every row (itself left out), from the run's index. The queries
    are made (centred, normalised float32) `search.block_size` rows at a time: besides the index
    and the (N, k) answer, memory holds one block, not float32 copies of all N embeddings."""
    from webkd.pipeline.index import index_vectors, load_index, load_index_center
    from webkd.pipeline.index import search as knn_search
    from webkd.pipeline.progress import tqdm

    cache = load_features(paths, search.encoder)
    idx = load_index(paths.index(search.encoder), nprobe=search.nprobe, mmap_over_mb=search.mmap_mb)
    center = load_index_center(paths.index(search.encoder))
    emb = cache.embeddings
    out = np.empty((len(emb), search.k), np.int64)
    starts = range(0, len(emb), search.block_size)
    for lo in tqdm(starts, desc="neighbours", unit="block", disable=len(starts) < 4):
        q = index_vectors(emb[lo:lo + search.block_size], center)
        _, nb = knn_search(idx, q, search.k + 1, search.block_size)   # (B, k + 1), usually itself first
        # drop each row's own id (or, when the search missed it, the last neighbour)
        own = nb == np.arange(lo, lo + len(nb))[:, None]
        own[~own.any(1), -1] = True
        out[lo:lo + len(nb)] = nb[~own].reshape(len(nb), search.k)
    return out


def build_pool(paths: RunPaths, data: DataConfig, teacher_keys: Sequence[str] = (), label_source: str = "web",
               neighbors: NeighborSearch | None = None) -> Pool:
    """The run's pool, row-aligned with its manifest (read once here)."""
    records = load_manifest(paths.manifest)
    if not records:
        raise ValueError(f"{paths.manifest} has no records: run `webkd ingest` first")
    pix = pixel_cache(paths, records, data.image_size, data.fit)   # rows whose file is gone: source_missing
    ids = [r.id for r in records]
    web_class = np.array(class_index(records, data.classes, data.label_map), np.int64)
    split = splits_of(ids, data.val_fraction)
    labels = refined_labels(paths, ids) if label_source == "refined" else web_class.copy()
    relabels = load_labels(paths.overrides)
    if relabels:  # a human label wins over the query mapping and over a refined label
        rows, fixed = apply_labels(ids, relabels, data.classes, str(paths.overrides))
        web_class[rows] = fixed
        labels[rows] = fixed
        log.info("%d label correction(s) from %s applied to the pool", len(rows), paths.overrides.name)
    label_cols = None
    if label_source == "refined":  # the ledger shows the refined labels (selection/refine.py)
        from webkd.selection.refine import label_columns

        label_cols = label_columns(paths.labels, ids)
    return Pool(pixels=pix, ids=ids, split=split, status=np.array([r.status for r in records], dtype=object),
                labels=labels, web_labels=[r.web_label for r in records], web_class=web_class,
                val_labels=np.where(split == "val", web_class, -1),
                teacher_logits=mean_teacher_logits(paths, teacher_keys, len(records), len(data.classes)),
                neighbors=neighbors_of(paths, neighbors) if neighbors is not None else None,
                class_group=class_groups(data), label_columns=label_cols, relabels=relabels or None)


def sample_batch(pool: Pool, n: int = 8):
    """The first `n` images as float RGB [0, 1] (n, 3, S, S): what methods and export are built on."""
    import torch

    return torch.from_numpy(np.array(pool.pixels[:n])).permute(0, 3, 1, 2).float() / 255


def pool_state(ids: Sequence[str], overrides: Mapping[str, str], config_fingerprint: str,
               labels: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """What a student is trained on: the pool (ids), the human overrides (decisions and label
    corrections) and the training config. Two trainings with the same state would learn the same
    thing, so a refresh skips the second."""
    ov_doc: Any = dict(sorted(overrides.items()))
    if labels:  # (without corrections the digest is the decisions' alone, as before labels existed)
        ov_doc = {"decisions": ov_doc, "labels": dict(sorted(labels.items()))}
    ov = hashlib.sha256(json.dumps(ov_doc, sort_keys=True).encode()).hexdigest()
    return {"rows": len(ids), "ids_sha256": ids_sha256(ids), "overrides_sha256": ov,
            "config": str(config_fingerprint)}
