"""The decoded pixel cache: every manifest row decoded once (`pipeline.ingest.load_rgb`, which
checks the bytes still hash to the record's id), brought to a square with Lanczos (`squash`,
`crop` or `pad`) and stored as uint8 (N, S, S, 3) in `pixels/rgb<S>_<fit>.npy`.

A sidecar JSON beside it remembers the rows it holds, a hash of their ids, the rows that could
not be decoded and a crc32 per block of the array (`pipeline.npyfile`), so

* a grown manifest decodes only the new rows, a different manifest rebuilds;
* a cache changed on disk (same size or not) is found when it is loaded: the rows of the damaged
  blocks are decoded again, with one warning line naming the cache and the blocks;
* a damaged sidecar (truncated JSON) rebuilds the cache instead of stopping every run;
* the file is written with plain buffered writes after a free-space check (`storage.DiskFull`,
  one line, instead of a memory map dying of SIGBUS on a full disk).

A row whose source file is gone (or changed) since ingest is never trained on as a black image:
`pixel_cache` marks it `source_missing` in the manifest, with a quarantine row saying why (both
files committed together), and puts it back to `ok` when its file decodes again.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from webkd.pipeline.npyfile import NpyWriter, npy_bytes, read_sidecar, verify_npy
from webkd.pipeline.paths import RunPaths
from webkd.pipeline.progress import tqdm
from webkd.pipeline.records import (OK, SOURCE_MISSING, QuarantineRow, Record, load_manifest, load_quarantine,
                                    save_manifest, save_quarantine)
from webkd.pipeline.storage import atomic_path, atomic_write_json, commit_files, ids_sha256, recover_files

log = logging.getLogger(__name__)

FITS = ("squash", "crop", "pad")


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
    except FileNotFoundError:
        return None, "file gone since ingest"
    except Exception as exc:  # a file changed since ingest, unreadable now: keep the row, flag it
        return None, f"{type(exc).__name__}: {exc}"


def _usable_rows(path: Path, meta: dict[str, Any], ids: list[str], size: int, fit: str):
    """(old memory map or None, rows it holds for this manifest, rows among them to decode again)."""
    if not path.exists():
        return None, 0, set()
    if meta.get("size") != size or meta.get("fit") != fit:
        log.info("pixel cache %s: no sidecar for this size and fit: rebuilding", path)
        return None, 0, set()
    try:
        arr = _open(path, int(meta.get("rows", -1)))
    except (ValueError, OSError) as exc:
        log.warning("pixel cache %s unreadable (%s): rebuilding", path, exc)
        return None, 0, set()
    rows = int(meta.get("rows", -1))
    if arr.shape[1:] != (size, size, 3) or len(arr) != rows or rows > len(ids) \
            or meta.get("ids_sha256") != ids_sha256(ids[:rows]):
        log.info("pixel cache %s does not match this manifest: rebuilding", path)
        return None, 0, set()
    damage = verify_npy(path, meta.get("checksum"), rows)
    if damage is None:
        return arr, rows, set()
    redo = set(damage.bad_rows.tolist())
    log.warning("pixel cache %s rebuilt: %s; decoding its %d row(s) again", path, damage, len(redo))
    return arr, rows, redo


def build_pixel_cache(records: Sequence[Record], path: str | Path, size: int, fit: str = "squash",
                      workers: int = 2, block: int = 512) -> np.ndarray:
    """uint8 (N, S, S, 3) RGB, row i = manifest row i, memory-mapped (read-only) from `path`.

    Incremental: when the cache holds the first n rows of this manifest (same ids, checksums
    intact), only rows n.. are decoded, plus the rows of damaged blocks and the rows that had
    failed and decode now. A row whose file can no longer be decoded is black and listed under
    `failed` (why: `failed_why`) in the sidecar, with a warning; `pixel_cache` quarantines it.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    path, meta_path = Path(path), pixel_meta_path(path)
    n = len(records)
    ids = [r.id for r in records]
    meta = read_sidecar(meta_path, f"pixel cache {path}") or {}
    old, n_old, redo = _usable_rows(path, meta, ids, size, fit)
    why_old = meta.get("failed_why") or {}
    failed = {int(i): str(why_old.get(str(i), "could not be decoded")) for i in meta.get("failed", [])
              if int(i) < n_old} if old is not None else {}
    back = {}                                          # rows whose file came back since
    for i in sorted(set(failed) - redo):
        pix, _ = _decode_row(records[i], size, fit)
        if pix is not None:
            back[i] = pix
    if back:
        log.info("pixel cache %s: %d row(s) whose file was missing decode again", path, len(back))
    redo |= set(back)
    if old is not None and n_old == n and not redo:
        log.info("pixel cache %s up to date (%d rows)", path, n)
        return _open(path, n)
    todo = len(redo) + n - n_old
    log.info("pixel cache %s: %d cached rows, decoding %d", path, n_old - len(redo), todo)
    shape = (n, size, size, 3)
    with atomic_path(path, suffix=".npy", need=npy_bytes(shape, np.uint8)) as tmp, open(tmp, "wb") as fh, \
            ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=todo, desc=f"pixels {size}px {fit}", unit="img", leave=False) as bar:
        out = NpyWriter(fh, shape, np.uint8)
        for start in range(0, n, block):
            stop = min(start + block, n)
            chunk = np.array(old[start:min(stop, n_old)]) if start < n_old else np.empty((0, size, size, 3), np.uint8)
            chunk = np.concatenate([chunk, np.zeros((stop - start - len(chunk), size, size, 3), np.uint8)])
            rows = [i for i in range(start, stop) if i >= n_old or i in redo]
            for i in rows:
                failed.pop(i, None)
            for i, (pix, err) in zip(rows, pool.map(lambda i: (back[i], "") if i in back
                                                    else _decode_row(records[i], size, fit), rows)):
                if pix is None:
                    chunk[i - start] = 0
                    failed[i] = err
                else:
                    chunk[i - start] = pix
            out.write(chunk)
            bar.update(len(rows))
        checksum = out.checks()
    del old
    if failed:
        errors = [f"row {i} ({records[i].uri}): {failed[i]}" for i in sorted(failed)]
        log.warning("pixel cache: %d row(s) could not be decoded and are not used: %s", len(errors),
                    "; ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""))
    atomic_write_json(meta_path, {"rows": n, "size": size, "fit": fit, "ids_sha256": ids_sha256(ids),
                                  "failed": sorted(failed), "failed_why": {str(i): w for i, w in failed.items()},
                                  "checksum": checksum})
    return _open(path, n)


def _open(path: Path, n: int) -> np.ndarray:
    return np.load(path, mmap_mode="r") if n else np.load(path)   # an empty file cannot be mapped


def failed_rows(path: str | Path) -> dict[int, str]:
    """Row -> why, for the rows of the pixel cache at `path` that could not be decoded."""
    meta = read_sidecar(pixel_meta_path(path), f"pixel cache {path}") or {}
    why = meta.get("failed_why") or {}
    return {int(i): str(why.get(str(i), "could not be decoded")) for i in meta.get("failed", [])}


def mark_source_missing(paths: RunPaths, records: list[Record], failed: dict[int, str]) -> int:
    """Give the rows in `failed` (row -> why) the manifest status `source_missing` and one
    quarantine row each; rows marked before whose file decodes again go back to `ok`. `records`
    (the manifest the pixel cache was built from) are updated in place; on disk the manifest and
    quarantine change together (`commit_files`, the ingest round's stage, so an ingest after a
    kill finishes or drops this change first). Returns the rows marked now."""
    want = {records[i].id: why for i, why in failed.items() if i < len(records)}

    def status(r: Record) -> str:
        if r.id in want:
            return SOURCE_MISSING
        return OK if r.status == SOURCE_MISSING else r.status

    if all(status(r) == r.status for r in records):
        return 0
    for r in records:
        r.status = status(r)
    recover_files(paths.ingest_stage)   # the manifest on disk may be newer than `records`
    covered = {r.id for r in records}
    disk = load_manifest(paths.manifest)
    for r in disk:
        if r.id in covered:
            r.status = status(r)
    quarantine = [q for q in load_quarantine(paths.quarantine) if not (q.reason == SOURCE_MISSING and q.id in covered)]
    quarantine += [QuarantineRow(uri=r.uri, source=r.source, reason=SOURCE_MISSING, detail=want[r.id], id=r.id,
                                 web_label=r.web_label, batch=r.batch) for r in disk if r.id in want]
    commit_files(paths.ingest_stage, [(paths.manifest, lambda p: save_manifest(p, disk)),
                                      (paths.quarantine, lambda p: save_quarantine(p, quarantine))])
    if want:
        log.warning("%d image(s) whose source file is gone or changed since ingest are quarantined "
                    "(%s) and not trained on; restore the files to use them again", len(want), SOURCE_MISSING)
    return len(want)


def pixel_cache(paths: RunPaths, records: list[Record], size: int, fit: str = "squash",
                workers: int = 2) -> np.ndarray:
    """The run's pixel cache (`build_pixel_cache`), with the rows whose source file is gone
    quarantined (`mark_source_missing`; `records` statuses updated in place)."""
    path = paths.pixels(size, fit)
    pix = build_pixel_cache(records, path, size, fit, workers=workers)
    mark_source_missing(paths, records, failed_rows(path))
    return pix
