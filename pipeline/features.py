"""Batched, cached, incremental embedding + logit extraction (the pixel cache it reads is
`pipeline/pixels.py`; its names are importable from here too).

`extract_features`: an encoder (any callable `(B, 3, S, S) float [0, 1] -> Outputs-like`; this
layer does not import `training`) applied in batches under `torch.inference_mode()`, writing
`features/<key>.npy` float16 (N, D), `features/<key>.logits.npy` float16 (N, K) and
`features/<key>.json` {fingerprint, rows, dim, num_classes, ids_sha256, checksums}. Same
fingerprint and rows: nothing computed; more rows: only the new ones; another fingerprint:
everything again.

Every file is replaced atomically; a killed run leaves the old cache or the new one. The arrays
are written with plain buffered writes after a free-space check (`storage.DiskFull`) and carry a
crc32 per block (`pipeline.npyfile`) checked by `load_features`: a cache changed on disk, or a
damaged sidecar, is recomputed from its first damaged row, with one warning line.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from webkd.pipeline.npyfile import NpyWriter, npy_bytes, read_sidecar, verify_npy
from webkd.pipeline.paths import RunPaths
# the pixel cache moved to pipeline/pixels.py; its names stay importable from here (bench scripts)
from webkd.pipeline.pixels import FITS, build_pixel_cache, fit_square, pixel_meta_path  # noqa: F401
from webkd.pipeline.progress import tqdm
from webkd.pipeline.shards import Shard, clear_shards, content_key, local_map, plan_shards, shard_file
from webkd.pipeline.storage import atomic_path, atomic_write_json, ensure_free_space, ids_sha256

if TYPE_CHECKING:  # torch is imported lazily: pixel caching and the CLI do not need it
    import torch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------
def resolve_device(name: str | None = "auto") -> "torch.device":
    """`auto` -> CUDA when present, else CPU; `cpu`, `cuda`, `cuda:1`, ... are checked."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a torch device ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use device: auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


# --------------------------------------------------------------------------------------------
# feature cache
# --------------------------------------------------------------------------------------------
@dataclass
class FeatureCache:
    """One encoder's cached outputs; arrays are memory-mapped float16, row i = manifest row i."""

    key: str
    fingerprint: str
    embeddings: np.ndarray       # float16 (N, D)
    logits: np.ndarray           # float16 (N, K)
    computed: int = 0            # rows computed by the call that returned this (0 = all cached)

    @property
    def rows(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])


def _as_paths(paths: RunPaths | str | Path) -> RunPaths:
    return paths if isinstance(paths, RunPaths) else RunPaths(Path(paths))


def _read_features(paths: RunPaths, key: str) -> tuple[FeatureCache | None, dict[str, Any], int]:
    """(cache or None, its sidecar, rows before the first damaged one): the intact rows are fewer
    than the cache's when a block of either array does not match its checksum."""
    meta = read_sidecar(paths.features_meta(key), f"feature cache {key}")
    if not meta or not paths.features(key).exists() or not paths.logits(key).exists():
        return None, {}, 0
    try:
        emb = np.load(paths.features(key), mmap_mode="r")
        logits = np.load(paths.logits(key), mmap_mode="r")
    except (ValueError, OSError) as exc:
        log.warning("feature cache %s unreadable (%s): recomputing it", paths.features(key), exc)
        return None, {}, 0
    rows = int(meta.get("rows", -1))
    if emb.ndim != 2 or logits.ndim != 2 or len(emb) < rows or len(logits) < rows or rows < 0 \
            or emb.shape[1] != meta.get("dim") or logits.shape[1] != meta.get("num_classes"):
        return None, {}, 0
    checks = meta.get("checksums") if isinstance(meta.get("checksums"), dict) else {}
    damage = [d for name, f, a in (("embeddings", paths.features(key), emb), ("logits", paths.logits(key), logits))
              if (d := verify_npy(f, checks.get(name), len(a))) is not None]
    intact = min([rows] + [d.first_row for d in damage])
    if damage:
        log.warning("feature cache %s damaged (%s): not used; the features stage recomputes it from row %d",
                    key, "; ".join(map(str, damage)), intact)
    cache = FeatureCache(key=key, fingerprint=str(meta.get("fingerprint")), embeddings=emb[:rows], logits=logits[:rows])
    return cache, meta, intact


def load_features(paths: RunPaths | str | Path, key: str) -> FeatureCache | None:
    """The cached features of `key` in a run directory, or None when absent, inconsistent or
    damaged (checksums; the warning says which file)."""
    cache, _, intact = _read_features(_as_paths(paths), key)
    return cache if cache is not None and intact == cache.rows else None


