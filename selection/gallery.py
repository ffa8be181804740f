"""The review page of a run: kept vs rejected images, why, and human overrides.

`render_gallery(run_dir)` writes `gallery/` in the run directory (`RunPaths.gallery`):

    gallery/index.html              static page (no data in it), opens from disk (file://)
    gallery/app.js                  the page's vanilla JS (no network, no CDN)
    gallery/data/meta.js            classes, reasons, summary tables, thumbnail layout
    gallery/data/rows_<k>.js        the images, columnar, CHUNK_ROWS per file
    gallery/thumbs<S>/sheet_<k>.jpg sprite sheets, `per_sheet` thumbnails each
    gallery/thumbs<S>/index.json    id -> slot of every thumbnail already made (the cache)

Data reaches the page as `<script src>` files because Chrome blocks fetching local JSON from
a file:// page. Every string from the web (file names, labels, captions, urls, ids) is JSON
with `<`, `>`, `&` and all non-ASCII escaped (so no `</script>` and no U+2028 can break out),
and the page builds its DOM with `textContent` / attributes only; a Content-Security-Policy
without 'unsafe-inline' blocks inline handlers as a second line of defence.

Thumbnails are made once per content id (ids are content hashes, so a thumbnail never goes
stale) from the pixel cache when present, else by decoding the original with
`pipeline.ingest.load_rgb`; a re-render only makes thumbnails for new ids.

Which decision a tile shows: each image's newest ledger row (its row in the newest
`selection/epoch_<k>.parquet` that has it); its history lists every epoch's decision.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import html
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from PIL import Image
from tqdm import tqdm

from pipeline.config import RunPaths
from pipeline.records import REASONS as RECORD_REASONS
from pipeline.records import load_manifest, load_quarantine
from pipeline.storage import atomic_path, atomic_write_text, read_json
from selection.overrides import load_overrides

log = logging.getLogger(__name__)

# Ledger reason codes (ARCHITECTURE.md), in display order, with a line of help and a short tag
# for the compact per-epoch history.
REASONS: dict[str, tuple[str, str]] = {
    "selected": ("sel", "kept: teacher+student confidence above the class threshold"),
    "fallback": ("fb", "kept: the selection came out empty, previous/all kept instead"),
    "override": ("ovr", "forced by a human override (accept keeps, reject rejects)"),
    "below_class_threshold": ("thr", "confidence below its class threshold"),
    "low_confidence": ("conf", "confidence below the global cut"),
    "knn_disagree": ("knn", "too few k-NN neighbours share its pseudo-label"),
    "off_class": ("off", "web query maps to no teacher class / outside the teacher top-2"),
    "near_duplicate": ("dup", "near duplicate of a kept representative"),
    "validation": ("val", "held-out validation row, never trained on"),
}
CHUNK_ROWS = 10_000
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.parquet$")
_PIXELS_RE = re.compile(r"^rgb(\d+)_([A-Za-z]+)\.npy$")
_NAN = float("nan")
# Ledger columns the page reads, with the value used when an (older) ledger lacks one.
_LEDGER_DEFAULTS: dict[str, Any] = {
    "row": -1, "split": "train", "weight": _NAN, "pseudo_label": -1, "confidence": _NAN,
    "threshold": _NAN, "teacher_share": _NAN, "teacher_top1": -1, "teacher_top2": -1,
    "teacher_p1": _NAN, "teacher_p2": _NAN, "student_pred": -1, "student_conf": _NAN,
    "web_label": None, "web_class": -1, "knn_agree": _NAN,
}
_LEDGER_REQUIRED = ("id", "kept", "reason")
_PLACEHOLDER = (205, 205, 205)   # grey thumbnail for an image that can no longer be read


class GalleryError(ValueError):
    """A run directory the gallery cannot read (unreadable ledger, ...); the message says which."""


# ============================================================================================
# reading a run
# ============================================================================================
def ledger_files(selection_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every `epoch_<k>.parquet`, oldest first."""
    d = Path(selection_dir)
    if not d.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in d.iterdir() if (m := _EPOCH_RE.match(p.name))]
    return sorted(out)


def _read_ledgers(selection_dir: Path) -> dict[str, np.ndarray]:
    """All ledgers concatenated (oldest epoch first), one numpy array per column."""
    parts: list[dict[str, np.ndarray]] = []
    for epoch, path in ledger_files(selection_dir):
        try:
            t = pq.read_table(path)
        except Exception as exc:
            raise GalleryError(f"{path}: unreadable ledger ({type(exc).__name__}: {exc})") from None
        missing = [c for c in _LEDGER_REQUIRED if c not in t.column_names]
        if missing:
            raise GalleryError(f"{path}: ledger lacks column(s) {missing}")
        n = t.num_rows
        cols: dict[str, np.ndarray] = {
            "id": np.asarray(t["id"].to_pylist(), dtype=object),
            "kept": np.asarray(t["kept"].to_numpy(zero_copy_only=False), dtype=bool),
            "reason": np.asarray(t["reason"].to_pylist(), dtype=object),
            "epoch": (np.asarray(t["epoch"].to_numpy(zero_copy_only=False), dtype=np.int64)
                      if "epoch" in t.column_names else np.full(n, epoch, dtype=np.int64)),
        }
        for name, default in _LEDGER_DEFAULTS.items():
            if name not in t.column_names:
                cols[name] = np.full(n, default, dtype=object if default is None or isinstance(default, str)
                                     else type(default))
            elif isinstance(default, str) or default is None:
                cols[name] = np.asarray(t[name].to_pylist(), dtype=object)
            else:
                col = t[name]
                if col.null_count:
                    col = pc.fill_null(col, default)
                arr = col.to_numpy(zero_copy_only=False)
                cols[name] = np.asarray(arr, dtype=np.float64 if isinstance(default, float) else np.int64)
        parts.append(cols)
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _run_classes(paths: RunPaths, classes: Sequence[str] | None) -> list[str]:
    """Teacher class names: given, else `data.classes` of the run's resolved config.yaml."""
    if classes is not None:
        return [str(c) for c in classes]
    if paths.config.exists():
        try:
            raw = yaml.safe_load(paths.config.read_text()) or {}
            return [str(c) for c in (raw.get("data") or {}).get("classes") or []]
        except (yaml.YAMLError, AttributeError, OSError) as exc:
            log.warning("%s: cannot read data.classes (%s); showing class numbers", paths.config, exc)
    return []


