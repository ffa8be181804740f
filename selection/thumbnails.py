"""Gallery thumbnails: sprite sheets of square thumbnails, made once per content id.

`build_thumbnails(run_dir, ids)` fills `gallery/thumbs<S>/sheet_<k>.jpg` (`per_sheet` cells
each) and `gallery/thumbs<S>/index.json` (id -> slot, the `ThumbIndex`). Ids are content
hashes, so a thumbnail never goes stale: a re-render makes only the ids the index lacks.
Pixels come from the run's decoded pixel cache (`pixels/rgb<S>_<fit>.npy`) when it covers a
row, else from the original decoded by `pipeline.ingest.load_rgb`; an image that can no longer
be read gets a grey placeholder, not a crash. `selection.gallery` lays the sheets out on the page.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from webkd.pipeline.progress import tqdm

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import load_manifest
from webkd.pipeline.storage import atomic_path, atomic_write_text, read_json

log = logging.getLogger(__name__)

_PIXELS_RE = re.compile(r"^rgb(\d+)_([A-Za-z]+)\.npy$")
_PLACEHOLDER = (205, 205, 205)   # grey thumbnail for an image that can no longer be read



@dataclass
class ThumbIndex:
    """Where each id's thumbnail sits: slot k is sheet k // per_sheet, cell k % per_sheet."""

    dir: Path
    thumb_size: int
    per_sheet: int
    ids: list[str] = field(default_factory=list)
    generated: int = 0          # made by the last build_thumbnails call
    failed: int = 0             # of those, placeholders for unreadable images

    @property
    def cols(self) -> int:
        return math.ceil(math.sqrt(self.per_sheet))

    @property
    def sheet_rows(self) -> int:
        return math.ceil(self.per_sheet / self.cols)

    @property
    def n_sheets(self) -> int:
        return math.ceil(len(self.ids) / self.per_sheet)

    @staticmethod
    def sheet_name(k: int) -> str:
        return f"sheet_{k:05d}.jpg"

    def slots(self) -> dict[str, int]:
        return {i: k for k, i in enumerate(self.ids)}

    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    def save(self) -> None:
        doc = {"version": 1, "thumb_size": self.thumb_size, "per_sheet": self.per_sheet, "ids": self.ids}
        atomic_write_text(self.index_path, json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, d: Path, thumb_size: int, per_sheet: int) -> "ThumbIndex":
        """The cached index, or an empty one when missing, of another layout, or incomplete."""
        empty = cls(dir=d, thumb_size=thumb_size, per_sheet=per_sheet)
        raw = None
        try:
            raw = read_json(d / "index.json")
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable thumbnail index (%s); rebuilding", d, exc)
        if not isinstance(raw, dict):
            return empty
        if raw.get("thumb_size") != thumb_size or raw.get("per_sheet") != per_sheet:
            log.info("thumbnail cache %s has another layout; rebuilding", d)
            return empty
        ids = raw.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return empty
        idx = cls(dir=d, thumb_size=thumb_size, per_sheet=per_sheet, ids=ids)
        missing = [k for k in range(idx.n_sheets) if not (d / cls.sheet_name(k)).exists()]
        if missing:
            log.warning("thumbnail cache %s lacks %d sheet(s); rebuilding", d, len(missing))
            return empty
        return idx


