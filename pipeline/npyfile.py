"""Cache arrays on disk that are checked before they are used: `.npy` files written with
ordinary buffered writes, a crc32 per 4 MiB block of their data kept in the cache's sidecar
JSON, and verified when the cache is loaded.

A memory-mapped write into a full disk dies of SIGBUS with no message; `NpyWriter` writes rows in
order through a plain file object, so a full disk is an `OSError` that `storage.atomic_path`
turns into one "disk full" line (and the free space is checked before the write starts). A byte
changed on disk (same size, a bad sector, a stray tool) is found by `verify_npy`, which names the
first damaged block and the first row it touches, so a row-aligned cache rebuilds from that row
on (the rows before it are intact). crc32 of the 184 MB pixel cache of 60k 32x32 images takes
about 0.15 s on one core (zlib, blocks read from the page cache), so every load verifies.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 1 << 22        # bytes of array data per checksum


class NpyWriter:
    """Write an `.npy` file of a known shape and dtype row-block by row-block (`write`), computing
    a crc32 per BLOCK bytes of data; `checks()` is what the sidecar stores."""

    def __init__(self, fh, shape: tuple[int, ...], dtype: Any):
        self.fh, self.shape, self.dtype = fh, tuple(int(s) for s in shape), np.dtype(dtype)
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                  "fortran_order": False, "shape": self.shape})
        self.offset = fh.tell()
        self.total = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.done = 0
        self.crcs: list[int] = []
        self._crc = 0
        self._in_block = 0

    def write(self, rows: np.ndarray) -> None:
        a = np.ascontiguousarray(rows, dtype=self.dtype)
        if a.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows of shape {a.shape[1:]}, file rows are {self.shape[1:]}")
        buf = memoryview(a).cast("B")
        if self.done + len(buf) > self.total:
            raise ValueError(f"writing past the {self.shape[0]} rows of the file")
        self.fh.write(buf)
        self.done += len(buf)
        pos = 0
        while pos < len(buf):
            take = min(BLOCK - self._in_block, len(buf) - pos)
            self._crc = zlib.crc32(buf[pos:pos + take], self._crc)
            self._in_block += take
            pos += take
            if self._in_block == BLOCK:
                self.crcs.append(self._crc)
                self._crc, self._in_block = 0, 0

    def checks(self) -> dict[str, Any]:
        if self.done != self.total:
            raise ValueError(f"{self.done} of {self.total} bytes written")
        crcs = self.crcs + ([self._crc] if self._in_block else [])
        self.fh.flush()
        return {"algo": "crc32", "block": BLOCK, "offset": self.offset, "bytes": self.total, "crc": crcs}


def npy_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of an `.npy` file of this shape (header + data): what a write needs free."""
    return 128 + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclass
class Damage:
    """Why a cache file does not match its checksums, and the rows that may be damaged."""

    path: Path
    why: str
    bad_rows: np.ndarray          # int64, sorted: rows touched by a damaged block (every row if unknown)

    @property
    def first_row(self) -> int:
        return int(self.bad_rows[0]) if len(self.bad_rows) else 0

    def __str__(self) -> str:
        return f"{self.path.name}: {self.why}"


def verify_npy(path: str | Path, checks: Any, rows: int) -> Damage | None:
    """None when the data of the `.npy` at `path` (`rows` rows) matches `checks` (from
    `NpyWriter.checks`), else the `Damage` with the rows of every damaged block. Missing or
    malformed checks, or a file of another size, are damage to every row (a cache written by an
    older webkd, a truncated file)."""
    path = Path(path)
    every = np.arange(rows, dtype=np.int64)
    if not isinstance(checks, dict) or checks.get("algo") != "crc32" or not isinstance(checks.get("crc"), list):
        return Damage(path, "no checksums (written by an older webkd)", every)
    try:
        size = path.stat().st_size
        block, offset, total, crcs = int(checks["block"]), int(checks["offset"]), int(checks["bytes"]), checks["crc"]
        if size != offset + total or len(crcs) != -(-total // block):
            return Damage(path, f"{size} bytes on disk, {offset + total} written", every)
        row_bytes = total // rows if rows else 1
        bad: list[int] = []
        buf = bytearray(block)
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            for b, want in enumerate(crcs):
                n = fh.readinto(buf)
                if zlib.crc32(memoryview(buf)[:n]) != want:
                    bad.append(b)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Damage(path, f"cannot be checked ({type(exc).__name__}: {exc})", every)
    if not bad:
        return None
    hit = np.unique(np.concatenate([np.arange(b * block // row_bytes, min(rows, -(-(b + 1) * block // row_bytes)))
                                    for b in bad])).astype(np.int64)
    return Damage(path, f"{len(bad)} of {len(crcs)} blocks do not match their checksums (rows {hit[0]}-{hit[-1]})",
                  hit)


def read_sidecar(path: str | Path, what: str) -> dict[str, Any] | None:
    """A cache's sidecar JSON, or None when absent; a damaged one (truncated, not an object) is
    None too, with one warning line: the cache it describes is rebuilt."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        log.warning("%s: sidecar %s is damaged (%s): rebuilding the cache", what, path, type(exc).__name__)
        return None
    if not isinstance(meta, dict):
        log.warning("%s: sidecar %s is not a JSON object: rebuilding the cache", what, path)
        return None
    return meta