@dataclass
class ClassCount:
    """Kept / rejected of one class (a pseudo-label or a web query) and its top rejection reasons."""

    key: int | str
    name: str
    kept: int
    rejected: int
    reasons: list[tuple[str, int]]


@dataclass
class RunData:
    """Everything the page and the text summary show, read once from a run directory."""

    root: Path
    classes: list[str]
    epochs: list[int]
    items: dict[str, np.ndarray]          # newest decision per image, manifest order; see load_run
    history: dict[str, list[int]]         # id -> flat [epoch, kept, reason index, ...]
    reasons: list[str]                    # reason codes; items["reason"] indexes into it
    uri: dict[str, str]                   # id -> uri / caption / url from the manifest
    caption: dict[str, str | None]
    url: dict[str, str | None]
    dup_of: dict[str, str]                # near-duplicate member id -> representative id
    manifest_rows: dict[str, int]         # id -> manifest row
    status: Counter
    quarantine: Counter
    overrides: dict[str, str]
    overrides_error: str | None = None

    @property
    def n(self) -> int:
        return len(self.items.get("id", ()))

    def class_name(self, k: int) -> str:
        if 0 <= k < len(self.classes):
            return self.classes[k]
        return "(none)" if k < 0 else f"class {k}"


def load_run(run_dir: str | Path, classes: Sequence[str] | None = None) -> RunData:
    """Read manifest, quarantine, every ledger and the overrides store of a run directory."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise GalleryError(f"{paths.root}: no such run directory")
    names = _run_classes(paths, classes)

    uri: dict[str, str] = {}
    caption: dict[str, str | None] = {}
    url: dict[str, str | None] = {}
    dup_of: dict[str, str] = {}
    rows: dict[str, int] = {}
    status: Counter = Counter()
    if paths.manifest.exists():
        t = pq.read_table(paths.manifest, columns=["id", "uri", "caption", "url", "status", "dup_of"])
        c = {k: t[k].to_pylist() for k in t.column_names}
        for r, (i, u, cap, ur, st, d) in enumerate(zip(c["id"], c["uri"], c["caption"], c["url"],
                                                        c["status"], c["dup_of"])):
            rows[i], uri[i], caption[i], url[i] = r, u, cap, ur
            status[st] += 1
            if st == "near_duplicate" and d:
                dup_of[i] = d
    quarantine = Counter(q.reason for q in load_quarantine(paths.quarantine))

    overrides, ov_err = {}, None
    try:
        overrides = load_overrides(paths.overrides)
    except ValueError as exc:  # a broken store must not stop the review page
        ov_err = str(exc)
        log.warning("overrides store unreadable: %s", exc)

    L = _read_ledgers(paths.selection_dir)
    epochs = [e for e, _ in ledger_files(paths.selection_dir)]
    reasons = list(REASONS)
    history: dict[str, list[int]] = defaultdict(list)
    items: dict[str, np.ndarray] = {}
    if L:
        extra = sorted({str(r) for r in L["reason"]} - set(reasons))
        reasons += extra
        rmap = {r: k for k, r in enumerate(reasons)}
        r_idx = np.fromiter((rmap[str(r)] for r in L["reason"]), dtype=np.int64, count=len(L["reason"]))
        order = np.argsort(L["epoch"], kind="stable")          # oldest epoch first
        latest: dict[str, int] = {}
        for j in order.tolist():
            i = L["id"][j]
            latest[i] = j                                       # a newer epoch overwrites
            history[i] += (int(L["epoch"][j]), int(L["kept"][j]), int(r_idx[j]))
        cur = np.fromiter(latest.values(), dtype=np.int64, count=len(latest))
        pos = np.array([rows.get(L["id"][j], 1 << 40) for j in cur.tolist()], dtype=np.int64)
        cur = cur[np.lexsort((L["row"][cur], pos))]             # manifest order, then ledger row
        items = {k: v[cur] for k, v in L.items()}
        items["reason_idx"] = r_idx[cur]
        unknown = sum(1 for i in items["id"] if i not in rows)
        if unknown and rows:
            log.warning("%d ledger ids are not in the manifest (ledger from another run?)", unknown)
    return RunData(root=paths.root, classes=names, epochs=epochs, items=items, history=dict(history),
                   reasons=reasons, uri=uri, caption=caption, url=url, dup_of=dup_of,
                   manifest_rows=rows, status=status, quarantine=quarantine, overrides=overrides,
                   overrides_error=ov_err)


# ============================================================================================
# summary (the page's top table and `webkd inspect`)
# ============================================================================================
def _class_counts(keys: Sequence, names: dict, kept: np.ndarray, reasons: Sequence[str]) -> list[ClassCount]:
    k_count: Counter = Counter()
    r_count: Counter = Counter()
    why: dict[Any, Counter] = defaultdict(Counter)
    for key, k, r in zip(keys, kept.tolist(), reasons):
        if k:
            k_count[key] += 1
        else:
            r_count[key] += 1
            why[key][r] += 1
    out = [ClassCount(key=key, name=names[key], kept=k_count[key], rejected=r_count[key],
                      reasons=why[key].most_common(3))
           for key in set(k_count) | set(r_count)]
    return sorted(out, key=lambda c: (c.key if isinstance(c.key, int) else 0, str(c.name)))


@dataclass
class RunSummary:
    """Counts of a run: records, quarantine, newest decisions per class, reasons, overrides."""

    root: Path
    records: int
    status: dict[str, int]
    quarantine: dict[str, int]
    epochs: list[int]
    images: int
    kept: int
    rejected: int
    by_pseudo: list[ClassCount]
    by_query: list[ClassCount]
    reasons: list[tuple[str, int]]            # rejection reasons, most common first
    groups: int                               # near-duplicate groups
    group_members: int
    overrides: dict[str, int]                 # action -> count in the store
    overrides_error: str | None = None

    def text(self) -> str:
        """A plain-text report (control characters from web strings made visible)."""
        p = _printable
        out = [f"run: {p(str(self.root))}"]
        st = ", ".join(f"{p(k)} {v}" for k, v in sorted(self.status.items()))
        out.append(f"records: {self.records}" + (f" ({st})" if st else ""))
        q = ", ".join(f"{p(k)} {v}" for k, v in sorted(self.quarantine.items(), key=lambda kv: -kv[1]))
        out.append(f"quarantine: {sum(self.quarantine.values())}" + (f" ({q})" if q else ""))
        if not self.epochs:
            out.append("ledgers: none yet (run selection / distill first)")
        else:
            out.append(f"ledgers: {len(self.epochs)} (epochs {self.epochs[0]}..{self.epochs[-1]}); "
                       f"newest decision of {self.images} images: kept {self.kept}, rejected {self.rejected}")
            for title, rows in (("by pseudo-label", self.by_pseudo), ("by web query", self.by_query)):
                out.append(f"  {title:<28} {'kept':>7} {'rejected':>9}  top reasons")
                for c in rows:
                    name = p(c.name)
                    name = name if len(name) <= 28 else name[:27] + "~"
                    why = ", ".join(f"{p(r)} {n}" for r, n in c.reasons)
                    out.append(f"  {name:<28} {c.kept:>7} {c.rejected:>9}  {why}")
            top = ", ".join(f"{p(r)} {n}" for r, n in self.reasons[:6])
            out.append(f"top rejection reasons: {top or '-'}")
        out.append(f"near-duplicate groups: {self.groups} ({self.group_members} members)")
        ov = ", ".join(f"{a} {n}" for a, n in sorted(self.overrides.items()))
        out.append(f"overrides: {sum(self.overrides.values())}" + (f" ({ov})" if ov else ""))
        if self.overrides_error:
            out.append(f"  warning: {p(self.overrides_error)}")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        def cc(rows: list[ClassCount]) -> list[dict[str, Any]]:
            return [{"key": c.key, "name": c.name, "kept": c.kept, "rejected": c.rejected,
                     "reasons": c.reasons} for c in rows]
        return {"records": self.records, "status": self.status, "quarantine": self.quarantine,
                "epochs": self.epochs, "images": self.images, "kept": self.kept,
                "rejected": self.rejected, "by_pseudo": cc(self.by_pseudo), "by_query": cc(self.by_query),
                "reasons": self.reasons, "groups": self.groups, "group_members": self.group_members,
                "overrides": self.overrides}


def _printable(s: str) -> str:
    """Web strings go to a terminal: show control / escape characters as \\x.. escapes."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)


