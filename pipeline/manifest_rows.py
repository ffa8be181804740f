"""The rows of a user's CSV or Parquet manifest (`manifest:` sources), one bad row at a time.

`csv_rows` / `parquet_rows` yield `(where, values, why)` per data row: `values` maps the asked
columns to text (None when empty), or is None for a bad row with `why` (invalid UTF-8, a
wrong number of fields, an unparsable field) and `where` names it ("row 3 (line 5)"). A
manifest that cannot be read at all (no header, no path column, not Parquet) raises
`BadManifest`. `pipeline.sources` turns the rows into entries; pyarrow is imported only for
Parquet.
"""
from __future__ import annotations

import csv
import math
from typing import Any, Iterator


class BadManifest(Exception):
    """The manifest as a whole cannot be read (no header, no path column, unreadable file)."""


def str_or_none(v: Any) -> str | None:
    """A cell as stripped text; None for a null, a NaN or an empty string."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip()
    return s or None


def cell_text(v: Any) -> str | None:
    """A cell as text; bytes are decoded as UTF-8 with undecodable bytes kept as surrogates."""
    if isinstance(v, (bytes, bytearray)):
        v = bytes(v).decode("utf-8", "surrogateescape")
    return str_or_none(v)


def csv_rows(path: str, cols: list[str], path_column: str) -> Iterator[tuple[str, dict | None, str]]:
    """(where, {column: text}, "") per data row of a CSV, or (where, None, why) for a bad row.

    Python's csv reader on the bytes decoded with surrogateescape, so one row with invalid UTF-8,
    a wrong number of fields or an unparsable field is one bad row (named by its line), and the
    other rows are read. Blank lines are not rows.
    """
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise BadManifest(f"header line: {exc}") from None
        if not header:
            raise BadManifest("empty file (no header line)")
        header = [h.strip() for h in header]
        header[0] = header[0].lstrip("\ufeff")
        if any(has_surrogates(h) for h in header):
            raise BadManifest("the header line is not valid UTF-8")
        if path_column not in header:
            raise BadManifest(f"no column {path_column!r} (columns: {', '.join(header)})")
        at = {c: header.index(c) for c in cols if c in header}
        i = 0
        while True:
            where = f"row {i} (line {reader.line_num + 1})"
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield where, None, f"unparsable CSV: {exc}"
                i += 1
                continue
            if not row:
                continue
            i += 1
            if len(row) != len(header):
                yield where, None, f"{len(row)} fields, the header has {len(header)}"
            elif any(has_surrogates(v) for v in row):
                yield where, None, "not valid UTF-8 text"
            else:
                yield where, {c: str_or_none(row[k]) for c, k in at.items()}, ""


def parquet_rows(path: str, cols: list[str], path_column: str) -> Iterator[tuple[str, dict | None, str]]:
    """(where, {column: text}, "") per row of a Parquet manifest, (where, None, why) for a bad one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise BadManifest(f"cannot read Parquet: {exc}") from None
    if path_column not in table.column_names:
        raise BadManifest(f"no column {path_column!r} (columns: {', '.join(table.column_names)})")
    get = {}
    for c in cols:
        if c in table.column_names:
            col = table.column(c)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                col = col.cast(pa.large_binary())            # decoded per row: one bad cell, one bad row
            get[c] = col.to_pylist()
    for i in range(table.num_rows):
        vals = {c: cell_text(v[i]) for c, v in get.items()}
        if any(v is not None and has_surrogates(v) for v in vals.values()):
            yield f"row {i}", None, "not valid UTF-8 text"
        else:
            yield f"row {i}", vals, ""


def has_surrogates(s: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in s)


