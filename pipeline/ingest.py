"""Ingest: web images in, validated records out (`manifest.parquet` + `quarantine.parquet`).

Two parts, in reading order (listing the sources is `pipeline.sources`):

1. Decoding and validation (`decode_image`, `to_rgb`, `load_rgb`): Pillow decode behind the
   decompression-bomb guard, full load so truncated data fails here and not in a training
   batch, EXIF transpose, one conversion to 8-bit RGB. Every refusal is a `Rejected` with a
   reason code from `pipeline.records.REASONS`.
2. `load_entry` (one listed `Entry` -> content id + decoded image; ingest and `webkd predict`
   both read through it) and `run_ingest`: content-hash ids, exact-duplicate merging,
   quarantine, incremental re-runs.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from webkd.pipeline.progress import tqdm

from webkd.pipeline.config import IngestConfig
from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import (DUPLICATE, OK, REASONS, QuarantineRow, Record, load_manifest, load_quarantine,
                                    path_to_uri, read_bytes, save_manifest, save_quarantine)
from webkd.pipeline.sources import Entry, iter_source
from webkd.pipeline.storage import atomic_write_table, commit_files, recover_files

log = logging.getLogger(__name__)


# ============================================================================================
# 1. decoding and validation
# ============================================================================================
class Rejected(Exception):
    """An image refused by ingest; `reason` is a key of `pipeline.records.REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    """A validated image: RGB pixels after EXIF transpose plus what the manifest records."""

    image: Image.Image      # mode RGB, upright
    width: int              # after EXIF transpose
    height: int
    format: str             # JPEG, PNG, GIF, WEBP, ...
    mode: str               # the file's own Pillow mode (before conversion)
    n_frames: int           # > 1 for animations; only the first frame is used


# Modes `to_rgb` converts faithfully. Anything else (F, LAB, I;16S, ...) is unsupported_mode.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_DIRECT_MODES = {"RGB", "RGBX", "L", "1", "CMYK", "YCbCr", "HSV"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
SUPPORTED_MODES = _ALPHA_MODES | _DIRECT_MODES | _SIXTEEN_BIT | {"P"}

# Image.open runs Pillow's bomb check against the process-wide Image.MAX_IMAGE_PIXELS and
# reports the lower band as a warning; both are process-wide state, so opening is serialised
# (it only parses the header: pixel decoding runs outside the lock, in parallel).
_OPEN_LOCK = threading.Lock()


def _open_guarded(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open with Pillow's decompression-bomb guard at `max_pixels`.

    Pillow warns above max_pixels and raises above twice that; both become `bomb`. The header
    size is then checked here as well, so nothing above the limit gets to pixel decoding.
    """
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejected("bomb", str(exc)) from None
        except UnidentifiedImageError:
            raise Rejected(*_sniff(data)) from None
        except Exception as exc:  # a plugin accepted the magic bytes but the header is broken
            raise Rejected("truncated", f"header: {type(exc).__name__}: {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        raise Rejected("bomb", f"{img.size[0]}x{img.size[1]} exceeds {max_pixels} pixels")
    w, h = img.size
    if w * h > max_pixels:
        raise Rejected("bomb", f"{w}x{h} exceeds {max_pixels} pixels")
    return img


_BMFF_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC",
                b"mif1": "HEIF", b"msf1": "HEIF", b"jxl ": "JPEG XL"}


def _sniff(data: bytes) -> tuple[str, str]:
    """(reason, printable hint) for bytes Pillow did not identify, by their magic bytes: an image
    format this build cannot decode is `unsupported_format`, anything else `not_an_image`."""
    head = data[:1024].lstrip().lower()
    if data[4:8] == b"ftyp" and data[8:12] in _BMFF_BRANDS:
        return "unsupported_format", f"{_BMFF_BRANDS[data[8:12]]} image (no Pillow plugin for it here)"
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "unsupported_format", "JPEG XL image (no Pillow plugin for it here)"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "unsupported_format", "SVG vector image (vector images are not rasterised)"
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not_an_image", "HTML document"
    if head.startswith(b"<?xml"):
        return "not_an_image", "XML document"
    try:
        data[:256].decode("utf-8")
        text = data[:40].decode("utf-8", "replace").strip().replace("\n", " ")
        return "not_an_image", "text: " + "".join(c if c.isprintable() else "?" for c in text)
    except UnicodeDecodeError:
        return "not_an_image", f"unknown format (starts with {data[:8].hex()})"


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Alpha-composite an RGBA image over white (web images with holes look as they render)."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, or I holding 0..65535) -> 8-bit RGB by scaling, never clipping."""
    arr = np.asarray(img)                                    # (H, W) uint16 / int32
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise Rejected("unsupported_mode", f"mode {img.mode} with values {lo}..{hi} (not 16-bit)")
    grey = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)   # (H, W)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")      # (H, W, 3)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK -> RGB through the embedded ICC profile when there is one, else Pillow's formula."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as exc:  # a broken profile: fall back to the plain conversion
            log.debug("CMYK ICC conversion failed (%s); using Pillow's formula", exc)
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """The one conversion of a decoded frame to 8-bit RGB.

    Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is composited on
    white; 16-bit grey is scaled to 8 bit; CMYK goes through its ICC profile when present.
    Modes with no faithful conversion (float, LAB, signed 16-bit, ...) raise
    `Rejected("unsupported_mode")`.
    """
    mode = img.mode
    if mode not in SUPPORTED_MODES:
        raise Rejected("unsupported_mode", f"mode {mode}")
    if mode in _SIXTEEN_BIT:
        return _sixteen_to_rgb(img)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode in _ALPHA_MODES or img.info.get("transparency") is not None:
        return _composite_on_white(img.convert("RGBA"))
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _decode(data: bytes, max_pixels: int, min_side: int, max_bytes: int | None) -> Decoded:
    """Shared decode path of ingest (`decode_image`) and later stages (`load_rgb`)."""
    if len(data) == 0:
        raise Rejected("empty", "0 bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > {max_bytes}")
    img = _open_guarded(data, max_pixels)
    fmt, mode = img.format or "", img.mode
    w, h = img.size
    if min(w, h) < min_side:
        raise Rejected("too_small", f"{w}x{h} < {min_side} px")
    if mode not in SUPPORTED_MODES:                          # refuse before decoding pixels
        raise Rejected("unsupported_mode", f"mode {mode}")
    try:
        n_frames = int(getattr(img, "n_frames", 1))
        img.verify()                                         # chunk CRCs, structure (PNG, ...)
    except Exception as exc:
        raise Rejected("truncated", f"verify: {type(exc).__name__}: {exc}") from None
    img = _open_guarded(data, max_pixels)                    # verify() leaves img unusable
    try:
        img.seek(0)
        img.load()                                           # full decode: truncation fails here
    except Image.DecompressionBombError as exc:
        raise Rejected("bomb", str(exc)) from None
    except Exception as exc:
        raise Rejected("truncated", f"load: {type(exc).__name__}: {exc}") from None
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF: keep the stored orientation
        log.debug("EXIF transpose failed (%s); keeping stored orientation", exc)
        upright = img
    rgb = to_rgb(upright)
    if rgb is img:
        rgb = img.copy()                                     # detach from the file's frame state
    return Decoded(image=rgb, width=rgb.width, height=rgb.height, format=fmt, mode=mode,
                   n_frames=n_frames)


def decode_image(data: bytes, cfg: IngestConfig) -> Decoded:
    """Decode and validate one image file's bytes under `cfg`'s limits.

    Order (cheapest refusal first): empty, too_large, not_an_image / bomb (header only),
    too_small, unsupported_mode, truncated (verify + full load), then EXIF transpose and RGB.
    `Image.LOAD_TRUNCATED_IMAGES` is never set: a truncated file is refused, not padded grey.
    """
    return _decode(data, cfg.max_pixels, cfg.min_side, cfg.max_bytes)


def content_id(data: bytes) -> str:
    """Record id: sha256 hex of the file bytes (as img2dataset and DataComp do)."""
    return hashlib.sha256(data).hexdigest()


def load_rgb(record: Record, verify_id: bool = True) -> Image.Image:
    """The RGB image ingest validated for `record`: re-read bytes (file or tar member), decode.

    Limits are not re-applied (ingest already applied the run's own); the bomb guard is kept at
    the record's own size. With `verify_id` the bytes must still hash to `record.id`, so a file
    changed since ingest fails loudly instead of silently feeding other pixels.
    """
    data = read_bytes(record)
    if verify_id and content_id(data) != record.id:
        raise ValueError(f"{record.uri}: bytes changed since ingest (sha256 no longer {record.id[:12]}...)")
    max_pixels = max(IngestConfig().max_pixels, record.width * record.height)
    return _decode(data, max_pixels, min_side=1, max_bytes=None).image


# ============================================================================================
# 2. run_ingest: ids, duplicates, quarantine, incremental state
# ============================================================================================
@dataclass
class IngestReport:
    """Counts of one ingest round; `summary()` is the table the CLI prints."""

    batch: int = 0
    seen: int = 0                 # entries listed by all sources (including listing failures)
    skipped_unchanged: int = 0    # listed before with the same size/mtime/offset: not read again
    new: int = 0                  # new or changed entries processed (read + decoded) this round
    kept: int = 0                 # new records appended to the manifest
    duplicates: int = 0           # exact byte duplicates merged into an earlier record
    refreshed: int = 0            # same file re-read (touched / shard rewritten), same bytes
    sidecars: int = 0             # shard members that are a sample's caption/metadata (.txt/.json/.cls)
    upstream_failed: int = 0      # rows img2dataset marked as failed downloads (no bytes)
    quarantined: dict[str, int] = field(default_factory=dict)   # reason -> count (incl. duplicate)
    total_records: int = 0
    total_quarantined: int = 0

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def up_to_date(self) -> bool:
        """Nothing new or changed was listed: the round read no file and wrote nothing."""
        return self.new == 0

    def summary(self) -> str:
        rows = [("ingest round", self.batch), ("listed", self.seen),
                ("unchanged (skipped)", self.skipped_unchanged), ("processed (new/changed)", self.new),
                ("kept (new records)", self.kept), ("duplicates (merged)", self.duplicates),
                ("quarantined", self.n_quarantined)]
        rows += [(f"  {reason}", n) for reason, n in sorted(self.quarantined.items())]
        if self.refreshed:
            rows.append(("refreshed (same bytes)", self.refreshed))
        if self.sidecars:
            rows.append(("sidecars (captions, metadata)", self.sidecars))
        if self.upstream_failed:
            rows.append(("failed downloads (shard parquet)", self.upstream_failed))
        rows += [("manifest rows", self.total_records), ("quarantine rows", self.total_quarantined)]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v:>8}" for k, v in rows)


@dataclass
class _Outcome:
    entry: Entry
    id: str | None = None
    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    mode: str = ""


def _read_entry(entry: Entry, cfg: IngestConfig) -> bytes:
    """The entry's bytes (file or tar member), with read failures as `Rejected`."""
    if entry.size > cfg.max_bytes:                           # refuse before reading it all
        raise Rejected("too_large", f"{entry.size} bytes > {cfg.max_bytes}")
    try:
        if entry.container:
            with open(entry.container, "rb") as fh:
                fh.seek(entry.offset)
                data = fh.read(entry.size)
            if len(data) != entry.size:
                raise Rejected("truncated", f"shard ends inside the member ({len(data)}/{entry.size} bytes)")
            return data
        with open(entry.path or entry.uri, "rb") as fh:
            return fh.read(cfg.max_bytes + 1)
    except FileNotFoundError:
        raise Rejected("not_found", "vanished after listing") from None
    except OSError as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from None


def load_entry(entry: Entry, cfg: IngestConfig, on_id: Callable[[str], None] | None = None) -> tuple[str, Decoded]:
    """(content id, decoded image) of one listed entry: the one read + decode path of ingest and of
    `webkd predict`. A listing failure or a refused image raises `Rejected`; `on_id` hears the id
    as soon as the bytes are hashed (before decoding), so a refusal can still name its bytes."""
    if entry.error:
        raise Rejected(*entry.error)
    data = _read_entry(entry, cfg)
    cid = content_id(data)
    if on_id is not None:
        on_id(cid)
    return cid, decode_image(data, cfg)


def _process(entry: Entry, cfg: IngestConfig) -> _Outcome:
    """Read, hash and validate one entry (runs in a worker thread; never raises)."""
    if entry.error:
        return _Outcome(entry, reason=entry.error[0], detail=entry.error[1])
    seen: list[str] = []                                     # the content id, once hashed
    try:
        cid, dec = load_entry(entry, cfg, on_id=seen.append)
    except Rejected as rej:
        return _Outcome(entry, id=next(iter(seen), None), reason=rej.reason, detail=rej.detail)
    except Exception as exc:  # anything unforeseen in a decoder: this file, not the run
        log.exception("unexpected error on %s", entry.uri)
        return _Outcome(entry, id=next(iter(seen), None), reason="truncated", detail=f"unexpected {type(exc).__name__}: {exc}")
    return _Outcome(entry, id=cid, width=dec.width, height=dec.height, format=dec.format, mode=dec.mode)


def _ordered_map(fn: Callable[[Entry], _Outcome], items: Iterable[Entry], workers: int) -> Iterator[_Outcome]:
    """map() over a thread pool, results in input order, at most 4 x workers in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


_STATE_COLUMNS = ["source", "uri", "web_label", "size", "mtime_ns", "offset", "outcome", "id", "batch"]


def _load_state(path: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    return {(r["source"], r["uri"], r["web_label"] or ""): r for r in pq.read_table(path).to_pylist()}


def _save_state(path: Path, state: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    import pyarrow as pa

    schema = pa.schema([("source", pa.string()), ("uri", pa.string()), ("web_label", pa.string()),
                        ("size", pa.int64()), ("mtime_ns", pa.int64()), ("offset", pa.int64()),
                        ("outcome", pa.string()), ("id", pa.string()), ("batch", pa.int32())])
    rows = list(state.values())
    atomic_write_table(path, pa.table({c: [r[c] for r in rows] for c in _STATE_COLUMNS}, schema=schema))


def run_ingest(sources: list[str], paths: RunPaths, cfg: IngestConfig, workers: int = 2) -> IngestReport:
    """One ingest round over `sources` into `paths.manifest` / `paths.quarantine`.

    Record id = sha256 of the bytes. The first occurrence of some bytes becomes the record; each
    further copy adds its label to that record's `web_labels` and gets a `duplicate` quarantine
    row (`dup_of` = the record id). Every failure is a quarantine row with a reason. Incremental:
    `paths.ingest_state` remembers each listed entry (source, uri, label -> size, mtime_ns,
    offset, outcome); an unchanged entry is not read again, new records are appended (existing
    rows keep their order), and every new row carries `batch` = this round's number.
    """
    recovered = recover_files(paths.ingest_stage)   # a round killed mid-commit: finish it or drop it
    if recovered:
        log.warning("%s: an interrupted ingest round was %s", paths.root, recovered)
    records = load_manifest(paths.manifest)
    quarantine = load_quarantine(paths.quarantine)
    state = _load_state(paths.ingest_state)
    batch = 1 + max([r["batch"] for r in state.values()] + [r.batch for r in records] + [-1])
    report = IngestReport(batch=batch)
    notes: Counter = Counter()

    todo: list[Entry] = []
    for source in sources:
        for entry in iter_source(source, cfg, notes):
            report.seen += 1
            prev = state.get(entry.key)
            if prev is not None and (prev["size"], prev["mtime_ns"], prev["offset"]) == \
                    (entry.size, entry.mtime_ns, entry.offset):
                report.skipped_unchanged += 1
                continue
            todo.append(entry)
    report.sidecars, report.upstream_failed = notes["sidecars"], notes["upstream_failed"]

    by_id = {r.id: i for i, r in enumerate(records)}
    state_before = dict(state)
    quarantined: Counter = Counter()
    outcomes = _ordered_map(lambda e: _process(e, cfg), todo, workers)
    for out in tqdm(outcomes, total=len(todo), desc=f"ingest round {batch}", unit="img", leave=False):
        e = out.entry
        report.new += 1
        state[e.key] = dict(source=e.source, uri=e.uri, web_label=e.web_label, size=e.size,
                            mtime_ns=e.mtime_ns, offset=e.offset, outcome=out.reason or OK,
                            id=out.id, batch=batch)
        if out.reason:
            quarantine.append(QuarantineRow(uri=e.uri, source=e.source, reason=out.reason, detail=out.detail,
                                            id=out.id, web_label=e.web_label, batch=batch))
            quarantined[out.reason] += 1
            continue
        assert out.id is not None
        prev = state_before.get(e.key)
        if prev is not None and prev["outcome"] == OK and prev["id"] not in (None, out.id):
            log.warning("%s changed content since round %s; its old record %s stays in the manifest",
                        e.uri, prev["batch"], prev["id"][:12])
        if out.id in by_id:
            rep = records[by_id[out.id]]
            if e.web_label and e.web_label not in rep.web_labels:
                rep.web_labels.append(e.web_label)
            if (rep.source, rep.uri, rep.web_label or "") == e.key:   # the same entry re-read
                rep.container = path_to_uri(e.container) if e.container else None
                rep.offset, rep.length = e.offset, e.size
                report.refreshed += 1
                continue
            quarantine.append(QuarantineRow(uri=e.uri, source=e.source, reason=DUPLICATE,
                                            detail=f"same bytes as {rep.uri}", id=out.id,
                                            web_label=e.web_label, dup_of=rep.id, batch=batch))
            quarantined[DUPLICATE] += 1
            report.duplicates += 1
            state[e.key]["outcome"] = DUPLICATE
            continue
        by_id[out.id] = len(records)
        records.append(Record(
            id=out.id, uri=e.uri, source=e.source, web_label=e.web_label,
            web_labels=[e.web_label] if e.web_label else [], caption=e.caption, url=e.url,
            container=path_to_uri(e.container) if e.container else None, offset=e.offset, length=e.size, width=out.width, height=out.height,
            format=out.format, mode=out.mode, status=OK, batch=batch))
        report.kept += 1

    if todo or not (paths.manifest.exists() and paths.ingest_state.exists()):  # nothing read: nothing to write
        # one commit for the round's three files: a kill leaves all old or all new (recover_files)
        commit_files(paths.ingest_stage, [(paths.manifest, lambda p: save_manifest(p, records)),
                                          (paths.quarantine, lambda p: save_quarantine(p, quarantine)),
                                          (paths.ingest_state, lambda p: _save_state(p, state))])
    report.quarantined = dict(quarantined)
    report.total_records, report.total_quarantined = len(records), len(quarantine)
    log.info("ingest round %d: listed %d, kept %d, quarantined %d; %d manifest rows", batch, report.seen, report.kept, report.n_quarantined, report.total_records)  # the CLI prints the table
    return report