def summarize(data: RunData) -> RunSummary:
    it = data.items
    kept = it.get("kept", np.zeros(0, dtype=bool))
    reasons = [data.reasons[k] for k in it.get("reason_idx", np.zeros(0, dtype=np.int64)).tolist()]
    pl = it.get("pseudo_label", np.zeros(0, dtype=np.int64)).tolist()
    wl = ["(none)" if w is None else str(w) for w in it.get("web_label", [])]
    by_pseudo = _class_counts(pl, {k: data.class_name(k) for k in set(pl)}, kept, reasons)
    by_query = _class_counts(wl, {w: w for w in set(wl)}, kept, reasons)
    rej = Counter(r for r, k in zip(reasons, kept.tolist()) if not k)
    return RunSummary(
        root=data.root, records=sum(data.status.values()), status=dict(data.status),
        quarantine=dict(data.quarantine), epochs=data.epochs, images=data.n,
        kept=int(kept.sum()), rejected=int(data.n - kept.sum()), by_pseudo=by_pseudo,
        by_query=by_query, reasons=rej.most_common(), groups=len(set(data.dup_of.values())),
        group_members=len(data.dup_of), overrides=dict(Counter(data.overrides.values())),
        overrides_error=data.overrides_error)


def summarize_run(run_dir: str | Path, classes: Sequence[str] | None = None) -> RunSummary:
    """The text summary behind `webkd inspect` (see RunSummary.text)."""
    return summarize(load_run(run_dir, classes))


# ============================================================================================
# thumbnails: sprite sheets, made once per content id
# ============================================================================================
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
        from pipeline.ingest import load_rgb  # decoding lives in ingest (bomb guard, EXIF, modes)

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


# ============================================================================================
# the page
# ============================================================================================
def js_json(obj: Any) -> str:
    """JSON that is safe inside a <script> element or a .js file.

    ASCII only (so U+2028/U+2029 and lone surrogates become \\u escapes), and `<`, `>`, `&`
    as \\u escapes, so no string can close the script, open a comment or form an entity.
    Quotes and unicode round-trip exactly through JSON.parse / the JS parser.
    """
    s = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _floats(a: np.ndarray, nd: int = 4) -> list[float | None]:
    a = np.asarray(a, dtype=np.float64)
    r = np.round(a, nd)
    return [None if math.isnan(v) else v for v in r.tolist()]


def _columns(data: RunData, slots: dict[str, int]) -> dict[str, list]:
    """The page's per-image columns (names as app.js reads them), manifest order."""
    it = data.items
    ids = it["id"].tolist()
    web = ["" if w is None else str(w) for w in it["web_label"].tolist()]
    labels = sorted(set(web))
    wl = {w: k for k, w in enumerate(labels)}
    so = {"accept": 1, "reject": 2}
    return {
        "id": ids,
        "row": [data.manifest_rows.get(i, int(r)) for i, r in zip(ids, it["row"].tolist())],
        "epoch": it["epoch"].tolist(),
        "val": [int(s == "val") for s in it["split"].tolist()],
        "kept": it["kept"].astype(int).tolist(),
        "weight": _floats(it["weight"], 3),
        "reason": it["reason_idx"].tolist(),
        "pl": it["pseudo_label"].tolist(),
        "conf": _floats(it["confidence"]),
        "thr": _floats(it["threshold"]),
        "alpha": _floats(it["teacher_share"], 3),
        "t1": it["teacher_top1"].tolist(), "t2": it["teacher_top2"].tolist(),
        "p1": _floats(it["teacher_p1"], 3), "p2": _floats(it["teacher_p2"], 3),
        "sp": it["student_pred"].tolist(), "sc": _floats(it["student_conf"], 3),
        "wl": [wl[w] if w else -1 for w in web], "wc": it["web_class"].tolist(),
        "knn": _floats(it["knn_agree"], 3),
        "uri": [data.uri.get(i) for i in ids],
        "cap": [data.caption.get(i) for i in ids],
        "url": [data.url.get(i) for i in ids],
        "dup": [data.dup_of.get(i) for i in ids],
        "g": [slots.get(i, -1) for i in ids],
        "h": [data.history.get(i, []) for i in ids],
        "so": [so.get(data.overrides.get(i, ""), 0) for i in ids],
        "_labels": labels,
    }