def _batches(pixels: np.ndarray, start: int, batch_size: int, device: "torch.device") -> Iterator[tuple[int, "torch.Tensor"]]:
    """(row offset, uint8 (B, S, S, 3) tensor on `device`); the next batch is read from the
    (memory-mapped) cache in a background thread while the current one is encoded."""
    import torch

    pin = device.type == "cuda"

    def load(i: int) -> "torch.Tensor":
        t = torch.from_numpy(np.array(pixels[i:i + batch_size]))   # a writable copy out of the memory map
        return t.pin_memory() if pin else t

    starts = list(range(start, len(pixels), batch_size))
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(load, starts[0]) if starts else None
        for k, i in enumerate(starts):
            cur = nxt.result()
            nxt = pool.submit(load, starts[k + 1]) if k + 1 < len(starts) else None
            yield i, cur.to(device, non_blocking=pin)


def plan_features(paths: RunPaths, key: str, fingerprint: str, n: int,
                  row_ids: Sequence[str] | None) -> tuple[FeatureCache | None, int]:
    """(cached features or None, rows 0..n_old of them still valid for these pixels): same encoder
    fingerprint, same row ids, checksums intact up to n_old."""
    cached, meta, intact = _read_features(paths, key)
    n_old = 0
    if cached is not None and cached.fingerprint == fingerprint and cached.rows <= n:
        ids_ok = row_ids is None or meta.get("ids_sha256") in (None, ids_sha256(row_ids[:cached.rows]))
        if ids_ok:
            n_old = intact           # rows from the first damaged one on are encoded again
        else:
            log.info("feature cache %s: rows belong to another manifest; recomputing", key)
    elif cached is not None:
        log.info("feature cache %s: %s; recomputing all %d rows", key,
                 "encoder fingerprint changed" if cached.fingerprint != fingerprint else "more cached rows than pixels", n)
    return cached, n_old


def feature_shards(key: str, fingerprint: str, pixels: np.ndarray, n_old: int, shard_size: int,
                   row_ids: Sequence[str] | None = None) -> list[Shard]:
    """Shards of the rows n_old.. still to encode, keyed on the encoder fingerprint and the rows'
    content (their ids; without ids, a digest of their pixels)."""
    def key_of(lo: int, hi: int) -> str:
        rows = list(row_ids[n_old + lo:n_old + hi]) if row_ids is not None else \
            hashlib.sha256(np.ascontiguousarray(pixels[n_old + lo:n_old + hi]).tobytes()).hexdigest()
        return content_key(fingerprint, rows)

    return [Shard(s.stage, s.index, n_old + s.start, n_old + s.stop, s.key)
            for s in plan_shards(f"features-{key}", len(pixels) - n_old, shard_size, key_of)]


