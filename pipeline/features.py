"""The decoded pixel cache and batched, cached, incremental embedding + logit extraction.

Two row-aligned caches, both keyed so a re-run only computes what is new:

* `build_pixel_cache`: every manifest row decoded once (`pipeline.ingest.load_rgb`), brought to a
  square with Lanczos (`squash`, `crop` or `pad`) and stored as uint8 (N, S, S, 3). A sidecar JSON
  beside it remembers the rows it holds and a hash of their ids, so a grown manifest decodes only
  the new rows and a different manifest rebuilds.
* `extract_features`: an encoder (any callable `(B, 3, S, S) float [0, 1] -> Outputs-like`; this
  layer does not import `training`) applied in batches under `torch.inference_mode()`, writing
  `features/<key>.npy` float16 (N, D), `features/<key>.logits.npy` float16 (N, K) and
  `features/<key>.json` {fingerprint, rows, dim, num_classes}. Same fingerprint and rows: nothing
  computed; more rows: only the new ones; another fingerprint: everything again.

Every file is replaced atomically; a killed run leaves the old cache or the new one.
"""
from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from webkd.pipeline.progress import tqdm

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import Record
from webkd.pipeline.storage import atomic_path, atomic_save_npy, atomic_write_json, ids_sha256, read_json

if TYPE_CHECKING:  # torch is imported lazily: pixel caching and the CLI do not need it
    import torch

log = logging.getLogger(__name__)

FITS = ("squash", "crop", "pad")


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
# pixel cache
# --------------------------------------------------------------------------------------------
def fit_square(img: Any, size: int, fit: str = "squash") -> np.ndarray:
    """PIL RGB image -> uint8 (size, size, 3) with Lanczos.

    squash: resize the whole image, aspect ratio not kept (every part of the object stays);
    crop: centre crop to a square, then resize; pad: letterbox on black, aspect ratio kept.
    """
    from PIL import Image, ImageOps

    lanczos = Image.Resampling.LANCZOS
    if fit == "squash":
        out = img.resize((size, size), lanczos)
    elif fit == "crop":
        out = ImageOps.fit(img, (size, size), lanczos)
    elif fit == "pad":
        out = ImageOps.pad(img, (size, size), lanczos, color=(0, 0, 0))
    else:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    return np.asarray(out.convert("RGB"), dtype=np.uint8)


def pixel_meta_path(path: str | Path) -> Path:
    """The sidecar of a pixel cache: `pixels/rgb32_squash.json` beside `pixels/rgb32_squash.npy`."""
    return Path(path).with_suffix(".json")


def _decode_row(record: Record, size: int, fit: str) -> tuple[np.ndarray | None, str]:
    from webkd.pipeline.ingest import load_rgb

    try:
        return fit_square(load_rgb(record), size, fit), ""
    except Exception as exc:  # a file gone or changed since ingest: keep the row, flag it
        return None, f"{type(exc).__name__}: {exc}"