def render_gallery(run_dir: str | Path, classes: list[str] | None = None, thumb_size: int = 64,
                   page_size: int = 100, per_sheet: int = 256) -> Path:
    """Write the run's review page (`gallery/index.html`) and return its path.

    classes: teacher class names (default: `data.classes` of the run's config.yaml).
    thumb_size: thumbnail side in pixels; page_size: tiles per page; per_sheet: thumbnails
    per sprite-sheet JPEG (smaller sheets make the first page load less image data).
    """
    if thumb_size < 8 or page_size < 1 or per_sheet < 1:
        raise ValueError(f"thumb_size >= 8, page_size >= 1 and per_sheet >= 1 "
                         f"(got {thumb_size}, {page_size}, {per_sheet})")
    t0 = time.perf_counter()
    paths = RunPaths(Path(run_dir))
    data = load_run(paths.root, classes)
    summary = summarize(data)
    item_ids = data.items["id"].tolist() if data.n else []
    in_items = set(item_ids)
    extra_ids = [i for i in data.dup_of if i not in in_items]    # group members without a ledger row
    tidx = build_thumbnails(paths.root, item_ids + extra_ids, thumb_size, per_sheet)
    slots = tidx.slots()
    t_thumbs = time.perf_counter() - t0

    gdir = paths.gallery_dir
    cols = _columns(data, slots) if data.n else {}
    labels = cols.pop("_labels", [])
    names = [k for k in cols]
    token = hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:10]
    chunks = max(1, math.ceil(data.n / CHUNK_ROWS))
    for c in range(chunks):
        part = {k: v[c * CHUNK_ROWS:(c + 1) * CHUNK_ROWS] for k, v in cols.items()}
        atomic_write_text(gdir / "data" / f"rows_{c:03d}.js",
                          "(window.WEBKD_CHUNKS = window.WEBKD_CHUNKS || []).push(" + js_json(part) + ");\n")
    meta = {
        "run": {"name": paths.root.resolve().name, "path": str(paths.root.resolve()),
                "key": hashlib.sha256(str(paths.root.resolve()).encode()).hexdigest()[:16],
                "rendered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "epochs": data.epochs, "records": summary.records},
        "columns": names, "chunks": chunks, "n": data.n, "page_size": int(page_size),
        "classes": data.classes, "web_labels": labels, "reasons": data.reasons,
        "reason_info": {r: list(REASONS.get(r, (r[:4], RECORD_REASONS.get(r, r)))) for r in data.reasons},
        "thumbs": {"dir": tidx.dir.name, "size": thumb_size, "per_sheet": per_sheet, "cols": tidx.cols,
                   "sheets": [ThumbIndex.sheet_name(k) for k in range(tidx.n_sheets)]},
        "extra": {"id": extra_ids, "uri": [data.uri.get(i) for i in extra_ids],
                  "g": [slots.get(i, -1) for i in extra_ids], "rep": [data.dup_of[i] for i in extra_ids]},
        "summary": summary.to_json(), "stored_overrides": len(data.overrides),
        "overrides_error": data.overrides_error,
    }
    atomic_write_text(gdir / "data" / "meta.js", "window.WEBKD_META = " + js_json(meta) + ";\n")
    atomic_write_text(gdir / "app.js", _APP_JS)
    scripts = "\n".join(f'<script src="data/rows_{c:03d}.js?v={token}"></script>' for c in range(chunks))
    page = (_INDEX.replace("{{TITLE}}", html.escape(paths.root.resolve().name, quote=True))
            .replace("{{CSS}}", _CSS).replace("{{TOKEN}}", token).replace("{{SCRIPTS}}", scripts))
    atomic_write_text(paths.gallery, page)
    for stale in (gdir / "data").glob("rows_*.js"):      # chunks of an earlier, larger render
        m = re.match(r"rows_(\d+)\.js$", stale.name)
        if m and int(m.group(1)) >= chunks:
            stale.unlink(missing_ok=True)
    log.info("gallery: %d images, %d thumbnails made (%.1f s), page written in %.1f s: %s",
             data.n, tidx.generated, t_thumbs, time.perf_counter() - t0, paths.gallery)
    return paths.gallery


# --------------------------------------------------------------------------------------------
# static page parts (no data in them; the data comes from data/*.js)
# --------------------------------------------------------------------------------------------
_INDEX = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'self' file:; style-src 'self' file: 'unsafe-inline'; img-src 'self' file: blob: data:; connect-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'">
<title>webkd gallery: {{TITLE}}</title>
<style>{{CSS}}</style>
</head>
<body>
<header>
  <h1>webkd gallery: <span id="run-name">{{TITLE}}</span></h1>
  <div id="run-info"></div>
  <div id="warn" hidden></div>
</header>
<details id="summary" open><summary>Summary: kept / rejected per class</summary><div id="summary-body"></div></details>
<section id="controls">
  <label>View <select id="f-view"><option value="pseudo">by pseudo-label</option><option value="query">by web query</option></select></label>
  <label>Class <select id="f-class"></select></label>
  <label>Reason <select id="f-reason"></select></label>
  <label>Score <input id="f-smin" type="number" min="0" max="1" step="0.01" value="0"> to
    <input id="f-smax" type="number" min="0" max="1" step="0.01" value="1"></label>
  <label>Search <input id="f-q" type="search" placeholder="id, file, label, caption"></label>
  <label>Sort <select id="f-sort"><option value="desc">score high to low</option><option value="asc">score low to high</option></select></label>
  <label><input id="f-group" type="checkbox" checked> group near-duplicates</label>
  <label><input id="f-ovonly" type="checkbox"> only page overrides</label>
  <button id="b-reset" type="button">Reset filters</button>
</section>
<nav id="tabs">
  <button type="button" class="tab" data-tab="kept">Kept (<span id="n-kept">0</span>)</button>
  <button type="button" class="tab" data-tab="rejected">Rejected (<span id="n-rejected">0</span>)</button>
  <button type="button" class="tab" data-tab="all">All (<span id="n-all">0</span>)</button>
</nav>
<section id="actions">
  <span>Showing <b id="n-shown">0</b> images in <span id="n-tiles">0</span> tiles</span>
  <button id="b-accept-all" type="button">Accept all in filter</button>
  <button id="b-reject-all" type="button">Reject all in filter</button>
  <button id="b-clear-filter" type="button">Clear overrides in filter</button>
  <span class="sep">Page overrides: <b id="n-ov">0</b></span>
  <button id="b-export" type="button">Export overrides (JSON)</button>
  <button id="b-clear-all" type="button">Clear all page overrides</button>
</section>
<div class="pager" id="pager-top"></div>
<main id="grid"></main>
<div class="pager" id="pager-bottom"></div>
<footer>Apply exported overrides with <code>webkd override RUN_DIR overrides.json</code>; the next curate / refresh uses them.</footer>
<noscript>This page needs JavaScript (no network access is used).</noscript>
<script src="data/meta.js?v={{TOKEN}}"></script>
{{SCRIPTS}}
<script src="app.js?v={{TOKEN}}"></script>
</body>
</html>
"""

_CSS = """
*{box-sizing:border-box}
body{font:13px/1.35 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 14px 40px;color:#1d1d1f;background:#f6f6f4}
h1{font-size:18px;margin:12px 0 2px}
#run-info{color:#555}
#warn{background:#fff3cd;border:1px solid #e0c060;padding:4px 8px;margin:6px 0}
details#summary{margin:8px 0;background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px 8px}
details#summary summary{cursor:pointer;font-weight:600}
.sumwrap{display:flex;flex-wrap:wrap;gap:18px;max-height:320px;overflow:auto}
table.sum{border-collapse:collapse;font-size:12px}
table.sum th,table.sum td{padding:2px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
table.sum th:first-child,table.sum th:last-child,table.sum td:first-child,table.sum td.why{text-align:left}
table.sum td:first-child{max-width:220px;overflow:hidden;text-overflow:ellipsis}
table.sum a{color:#1a55a0;cursor:pointer;text-decoration:underline}
#controls{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;padding:8px 0;position:sticky;top:0;background:#f6f6f4;z-index:3;border-bottom:1px solid #ddd}
#controls input[type=number]{width:64px}
#controls select{max-width:240px}
#tabs{margin:8px 0 4px}
.tab{padding:4px 14px;border:1px solid #bbb;background:#fff;border-radius:4px 4px 0 0;cursor:pointer}
.tab.active{background:#1d1d1f;color:#fff;border-color:#1d1d1f}
#actions{display:flex;flex-wrap:wrap;gap:6px 10px;align-items:center;margin:4px 0}
#actions .sep{margin-left:14px}
.pager{display:flex;gap:8px;align-items:center;margin:6px 0}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:8px}
.tile{background:#fff;border:1px solid #ddd;border-left:5px solid #2a9d6a;border-radius:4px;padding:6px;min-width:0}
.tile.rejected{border-left-color:#c8453c}
.tile.ov-accept{box-shadow:0 0 0 2px #2a9d6a}
.tile.ov-reject{box-shadow:0 0 0 2px #c8453c}
.top{display:flex;gap:8px}
.thumb{flex:none;background-color:#ddd;background-repeat:no-repeat;border-radius:2px}
.thumb.missing{background:repeating-linear-gradient(45deg,#ddd,#ddd 4px,#eee 4px,#eee 8px)}
.info{min-width:0;flex:1}
.line{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.score{font-weight:600}
.badge{display:inline-block;padding:0 5px;border-radius:3px;background:#e4efe9;color:#175c3c;font-size:11px}
.rejected .badge{background:#f6e1df;color:#8a2a23}
.muted{color:#666}
.hist{margin-top:3px;display:flex;flex-wrap:wrap;gap:2px}
.chip{font:10px/14px ui-monospace,monospace;padding:0 3px;border-radius:2px;background:#e4efe9;color:#175c3c}
.chip.r{background:#f6e1df;color:#8a2a23}
.ovbar{display:flex;gap:6px;align-items:center;margin-top:4px}
.ovbar button{font-size:11px;padding:1px 8px;cursor:pointer;border:1px solid #bbb;background:#fff;border-radius:3px}
.ovbar button.on.acc{background:#2a9d6a;color:#fff;border-color:#2a9d6a}
.ovbar button.on.rej{background:#c8453c;color:#fff;border-color:#c8453c}
.ovstate{font-size:11px;font-weight:600}
.group{display:flex;flex-wrap:wrap;gap:4px;margin-top:4px;padding-top:4px;border-top:1px dashed #ccc}
.member{font-size:10px;max-width:70px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.empty{padding:30px;color:#666}
footer{margin-top:14px;color:#666}
"""

_APP_JS = r"""/* webkd gallery. Vanilla JS, no network. Every string from the data reaches the DOM through
   textContent or element attributes, never through the HTML parser. */
"use strict";
(function () {
  const M = window.WEBKD_META;
  const CH = window.WEBKD_CHUNKS || [];
  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // ---- data: columns concatenated over the chunks ----
  const D = {};
  for (const k of M.columns) D[k] = [];
  for (const ch of CH) for (const k of M.columns) D[k] = D[k].concat(ch[k]);
  const N = D.id ? D.id.length : 0;
  const byId = new Map();
  for (let i = 0; i < N; i++) byId.set(D.id[i], i);
  const R = M.reasons, RI = M.reason_info;
  const className = (k) => (k >= 0 && k < M.classes.length) ? M.classes[k] : (k < 0 ? "(none)" : "class " + k);
  const webName = (w) => (w >= 0 ? M.web_labels[w] : "(none)");
  const members = new Map();             // representative index -> member indices (in the ledger)
  for (let i = 0; i < N; i++) {
    const d = D.dup[i];
    if (d === null || !byId.has(d)) continue;
    const r = byId.get(d);
    if (!members.has(r)) members.set(r, []);
    members.get(r).push(i);
  }
  const extras = new Map();              // representative id -> extra (not in ledger) positions
  for (let j = 0; j < M.extra.id.length; j++) {
    const rep = M.extra.rep[j];
    if (!extras.has(rep)) extras.set(rep, []);
    extras.get(rep).push(j);
  }

  // ---- state ----
  const DEFAULTS = {view: "pseudo", cls: "*", tab: "kept", reason: "*", smin: 0, smax: 1, q: "",
                    group: true, ovOnly: false, sort: "desc", page: 0};
  const S = Object.assign({}, DEFAULTS);
  let LIST = [], TILES = [];

  // ---- overrides made on this page (memory + localStorage) ----
  const LSKEY = "webkd-overrides:" + M.run.key;
  const OV = new Map();                  // id -> {action, time}
  const storedAction = (i) => (D.so[i] === 1 ? "accept" : D.so[i] === 2 ? "reject" : null);
  function loadOV() {
    try {
      const raw = window.localStorage ? window.localStorage.getItem(LSKEY) : null;
      if (!raw) return;
      const o = JSON.parse(raw);
      for (const id of Object.keys(o)) {
        const e = o[id];
        if (!e || (e.action !== "accept" && e.action !== "reject")) continue;
        const i = byId.get(id);
        if (i !== undefined && storedAction(i) === e.action) continue;   // already in the store
        OV.set(id, {action: e.action, time: String(e.time || "")});
      }
    } catch (err) { console.warn("webkd: cannot read saved overrides", err); }
  }
  function saveOV() {
    try {
      if (window.localStorage) window.localStorage.setItem(LSKEY, JSON.stringify(Object.fromEntries(OV)));
    } catch (err) { /* private mode, quota: the in-memory copy still works */ }
    $("n-ov").textContent = String(OV.size);
  }
  function setOV(id, action) {
    if (action) OV.set(id, {action: action, time: new Date().toISOString()}); else OV.delete(id);
  }
  function exportOV() {
    const entries = {};
    for (const [id, e] of OV) entries[id] = {action: e.action, note: "gallery", time: e.time};
    const text = JSON.stringify({version: 1, entries: entries}, null, 2) + "\n";
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
    a.download = "overrides.json";
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 2000);
  }

  // ---- filtering ----
  const classKey = (i) => (S.view === "pseudo" ? D.pl[i] : D.wl[i]);
  function textHit(i, q) {
    const parts = [D.id[i], D.uri[i], D.cap[i], D.url[i], webName(D.wl[i]), className(D.pl[i])];
    for (const p of parts) if (p && String(p).toLowerCase().indexOf(q) >= 0) return true;
    return false;
  }
  function pass(i, skip) {
    if (skip !== "class" && S.cls !== "*" && classKey(i) !== S.cls) return false;
    if (skip !== "reason" && S.reason !== "*" && D.reason[i] !== S.reason) return false;
    if (skip !== "tab") {
      if (S.tab === "kept" && !D.kept[i]) return false;
      if (S.tab === "rejected" && D.kept[i]) return false;
    }
    const c = D.conf[i];
    if (c === null) { if (S.smin > 0 || S.smax < 1) return false; }
    else if (c < S.smin || c > S.smax) return false;
    if (S.ovOnly && !OV.has(D.id[i])) return false;
    if (S.q && !textHit(i, S.q)) return false;
    return true;
  }
  function classOptions() {
    const keys = new Set();
    for (let i = 0; i < N; i++) keys.add(classKey(i));
    const arr = Array.from(keys);
    if (S.view === "pseudo") arr.sort((a, b) => a - b);
    else arr.sort((a, b) => webName(a).localeCompare(webName(b)));
    const sel = $("f-class");
    sel.replaceChildren();
    const all = el("option", null, "all classes"); all.value = "*"; sel.appendChild(all);
    for (const k of arr) {
      const o = el("option", null, S.view === "pseudo" ? className(k) : webName(k));
      o.value = String(k); o.dataset.name = o.textContent; sel.appendChild(o);
    }
    sel.value = S.cls === "*" ? "*" : String(S.cls);
  }
  function reasonOptions() {
    const sel = $("f-reason");
    const all = el("option", null, "all reasons"); all.value = "*"; sel.appendChild(all);
    R.forEach((r, k) => {
      const o = el("option", null, r); o.value = String(k); o.dataset.name = r;
      o.title = RI[r] ? RI[r][1] : r; sel.appendChild(o);
    });
  }
  function update() {
    let nk = 0, nr = 0;
    const cc = new Map(), rc = new Map(), list = [];
    for (let i = 0; i < N; i++) {
      if (pass(i, "tab")) { if (D.kept[i]) nk++; else nr++; }
      if (pass(i, "class")) { const k = classKey(i); cc.set(k, (cc.get(k) || 0) + 1); }
      if (pass(i, "reason")) rc.set(D.reason[i], (rc.get(D.reason[i]) || 0) + 1);
      if (pass(i, null)) list.push(i);
    }
    $("n-kept").textContent = String(nk);
    $("n-rejected").textContent = String(nr);
    $("n-all").textContent = String(nk + nr);
    let tc = 0;
    for (const o of $("f-class").options) {
      if (o.value === "*") continue;
      const n = cc.get(Number(o.value)) || 0; tc += n;
      o.textContent = o.dataset.name + " (" + n + ")";
    }
    $("f-class").options[0].textContent = "all classes (" + tc + ")";
    let tr = 0;
    for (const o of $("f-reason").options) {
      if (o.value === "*") continue;
      const n = rc.get(Number(o.value)) || 0; tr += n;
      o.textContent = o.dataset.name + " (" + n + ")";
    }
    $("f-reason").options[0].textContent = "all reasons (" + tr + ")";
    const sgn = S.sort === "asc" ? 1 : -1;
    list.sort((a, b) => {
      const ca = D.conf[a] === null ? -1 : D.conf[a], cb = D.conf[b] === null ? -1 : D.conf[b];
      return ca !== cb ? sgn * (ca - cb) : (D.id[a] < D.id[b] ? -1 : 1);
    });
    let tiles = list;
    if (S.group) {
      const inList = new Set(list);
      tiles = list.filter((i) => {
        const d = D.dup[i];
        if (d === null) return true;
        const r = byId.get(d);
        return r === undefined || !inList.has(r);
      });
    }
    LIST = list; TILES = tiles;
    $("n-shown").textContent = String(list.length);
    $("n-tiles").textContent = String(tiles.length);
    for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === S.tab);
    const pages = Math.max(1, Math.ceil(tiles.length / M.page_size));
    S.page = Math.min(Math.max(0, S.page), pages - 1);
    renderPage(pages);
  }

  // ---- tiles ----
  function fmt(p, d) { return (p === null || p === undefined) ? "-" : Number(p).toFixed(d === undefined ? 2 : d); }
  function thumb(g) {
    const T = M.thumbs, d = el("div", "thumb");
    d.style.width = d.style.height = T.size + "px";
    if (g === null || g < 0 || g === undefined) { d.classList.add("missing"); return d; }
    const s = Math.floor(g / T.per_sheet), j = g % T.per_sheet;
    d.style.backgroundImage = 'url("' + T.dir + "/" + T.sheets[s] + '")';
    d.style.backgroundPosition = (-(j % T.cols) * T.size) + "px " + (-Math.floor(j / T.cols) * T.size) + "px";
    return d;
  }
  function line(cls, label, text, title) {
    const d = el("div", "line " + cls);
    if (label) d.appendChild(el("span", "muted", label + " "));
    d.appendChild(el("span", "v", text));
    d.title = title !== undefined ? String(title) : String(text);
    return d;
  }
  function baseName(u) {
    if (!u) return "-";
    const s = String(u), k = Math.max(s.lastIndexOf("/"), s.lastIndexOf("\\"));
    return k >= 0 ? s.slice(k + 1) : s;
  }
  function ovState(t, id, i) {
    const e = OV.get(id), st = storedAction(i);
    t.classList.toggle("ov-accept", !!e && e.action === "accept");
    t.classList.toggle("ov-reject", !!e && e.action === "reject");
    t.querySelector("button.acc").classList.toggle("on", !!e && e.action === "accept");
    t.querySelector("button.rej").classList.toggle("on", !!e && e.action === "reject");
    const s = t.querySelector(".ovstate");
    s.textContent = e ? "page: " + e.action : (st ? "stored: " + st : "");
  }
  function history(i) {
    const h = D.h[i], box = el("div", "hist f-hist");
    for (let k = 0; k + 2 < h.length; k += 3) {
      const e = h[k], kept = h[k + 1], r = R[h[k + 2]];
      const tag = RI[r] ? RI[r][0] : r;
      const c = el("span", "chip " + (kept ? "k" : "r"), e + (kept ? "\u2713" : "\u2717") + tag);
      c.title = "epoch " + e + ": " + (kept ? "kept" : "rejected") + " (" + r + ")";
      box.appendChild(c);
    }
    return box;
  }
  function groupStrip(i, box) {
    const strip = el("div", "group");
    for (const m of members.get(i) || []) {
      const w = el("div", "member");
      w.appendChild(thumb(D.g[m]));
      w.appendChild(el("div", "line", R[D.reason[m]]));
      w.title = D.id[m] + "\n" + (D.uri[m] || "") + "\n" + (D.kept[m] ? "kept" : "rejected") + " (" + R[D.reason[m]] + ")";
      strip.appendChild(w);
    }
    for (const j of extras.get(D.id[i]) || []) {
      const w = el("div", "member");
      w.appendChild(thumb(M.extra.g[j]));
      w.appendChild(el("div", "line", "no ledger row"));
      w.title = M.extra.id[j] + "\n" + (M.extra.uri[j] || "");
      strip.appendChild(w);
    }
    box.appendChild(strip);
  }
  function tile(i) {
    const id = D.id[i], kept = !!D.kept[i], r = R[D.reason[i]];
    const t = el("article", "tile " + (kept ? "kept" : "rejected"));
    t.dataset.id = id;
    const top = el("div", "top");
    top.appendChild(thumb(D.g[i]));
    const info = el("div", "info");
    const head = el("div", "line");
    head.appendChild(el("span", "score f-score", fmt(D.conf[i], 3)));
    head.appendChild(document.createTextNode(" "));
    const b = el("span", "badge f-reason", r); b.title = RI[r] ? RI[r][1] : r; head.appendChild(b);
    head.appendChild(el("span", "muted f-weight", " w " + fmt(D.weight[i])));
    if (D.val[i]) head.appendChild(el("span", "muted", " val"));
    info.appendChild(head);
    info.appendChild(line("f-web", "web:", webName(D.wl[i])));
    info.appendChild(line("f-file", "file:", baseName(D.uri[i]), D.uri[i] || ""));
    info.appendChild(line("f-pl", "pseudo:", className(D.pl[i]) + " (thr " + fmt(D.thr[i]) + ")"));
    info.appendChild(line("f-student", "student:", D.sp[i] < 0 ? "-" : className(D.sp[i]) + " " + fmt(D.sc[i])));
    top.appendChild(info);
    t.appendChild(top);
    t.appendChild(line("f-teacher", "teacher:", className(D.t1[i]) + " " + fmt(D.p1[i]) + " \u00b7 " +
                       className(D.t2[i]) + " " + fmt(D.p2[i]) +
                       (D.alpha[i] === null ? "" : "  (\u03b1 " + fmt(D.alpha[i]) + ")")));
    if (D.cap[i]) t.appendChild(line("f-cap", "caption:", D.cap[i]));
    if (D.url[i]) {
      const u = String(D.url[i]);
      if (/^https?:\/\//i.test(u)) {
        const d = el("div", "line f-url"), a = el("a", null, u);
        a.href = u; a.rel = "noopener noreferrer nofollow"; a.target = "_blank";
        d.appendChild(el("span", "muted", "url: ")); d.appendChild(a); d.title = u; t.appendChild(d);
      } else t.appendChild(line("f-url", "url:", u));
    }
    if (D.knn[i] !== null) t.appendChild(line("f-knn", "kNN agree:", fmt(D.knn[i])));
    t.appendChild(history(i));
    const idl = line("f-id", "id:", id.slice(0, 16), id);
    t.appendChild(idl);
    if (D.dup[i] !== null) t.appendChild(line("f-dupof", "near-dup of:", String(D.dup[i]).slice(0, 16), D.dup[i]));
    const nm = (members.get(i) || []).length + (extras.get(id) || []).length;
    const bar = el("div", "ovbar");
    const ba = el("button", "acc", "Accept"), br = el("button", "rej", "Reject");
    ba.type = "button"; br.type = "button";
    ba.title = "force keep (override)"; br.title = "force reject (override)";
    const st = el("span", "ovstate");
    bar.appendChild(ba); bar.appendChild(br); bar.appendChild(st);
    if (nm) {
      const g = el("button", "grp", "+" + nm + " near-dup" + (nm > 1 ? "s" : ""));
      g.type = "button";
      g.addEventListener("click", () => {
        const open = t.querySelector(".group");
        if (open) open.remove(); else groupStrip(i, t);
      });
      bar.appendChild(g);
    }
    t.appendChild(bar);
    const click = (action) => {
      const cur = OV.get(id);
      setOV(id, cur && cur.action === action ? null : action);
      saveOV();
      ovState(t, id, i);
    };
    ba.addEventListener("click", () => click("accept"));
    br.addEventListener("click", () => click("reject"));
    ovState(t, id, i);
    return t;
  }
  function pager(box, pages) {
    box.replaceChildren();
    if (pages <= 1) return;
    const prev = el("button", null, "\u2039 Prev"), next = el("button", null, "Next \u203a");
    prev.type = next.type = "button";
    prev.disabled = S.page === 0; next.disabled = S.page >= pages - 1;
    prev.addEventListener("click", () => { S.page--; renderPage(pages); window.scrollTo(0, 0); });
    next.addEventListener("click", () => { S.page++; renderPage(pages); window.scrollTo(0, 0); });
    box.appendChild(prev);
    box.appendChild(el("span", "pageinfo", "page " + (S.page + 1) + " / " + pages));
    box.appendChild(next);
  }
  function renderPage(pages) {
    const grid = $("grid");
    const start = S.page * M.page_size, part = TILES.slice(start, start + M.page_size);
    const frag = document.createDocumentFragment();
    for (const i of part) frag.appendChild(tile(i));
    grid.replaceChildren(frag);
    if (!part.length) grid.appendChild(el("div", "empty", N ? "No images match the filters." :
      "No ledger yet: run selection (webkd distill / curate) first."));
    pager($("pager-top"), pages);
    pager($("pager-bottom"), pages);
  }

  // ---- summary table ----
  function summaryTable(title, rows, view) {
    const tb = el("table", "sum"), head = el("tr");
    for (const h of [title, "kept", "rejected", "top rejection reasons"]) head.appendChild(el("th", null, h));
    tb.appendChild(head);
    for (const c of rows) {
      const tr = el("tr"), td = el("td"), a = el("a", null, c.name);
      a.title = "show this class";
      a.addEventListener("click", () => {
        S.view = view; $("f-view").value = view; classOptions();
        S.cls = view === "pseudo" ? c.key : M.web_labels.indexOf(c.name);
        $("f-class").value = String(S.cls); S.tab = "all"; S.page = 0; update();
        $("controls").scrollIntoView();
      });
      td.appendChild(a); tr.appendChild(td);
      tr.appendChild(el("td", null, c.kept));
      tr.appendChild(el("td", null, c.rejected));
      tr.appendChild(el("td", "why", c.reasons.map((x) => x[0] + " " + x[1]).join(", ")));
      tb.appendChild(tr);
    }
    return tb;
  }
  function summary() {
    const s = M.summary, box = $("summary-body"), wrap = el("div", "sumwrap");
    wrap.appendChild(summaryTable("pseudo-label", s.by_pseudo, "pseudo"));
    wrap.appendChild(summaryTable("web query", s.by_query, "query"));
    box.appendChild(wrap);
    box.appendChild(el("p", "reasons", "Top rejection reasons: " +
      (s.reasons.length ? s.reasons.slice(0, 8).map((x) => x[0] + " " + x[1]).join(", ") : "-")));
    const ep = M.run.epochs;
    $("run-info").textContent = N + " images (" + M.run.records + " manifest records), kept " + s.kept +
      ", rejected " + s.rejected + "; epochs " + (ep.length ? ep[0] + ".." + ep[ep.length - 1] : "-") +
      "; " + s.groups + " near-duplicate groups; stored overrides: " + M.stored_overrides +
      "; rendered " + M.run.rendered;
    $("run-info").title = M.run.path;
    if (M.overrides_error) { $("warn").hidden = false; $("warn").textContent = "Overrides store: " + M.overrides_error; }
  }

  // ---- controls ----
  function num(v, d) { const x = parseFloat(v); return isNaN(x) ? d : x; }
  function wire() {
    const re = () => { S.page = 0; update(); };
    $("f-view").addEventListener("change", (e) => { S.view = e.target.value; S.cls = "*"; classOptions(); re(); });
    $("f-class").addEventListener("change", (e) => { S.cls = e.target.value === "*" ? "*" : Number(e.target.value); re(); });
    $("f-reason").addEventListener("change", (e) => { S.reason = e.target.value === "*" ? "*" : Number(e.target.value); re(); });
    $("f-smin").addEventListener("input", (e) => { S.smin = num(e.target.value, 0); re(); });
    $("f-smax").addEventListener("input", (e) => { S.smax = num(e.target.value, 1); re(); });
    $("f-q").addEventListener("input", (e) => { S.q = e.target.value.trim().toLowerCase(); re(); });
    $("f-sort").addEventListener("change", (e) => { S.sort = e.target.value; re(); });
    $("f-group").addEventListener("change", (e) => { S.group = e.target.checked; re(); });
    $("f-ovonly").addEventListener("change", (e) => { S.ovOnly = e.target.checked; re(); });
    $("b-reset").addEventListener("click", () => {
      Object.assign(S, DEFAULTS);
      $("f-view").value = "pseudo"; $("f-reason").value = "*"; $("f-smin").value = "0"; $("f-smax").value = "1";
      $("f-q").value = ""; $("f-sort").value = "desc"; $("f-group").checked = true; $("f-ovonly").checked = false;
      classOptions(); update();
    });
    for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => { S.tab = b.dataset.tab; re(); });
    const bulk = (action) => { for (const i of LIST) setOV(D.id[i], action); saveOV(); update(); };
    $("b-accept-all").addEventListener("click", () => bulk("accept"));
    $("b-reject-all").addEventListener("click", () => bulk("reject"));
    $("b-clear-filter").addEventListener("click", () => bulk(null));
    $("b-export").addEventListener("click", exportOV);
    let armed = 0;
    $("b-clear-all").addEventListener("click", (e) => {      // two clicks, no dialog
      if (Date.now() - armed > 4000) { armed = Date.now(); e.target.textContent = "Click again to clear all"; return; }
      armed = 0; e.target.textContent = "Clear all page overrides"; OV.clear(); saveOV(); update();
    });
  }

  loadOV();
  summary();
  reasonOptions();
  classOptions();
  wire();
  saveOV();
  update();
  document.body.dataset.ready = "1";
})();
"""
