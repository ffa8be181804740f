"""Decoding and validation of one image file's bytes (`decode_image`, `to_rgb`, `load_rgb`):
Pillow decode behind the decompression-bomb guard, full load so truncated data fails here and
not in a training batch, EXIF transpose, one conversion to 8-bit RGB. Every refusal is a
`Rejected` with a reason code from `pipeline.records.REASONS`. Ingest (`pipeline.ingest`, which
re-exports these names) and every later stage that re-reads an image decode through here.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from webkd.pipeline.config import IngestConfig
from webkd.pipeline.records import REASONS, Record, read_bytes

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