def build_pixel_cache(records: Sequence[Record], path: str | Path, size: int, fit: str = "squash",
                      workers: int = 2, block: int = 512) -> np.ndarray:
    """uint8 (N, S, S, 3) RGB, row i = manifest row i, memory-mapped from `path`.

    Incremental: when the cache holds the first n rows of this manifest (same ids), only rows
    n.. are decoded. A row whose file can no longer be decoded is left black and listed under
    `failed` in the sidecar JSON (with a warning), instead of stopping the run.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    path, meta_path = Path(path), pixel_meta_path(path)
    n = len(records)
    ids = [r.id for r in records]
    meta = read_json(meta_path, default=None) or {}
    old: np.ndarray | None = None
    n_old = 0
    if path.exists() and meta.get("size") == size and meta.get("fit") == fit:
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            log.warning("pixel cache %s unreadable (%s): rebuilding", path, exc)
        else:
            rows = int(meta.get("rows", -1))
            if arr.shape[1:] == (size, size, 3) and len(arr) == rows and rows <= n \
                    and meta.get("ids_sha256") == ids_sha256(ids[:rows]):
                old, n_old = arr, rows
            else:
                log.info("pixel cache %s does not match this manifest: rebuilding", path)
    failed = [int(i) for i in meta.get("failed", []) if int(i) < n_old] if old is not None else []
    if old is not None and n_old == n:
        log.info("pixel cache %s up to date (%d rows)", path, n)
        return old
    log.info("pixel cache %s: %d cached rows, decoding %d", path, n_old, n - n_old)
    if n == 0:
        atomic_save_npy(path, np.zeros((0, size, size, 3), np.uint8))
        atomic_write_json(meta_path, {"rows": 0, "size": size, "fit": fit, "ids_sha256": ids_sha256([]), "failed": []})
        return np.load(path)

    with atomic_path(path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        if n_old:
            out[:n_old] = old
        del old
        errors: list[str] = []
        with ThreadPoolExecutor(max(1, workers)) as pool, \
                tqdm(total=n - n_old, desc=f"pixels {size}px {fit}", unit="img", leave=False) as bar:
            for start in range(n_old, n, block):
                stop = min(start + block, n)
                for i, (pix, err) in zip(range(start, stop),
                                         pool.map(lambda r: _decode_row(r, size, fit), records[start:stop])):
                    if pix is None:
                        out[i] = 0
                        failed.append(i)
                        errors.append(f"row {i} ({records[i].uri}): {err}")
                    else:
                        out[i] = pix
                bar.update(stop - start)
        out.flush()
        del out
    if errors:
        log.warning("pixel cache: %d row(s) could not be decoded and are black: %s", len(errors),
                    "; ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""))
    atomic_write_json(meta_path, {"rows": n, "size": size, "fit": fit, "ids_sha256": ids_sha256(ids),
                                  "failed": failed})
    return np.load(path, mmap_mode="r")


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


def load_features(paths: RunPaths | str | Path, key: str) -> FeatureCache | None:
    """The cached features of `key` in a run directory, or None when absent or inconsistent."""
    paths = _as_paths(paths)
    meta = read_json(paths.features_meta(key), default=None)
    if not meta or not paths.features(key).exists() or not paths.logits(key).exists():
        return None
    try:
        emb = np.load(paths.features(key), mmap_mode="r")
        logits = np.load(paths.logits(key), mmap_mode="r")
    except (ValueError, OSError) as exc:
        log.warning("feature cache %s unreadable (%s)", paths.features(key), exc)
        return None
    rows = int(meta.get("rows", -1))
    if emb.ndim != 2 or logits.ndim != 2 or len(emb) < rows or len(logits) < rows or rows < 0 \
            or emb.shape[1] != meta.get("dim") or logits.shape[1] != meta.get("num_classes"):
        return None
    return FeatureCache(key=key, fingerprint=str(meta.get("fingerprint")), embeddings=emb[:rows],
                        logits=logits[:rows])


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


def extract_features(encode: Callable[["torch.Tensor"], Any], pixels: np.ndarray, key: str, fingerprint: str,
                     paths: RunPaths | str | Path, batch_size: int = 256, device: "str | torch.device" = "auto",
                     row_ids: Sequence[str] | None = None) -> FeatureCache:
    """Embeddings and logits of every row of `pixels` (uint8 (N, S, S, 3)), cached on disk.

    `encode` gets float RGB (B, 3, S, S) in [0, 1] on `device` and returns an object with
    `.embedding` (B, D) and `.logits` (B, K) (a model wrapper from `training.models`; an
    `nn.Module` is moved to `device` and run in eval mode, its mode restored afterwards).
    `fingerprint` identifies the encoder (weights + preprocessing); `row_ids` (manifest ids),
    when given, also guard against a manifest rebuilt with other rows.
    Returns the cache with `computed` = the number of rows encoded by this call.
    """
    import torch

    paths = _as_paths(paths)
    n = int(len(pixels))
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8 (N, S, S, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    if row_ids is not None and len(row_ids) != n:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {n} pixel rows")
    meta = read_json(paths.features_meta(key), default=None) or {}
    cached = load_features(paths, key)
    n_old = 0
    if cached is not None and cached.fingerprint == fingerprint and cached.rows <= n:
        ids_ok = row_ids is None or meta.get("ids_sha256") in (None, ids_sha256(row_ids[:cached.rows]))
        if ids_ok:
            n_old = cached.rows
        else:
            log.info("feature cache %s: rows belong to another manifest; recomputing", key)
    elif cached is not None:
        log.info("feature cache %s: %s; recomputing all %d rows", key,
                 "encoder fingerprint changed" if cached.fingerprint != fingerprint else "more cached rows than pixels", n)
    if cached is not None and n_old == n:
        return FeatureCache(key, fingerprint, cached.embeddings, cached.logits, computed=0)
    if n == 0:
        log.warning("feature cache %s: no rows to encode", key)
        return FeatureCache(key, fingerprint, np.zeros((0, 0), np.float16), np.zeros((0, 0), np.float16))

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    module = encode if isinstance(encode, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.to(dev).eval()
    old_emb = cached.embeddings if n_old else None
    old_logits = cached.logits if n_old else None
    emb_out: np.ndarray | None = None
    log_out: np.ndarray | None = None
    try:
        with contextlib.ExitStack() as stack, torch.inference_mode():
            emb_tmp = stack.enter_context(atomic_path(paths.features(key), suffix=".npy"))
            log_tmp = stack.enter_context(atomic_path(paths.logits(key), suffix=".npy"))
            bar = stack.enter_context(tqdm(total=n - n_old, desc=f"features {key}", unit="img", leave=False))
            for i, batch in _batches(pixels, n_old, batch_size, dev):
                x = batch.permute(0, 3, 1, 2).float().div_(255.0)          # (B, 3, S, S) in [0, 1]
                out = encode(x)
                e = out.embedding.float().cpu().numpy()                      # (B, D)
                z = out.logits.float().cpu().numpy() if getattr(out, "logits", None) is not None \
                    else np.zeros((len(e), 0), np.float32)                   # (B, K)
                if emb_out is None:
                    d, k = e.shape[1], z.shape[1]
                    if old_emb is not None and (old_emb.shape[1], old_logits.shape[1]) != (d, k):
                        raise ValueError(f"feature cache {key}: encoder now gives dim {d}/{k} classes, "
                                         f"cache has {old_emb.shape[1]}/{old_logits.shape[1]}; use a new key")
                    emb_out = np.lib.format.open_memmap(emb_tmp, mode="w+", dtype=np.float16, shape=(n, d))
                    log_out = np.lib.format.open_memmap(log_tmp, mode="w+", dtype=np.float16, shape=(n, k))
                    if n_old:
                        emb_out[:n_old] = old_emb
                        log_out[:n_old] = old_logits
                emb_out[i:i + len(e)] = e
                log_out[i:i + len(e)] = z
                bar.update(len(e))
            assert emb_out is not None and log_out is not None
            dim, num_classes = emb_out.shape[1], log_out.shape[1]
            emb_out.flush()
            log_out.flush()
            emb_out = log_out = None  # close the memory maps before the atomic rename
            paths.features_meta(key).unlink(missing_ok=True)  # arrays are replaced next: no stale meta
    finally:
        if module is not None:
            module.train(was_training)
    meta_out: dict[str, Any] = {"fingerprint": fingerprint, "rows": n, "dim": int(dim), "num_classes": int(num_classes)}
    if row_ids is not None:
        meta_out["ids_sha256"] = ids_sha256(row_ids)
    atomic_write_json(paths.features_meta(key), meta_out)
    fresh = load_features(paths, key)
    assert fresh is not None
    fresh.computed = n - n_old
    log.info("feature cache %s: %d rows encoded, %d reused", key, n - n_old, n_old)
    return fresh