def _pixel_cache(paths: RunPaths) -> np.ndarray | None:
    """The largest decoded pixel cache of the run (uint8 (N, S, S, 3), memory-mapped), if any."""
    d = paths.root / "pixels"
    best: tuple[int, Path] | None = None
    for p in d.glob("rgb*_*.npy") if d.is_dir() else ():
        m = _PIXELS_RE.match(p.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    if best is None:
        return None
    try:
        arr = np.load(best[1], mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable pixel cache (%s); decoding originals", best[1], exc)
        return None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3 or arr.shape[1] != arr.shape[2]:
        log.warning("%s: not a uint8 (N, S, S, 3) pixel cache %s; decoding originals", best[1], arr.shape)
        return None
    return arr


def _resize_batch(px: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 images (n, S, S, 3) -> (n, size, size, 3), bicubic (Pillow, per image)."""
    if px.shape[1] == size:
        return np.ascontiguousarray(px)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(p)).resize(
        (size, size), Image.Resampling.BICUBIC)) for p in px])


def _square(img: Image.Image, size: int) -> np.ndarray:
    """Whole image, aspect kept, centred on a light square: uint8 (size, size, 3)."""
    img = img.convert("RGB")
    img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    canvas = Image.new("RGB", (size, size), (240, 240, 240))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return np.asarray(canvas)


class _ThumbSource:
    """Thumbnails for ids: pixel-cache rows when the cache covers them, else the originals."""

    def __init__(self, paths: RunPaths, manifest_rows: dict[str, int], size: int) -> None:
        self.paths, self.rows, self.size = paths, manifest_rows, size
        self.cache = _pixel_cache(paths)
        self._records: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.failed = 0

    def _record(self, i: str) -> Any:
        with self._lock:
            if self._records is None:
                self._records = {r.id: r for r in load_manifest(self.paths.manifest)}
        return self._records.get(i)

    def _from_file(self, i: str) -> np.ndarray:
        from webkd.pipeline.ingest import load_rgb  # decoding lives in ingest (bomb guard, EXIF, modes)

        rec = self._record(i)
        if rec is None:
            raise LookupError(f"{i[:12]} is not in the manifest")
        return _square(load_rgb(rec), self.size)

    def _one(self, i: str) -> np.ndarray:
        try:
            return self._from_file(i)
        except Exception as exc:  # a vanished / changed file gets a placeholder, not a crash
            with self._lock:
                self.failed += 1
            if self.failed <= 3:
                log.warning("thumbnail for %s: %s: %s", i[:12], type(exc).__name__, exc)
            return np.full((self.size, self.size, 3), _PLACEHOLDER, dtype=np.uint8)

    def get(self, ids: Sequence[str], pool: concurrent.futures.Executor) -> np.ndarray:
        """uint8 (len(ids), size, size, 3)."""
        out = np.empty((len(ids), self.size, self.size, 3), dtype=np.uint8)   # (n, t, t, 3)
        n_cache = 0 if self.cache is None else self.cache.shape[0]
        rows = np.array([self.rows.get(i, -1) for i in ids], dtype=np.int64)
        hit = (rows >= 0) & (rows < n_cache)
        if hit.any():
            out[hit] = _resize_batch(self.cache[rows[hit]], self.size)         # (h, S, S, 3) -> (h, t, t, 3)
        todo = np.flatnonzero(~hit).tolist()
        for k, arr in zip(todo, pool.map(self._one, [ids[k] for k in todo])):
            out[k] = arr
        return out


def build_thumbnails(run_dir: str | Path, ids: Sequence[str], thumb_size: int = 64,
                     per_sheet: int = 256) -> ThumbIndex:
    """Make the thumbnails of `ids` that the run's cache lacks; return the (saved) index.

    New thumbnails fill the last sheet, then new sheets. Sheets are built two at a time
    (Pillow releases the GIL while resizing, decoding and encoding), each written
    atomically; the index is saved as finished sheets come in, so a killed render keeps
    most of its work and a re-render makes only what is missing.
    """
    paths = RunPaths(Path(run_dir))
    d = paths.gallery_dir / f"thumbs{thumb_size}"
    idx = ThumbIndex.load(d, thumb_size, per_sheet)
    have = set(idx.ids)
    new = [i for i in dict.fromkeys(ids) if i not in have]
    idx.generated = idx.failed = 0
    if not new:
        return idx
    rows = {}
    if paths.manifest.exists():
        rows = {i: r for r, i in enumerate(pq.read_table(paths.manifest, columns=["id"])["id"].to_pylist())}
    src = _ThumbSource(paths, rows, thumb_size)
    t, cols, srows = thumb_size, idx.cols, idx.sheet_rows
    jobs: list[tuple[int, int, list[str]]] = []          # (sheet, first cell, ids)
    pos, start = 0, len(idx.ids)
    while pos < len(new):
        sheet, cell0 = divmod(start + pos, per_sheet)
        jobs.append((sheet, cell0, new[pos: pos + per_sheet - cell0]))
        pos += len(jobs[-1][2])
    d.mkdir(parents=True, exist_ok=True)

    def make_sheet(job: tuple[int, int, list[str]], pool: concurrent.futures.Executor) -> None:
        sheet, cell0, take = job
        path = d / ThumbIndex.sheet_name(sheet)
        if cell0 and path.exists():               # extend the partly filled last sheet
            with Image.open(path) as im:
                canvas = np.array(im.convert("RGB"))
        else:
            canvas = np.full((srows * t, cols * t, 3), 250, dtype=np.uint8)   # (H, W, 3)
        thumbs = src.get(take, pool)                                            # (n, t, t, 3)
        for k, th in enumerate(thumbs):
            r, c = divmod(cell0 + k, cols)
            canvas[r * t:(r + 1) * t, c * t:(c + 1) * t] = th
        with atomic_path(path) as tmp:
            Image.fromarray(canvas).save(tmp, format="JPEG", quality=85)

    workers = min(8, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as decode_pool, \
            concurrent.futures.ThreadPoolExecutor(2) as sheet_pool, \
            tqdm(total=len(new), desc="thumbnails", unit="img", leave=False) as bar:
        saved = time.perf_counter()
        for job, _ in zip(jobs, sheet_pool.map(lambda j: make_sheet(j, decode_pool), jobs)):
            idx.ids.extend(job[2])                # in slot order: map yields in job order
            bar.update(len(job[2]))
            if time.perf_counter() - saved > 5.0:
                idx.save()
                saved = time.perf_counter()
    idx.save()
    idx.generated, idx.failed = len(new), src.failed
    if src.failed:
        log.warning("%d of %d thumbnails are placeholders (image unreadable)", src.failed, len(new))
    return idx