def encode_shard(encode: Callable[["torch.Tensor"], Any], pixels: np.ndarray, shard: Shard, root: str | Path,
                 batch_size: int = 256, device: "str | torch.device" = "auto") -> Path:
    """Embeddings and logits (float16) of rows [shard.start, shard.stop) of `pixels`, written
    atomically to one `.npz` named by the shard's content key. Idempotent: an existing complete
    file is returned without encoding again."""
    import torch

    out = shard_file(root, shard, ".npz")
    if _shard_arrays(out, len(shard)) is not None:
        return out
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    module = encode if isinstance(encode, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.to(dev).eval()
    embs, logits = [], []
    try:
        with torch.inference_mode(), tqdm(total=len(shard), desc=f"features shard {shard.index}", unit="img",
                                          leave=False) as bar:
            for _, batch in _batches(pixels[:shard.stop], shard.start, batch_size, dev):
                x = batch.permute(0, 3, 1, 2).float().div_(255.0)          # (B, 3, S, S) in [0, 1]
                o = encode(x)
                e = o.embedding.float().cpu().numpy()                        # (B, D)
                z = o.logits.float().cpu().numpy() if getattr(o, "logits", None) is not None \
                    else np.zeros((len(e), 0), np.float32)                   # (B, K)
                embs.append(e.astype(np.float16))
                logits.append(z.astype(np.float16))
                bar.update(len(e))
    finally:
        if module is not None:
            module.train(was_training)
    with atomic_path(out, suffix=".npz") as tmp:
        np.savez(tmp, embeddings=np.concatenate(embs), logits=np.concatenate(logits))
    return out


def _shard_arrays(path: Path, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(embeddings, logits) of a complete shard file, or None."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            e, k = z["embeddings"], z["logits"]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return (e, k) if len(e) == rows and len(k) == rows else None


def merge_features(paths: RunPaths | str | Path, key: str, fingerprint: str, n: int, cached: FeatureCache | None,
                   n_old: int, shards: list[Shard], files: list[Path],
                   row_ids: Sequence[str] | None = None) -> FeatureCache:
    """The cache's first n_old rows, then the shards' rows in order, written as the row-aligned
    `features/<key>.npy` and `.logits.npy` (atomically, with block checksums) and its sidecar;
    the shard files are removed afterwards."""
    paths = _as_paths(paths)
    if n == 0:
        log.warning("feature cache %s: no rows to encode", key)
        return FeatureCache(key, fingerprint, np.zeros((0, 0), np.float16), np.zeros((0, 0), np.float16))
    if cached is not None and n_old == n:
        # shard files still there belong to a merge that completed (its sidecar is written) in a
        # run killed before it removed them: nothing will read them again
        clear_shards(paths.root, f"features-{key}")
        return FeatureCache(key, fingerprint, cached.embeddings, cached.logits, computed=0)
    parts = []
    for sh, f in zip(shards, files):
        arrays = _shard_arrays(Path(f), len(sh))
        if arrays is None:
            raise ValueError(f"feature shard {f} is missing or incomplete: run it again")
        parts.append(arrays)
    d, k = parts[0][0].shape[1], parts[0][1].shape[1]
    old_emb = cached.embeddings if n_old else None
    old_logits = cached.logits if n_old else None
    if old_emb is not None and (old_emb.shape[1], old_logits.shape[1]) != (d, k):
        raise ValueError(f"feature cache {key}: encoder now gives dim {d}/{k} classes, "
                         f"cache has {old_emb.shape[1]}/{old_logits.shape[1]}; use a new key")
    # plain buffered writes (a memory map dies of SIGBUS on a full disk), space checked first
    ensure_free_space(paths.features(key), npy_bytes((n, d + k), np.float16))
    with contextlib.ExitStack() as stack:
        emb_tmp = stack.enter_context(atomic_path(paths.features(key), suffix=".npy"))
        log_tmp = stack.enter_context(atomic_path(paths.logits(key), suffix=".npy"))
        emb_out = NpyWriter(stack.enter_context(open(emb_tmp, "wb")), (n, d), np.float16)
        log_out = NpyWriter(stack.enter_context(open(log_tmp, "wb")), (n, k), np.float16)
        for j in range(0, n_old, 8192):   # the cached rows, copied in blocks
            emb_out.write(old_emb[j:min(j + 8192, n_old)])
            log_out.write(old_logits[j:min(j + 8192, n_old)])
        for e, z in parts:
            emb_out.write(e)
            log_out.write(z)
        checksums = {"embeddings": emb_out.checks(), "logits": log_out.checks()}
        paths.features_meta(key).unlink(missing_ok=True)  # arrays are replaced next: no stale meta
    meta_out: dict[str, Any] = {"fingerprint": fingerprint, "rows": n, "dim": int(d), "num_classes": int(k),
                                "checksums": checksums}
    if row_ids is not None:
        meta_out["ids_sha256"] = ids_sha256(row_ids)
    atomic_write_json(paths.features_meta(key), meta_out)
    if shards:
        clear_shards(paths.root, shards[0].stage)
    fresh = load_features(paths, key)
    assert fresh is not None
    fresh.computed = n - n_old
    log.info("feature cache %s: %d rows encoded, %d reused", key, n - n_old, n_old)
    return fresh


def extract_features(encode: Callable[["torch.Tensor"], Any], pixels: np.ndarray, key: str, fingerprint: str,
                     paths: RunPaths | str | Path, batch_size: int = 256, device: "str | torch.device" = "auto",
                     row_ids: Sequence[str] | None = None, shard_size: int = 8192) -> FeatureCache:
    """Embeddings and logits of every row of `pixels` (uint8 (N, S, S, 3)), cached on disk.

    `encode` gets float RGB (B, 3, S, S) in [0, 1] on `device` and returns an object with
    `.embedding` (B, D) and `.logits` (B, K) (a model wrapper from `training.models`; an
    `nn.Module` is moved to `device` and run in eval mode, its mode restored afterwards).
    `fingerprint` identifies the encoder (weights + preprocessing); `row_ids` (manifest ids),
    when given, also guard against a manifest rebuilt with other rows.
    Returns the cache with `computed` = the number of rows encoded by this call.

    On one process: `plan_features`, `encode_shard` for each shard of the rows to encode,
    `merge_features`; a task runner (flows/curate.py) spreads the same shards over its workers.
    """
    paths = _as_paths(paths)
    n = int(len(pixels))
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8 (N, S, S, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    if row_ids is not None and len(row_ids) != n:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {n} pixel rows")
    cached, n_old = plan_features(paths, key, fingerprint, n, row_ids)
    shards = feature_shards(key, fingerprint, pixels, n_old, shard_size, row_ids)
    files = local_map(lambda sh: encode_shard(encode, pixels, sh, paths.root, batch_size, device), shards)
    return merge_features(paths, key, fingerprint, n, cached, n_old, shards, files, row_ids)
