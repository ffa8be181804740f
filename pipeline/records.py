"""Record schema and manifest I/O (Parquet).

A record is one distinct image (id = sha256 of its bytes, as img2dataset and DataComp do). The
manifest's row index joins every row-aligned array of the run (features, logits, pixel cache,
ledger). Rows are only ever appended (incremental ingest) or updated in place (extra labels of
an exact duplicate, a near-duplicate status), never reordered or removed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote, unquote_to_bytes

import pyarrow as pa
import pyarrow.parquet as pq

from webkd.pipeline.report import printable
from webkd.pipeline.storage import atomic_write_table

# --------------------------------------------------------------------------------------------
# reason codes: the one home of every code a manifest status, a quarantine row or a ledger row
# carries (ARCHITECTURE.md lists them); every module compares against these names.
# --------------------------------------------------------------------------------------------
OK = "ok"
DUPLICATE = "duplicate"              # quarantine: same bytes as an earlier record
NEAR_DUPLICATE = "near_duplicate"    # manifest status + quarantine (index stage) + ledger reason
SOURCE_MISSING = "source_missing"    # manifest status + quarantine (pixel stage) + ledger reason
EVAL_DUPLICATE = "eval_duplicate"    # manifest status + quarantine (decontamination, pipeline/decontam.py)

# Quarantine reasons (`Rejected` at ingest, `duplicate`, the index stage's `near_duplicate`, the pixel
# stage's `source_missing` and the decontamination stage's `eval_duplicate`); a manifest row's status is
# OK, NEAR_DUPLICATE, SOURCE_MISSING or EVAL_DUPLICATE (a non-ok row is never a training candidate and
# never a scored validation row).
REASONS = {
    "not_found": "file listed but missing",
    "unreadable": "file exists but cannot be read (permissions, I/O error)",
    "empty": "zero bytes",
    "too_large": "file larger than ingest.max_bytes",
    "not_an_image": "bytes are not an image (HTML, text, a sidecar without its image, ...)",
    "unsupported_format": "an image format this build cannot decode (SVG, AVIF/HEIC/JPEG XL without a plugin)",
    "not_a_file": "listed entry is not a regular file (FIFO, socket, device)",
    "truncated": "image data ends early or is corrupt",
    "bomb": "pixel count above the decompression-bomb limit",
    "too_small": "a side below ingest.min_side",
    "unsupported_mode": "pixel mode that cannot be converted to RGB faithfully",
    "unsafe_path": "path escapes its root (.., absolute, link outside)",
    "bad_row": "manifest row without a usable path (empty, NUL byte, invalid UTF-8, ragged)",
    DUPLICATE: "same bytes as an earlier record (labels merged into it)",
    NEAR_DUPLICATE: "embedding cosine above the threshold to a kept representative",
    SOURCE_MISSING: "file gone or changed since ingest: its pixels are unknown, it is not trained on",
    EVAL_DUPLICATE: "exact or near duplicate of an evaluation image (data.decontaminate / decontam.test_source)",
}
# Reasons of a quarantine row written at ingest (not the later stages' near_duplicate / source_missing /
# eval_duplicate: those rows stay in the manifest, with that status).
INGEST_REASONS = tuple(r for r in REASONS if r not in (NEAR_DUPLICATE, SOURCE_MISSING, EVAL_DUPLICATE))

# Ledger reasons (selection/policy.py, selection/overrides.py): why a row is kept or not.
SELECTED = "selected"
NO_SELECTION = "no_selection"        # selection.mode=none: every candidate kept, nothing was decided
FALLBACK = "fallback"
OVERRIDE = "override"                # forced keep or forced reject (the overrides store)
LOW_CONFIDENCE = "low_confidence"
BELOW_CLASS_THRESHOLD = "below_class_threshold"
OFF_CLASS = "off_class"
KNN_DISAGREE = "knn_disagree"
VALIDATION = "validation"            # held-out validation row: never trained on, never "rejected"
NOT_SAMPLED = "not_sampled"          # selection.mode=random: outside the seeded random subset
BELOW_BUDGET = "below_budget"        # selection.mode=balanced: outside its pseudo-class's relevance budget
LOW_RELEVANCE = "low_relevance"      # selection.mode=soft: outside the budget share, still trained, down-weighted
KEEP_REASONS = (SELECTED, NO_SELECTION, FALLBACK, OVERRIDE)
REJECT_REASONS = (LOW_CONFIDENCE, BELOW_CLASS_THRESHOLD, OFF_CLASS, KNN_DISAGREE, NOT_SAMPLED, BELOW_BUDGET,
                  LOW_RELEVANCE, OVERRIDE, NEAR_DUPLICATE, VALIDATION)
# every ledger reason with a line of help, in display order (the gallery, `webkd inspect`)
LEDGER_REASONS = {
    SELECTED: "kept: teacher+student confidence above the class threshold",
    NO_SELECTION: "kept: selection is off (selection.mode=none), every candidate trains",
    FALLBACK: "kept: the selection came out empty, previous/all kept instead",
    OVERRIDE: "forced by a human override (accept keeps, reject rejects)",
    BELOW_CLASS_THRESHOLD: "confidence below its class threshold",
    LOW_CONFIDENCE: "confidence below the global cut",
    KNN_DISAGREE: "too few k-NN neighbours share its pseudo-label",
    NOT_SAMPLED: "outside the random subset (selection.mode=random, a baseline)",
    BELOW_BUDGET: "relevance below its pseudo-class's budget (selection.mode=balanced)",
    LOW_RELEVANCE: "relevance outside the budget share: trained at its lower weight (selection.mode=soft)",
    OFF_CLASS: "web query maps to no teacher class / outside the teacher top-2",
    NEAR_DUPLICATE: "near duplicate of a kept representative",
    VALIDATION: "held-out validation row, never trained on",
}


# --------------------------------------------------------------------------------------------
# uri text: every path the manifest, quarantine and state store is valid, printable UTF-8
# --------------------------------------------------------------------------------------------
_PLAIN = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]*")   # no control chars, no undecodable bytes
FILE_URI = "file://"


def path_to_uri(path: str) -> str:
    """A file system path as the text a Record / QuarantineRow stores, losslessly.

    A path that is printable UTF-8 is stored as it is. One with bytes that are not UTF-8 (which
    `os.fsdecode` carries as surrogates, and Parquet cannot store) or with control characters
    (NUL, ESC, newline) becomes `file://` + its percent-encoded bytes, e.g. `/w/caf\xe9.jpg` ->
    `file:///w/caf%E9.jpg`; `uri_to_path` turns it back into the exact bytes. Plain stored paths
    are absolute, so they never start with `file://`: the two forms cannot be confused.
    """
    if _PLAIN.fullmatch(path):
        return path
    return FILE_URI + quote(os.fsencode(path), safe="/")


def uri_to_path(uri: str) -> str:
    """The file system path (str, undecodable bytes as surrogates) of a stored uri."""
    if uri.startswith(FILE_URI):
        return os.fsdecode(unquote_to_bytes(uri[len(FILE_URI):]))
    return uri


def name_to_text(name: str) -> str:
    """A file or folder name as label text: undecodable bytes as `\\xNN`, control characters
    escaped (a folder named with invalid UTF-8 is still a web query; its uri keeps the bytes)."""
    if _PLAIN.fullmatch(name):
        return name
    return printable(os.fsencode(name).decode("utf-8", "backslashreplace"))


@dataclass(slots=True)
class Record:
    id: str                                  # sha256 hex of the file bytes
    uri: str                                 # file path, or "<tar>/<member>" for shard members
    source: str                              # the source spec it came from (folder:..., ...)
    web_label: str | None = None             # the web query of the first occurrence
    web_labels: list[str] = field(default_factory=list)  # every query it was found under
    caption: str | None = None
    url: str | None = None
    container: str | None = None             # tar shard path for shard members
    offset: int = -1                         # byte offset of the member data in the shard
    length: int = -1                         # byte length (file size)
    width: int = 0                           # after EXIF transpose
    height: int = 0
    format: str = ""                         # JPEG, PNG, ...
    mode: str = ""                           # original Pillow mode
    status: str = OK
    dup_of: str | None = None                # representative id for near duplicates
    batch: int = 0                           # ingest round that added it


@dataclass
class QuarantineRow:
    uri: str
    source: str
    reason: str
    detail: str = ""
    id: str | None = None
    web_label: str | None = None
    dup_of: str | None = None
    batch: int = 0


RECORD_SCHEMA = pa.schema([
    ("id", pa.string()), ("uri", pa.string()), ("source", pa.string()),
    ("web_label", pa.string()), ("web_labels", pa.list_(pa.string())),
    ("caption", pa.string()), ("url", pa.string()),
    ("container", pa.string()), ("offset", pa.int64()), ("length", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()), ("mode", pa.string()),
    ("status", pa.string()), ("dup_of", pa.string()), ("batch", pa.int32()),
])

QUARANTINE_SCHEMA = pa.schema([
    ("uri", pa.string()), ("source", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("id", pa.string()), ("web_label", pa.string()), ("dup_of", pa.string()), ("batch", pa.int32()),
])


def _to_table(rows: Iterable[Any], schema: pa.Schema, cls: type) -> pa.Table:
    names = [f.name for f in fields(cls)]
    rows = list(rows)
    # attribute reads, not dataclasses.asdict (a recursive deep copy: most of the time at 1M rows)
    cols = {n: [r.get(n) if isinstance(r, dict) else getattr(r, n) for r in rows] for n in names}
    return pa.table(cols, schema=schema)


def records_to_table(records: Iterable[Record]) -> pa.Table:
    return _to_table(records, RECORD_SCHEMA, Record)


def quarantine_to_table(rows: Iterable[QuarantineRow]) -> pa.Table:
    return _to_table(rows, QUARANTINE_SCHEMA, QuarantineRow)


def save_manifest(path: str | Path, records: Iterable[Record]) -> None:
    atomic_write_table(path, records_to_table(records))


def load_manifest(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        return []
    table = pq.read_table(path, schema=RECORD_SCHEMA)
    cols: dict[str, list] = {}       # column lists (no dict per row held at once), the Arrow table dropped before
    labels: dict[str, str] = {}      # the Records are made: at 1.1M rows 2.1 -> 1.6 GB held, 2.2 -> 1.6 GB peak
    for name in table.column_names:
        vals = table.column(name).to_pylist()
        if name in _SHARED_COLUMNS:  # one str object per distinct value, not one per row (immutable: safe to share)
            seen = labels if name == "web_label" else {}
            vals = [v if v is None else seen.setdefault(v, v) for v in vals]
        elif name == "web_labels":   # the labels inside each row's own (mutable) list too
            vals = [None if ls is None else [labels.setdefault(x, x) for x in ls] for ls in vals]
        cols[name] = vals
    del table
    names = list(cols)
    return [Record(**dict(zip(names, vals))) for vals in zip(*cols.values())]


# columns with few distinct values: a 1M-row manifest of 100 tar shards has 1-2 sources, ~200 web
# queries, 100 containers, a handful of formats, modes and statuses
_SHARED_COLUMNS = ("source", "web_label", "container", "format", "mode", "status")


def save_quarantine(path: str | Path, rows: Iterable[QuarantineRow]) -> None:
    atomic_write_table(path, quarantine_to_table(rows))


def load_quarantine(path: str | Path) -> list[QuarantineRow]:
    path = Path(path)
    if not path.exists():
        return []
    return [QuarantineRow(**row) for row in pq.read_table(path, schema=QUARANTINE_SCHEMA).to_pylist()]


def read_bytes(record: Record) -> bytes:
    """The original bytes of a record: a plain file, or a member of a tar shard by offset."""
    if record.container:
        with open(uri_to_path(record.container), "rb") as fh:
            fh.seek(record.offset)
            return fh.read(record.length)
    return Path(uri_to_path(record.uri)).read_bytes()


def class_index(records: list[Record], classes: list[str], label_map: dict[str, str | None]) -> list[int]:
    """Web query -> class index of the teacher (-1 for off-class queries)."""
    lookup = {c: i for i, c in enumerate(classes)}
    out = []
    for r in records:
        q = r.web_label
        name = label_map.get(q, q) if q is not None else None
        out.append(lookup.get(name, -1) if name is not None else -1)
    return out
