"""Sources: list the images of one web source, chosen by prefix, before reading any bytes.

`iter_source(spec, cfg)` dispatches on the prefix (timm's reader-factory pattern) and yields
`Entry`s: a readable file or tar member with its web label / caption / url, or a listing failure
(`Entry.error = (reason, detail)`) that ingest turns into a quarantine row.

    folder:DIR          DIR/<query>/.../*.jpg, the query folder name is the web label
    manifest:FILE       CSV or Parquet, one row per image, paths relative to FILE's folder
    wds:SHARDS          img2dataset-style uncompressed tar shards (brace ranges allowed)

Path safety lives here, where paths enter: absolute paths, `..` that climbs out, symlinks that
resolve outside the source root and link members in tars are `unsafe_path`. Each backend
(pyarrow for manifests, tarfile/braceexpand for shards) is imported only in its own branch.
Reading and decoding the bytes is `pipeline.ingest`'s job.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from webkd.pipeline.config import IngestConfig

log = logging.getLogger(__name__)



@dataclass
class Entry:
    """One listed image (or a listing failure), before any image bytes are read."""

    uri: str                                  # absolute file path, or "<shard>/<member>"
    source: str                               # the source spec it was listed from
    web_label: str | None = None
    caption: str | None = None
    url: str | None = None
    path: str | None = None                   # plain file to read
    container: str | None = None              # tar shard holding the bytes
    offset: int = -1                          # member data offset in the shard
    size: int = -1                            # bytes (file size or member size)
    mtime_ns: int = -1
    error: tuple[str, str] | None = None      # (reason, detail) decided while listing

    @property
    def key(self) -> tuple[str, str, str]:
        """Incremental-state key: the same file under another source or label is its own entry."""
        return (self.source, self.uri, self.web_label or "")


def _within(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _unsafe_relpath(rel: str, any_dotdot: bool) -> str | None:
    """Why a relative path is refused, or None. Absolute paths always are; with `any_dotdot`
    (tar members) any `..` component is, else (manifests) only a `..` that climbs out."""
    if rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive:
        return f"absolute path {rel!r}"
    posix = rel.replace("\\", "/")
    if any_dotdot and ".." in PurePosixPath(posix).parts:
        return f"path {rel!r} contains '..'"
    norm = os.path.normpath(posix)
    if norm == ".." or norm.startswith("../"):
        return f"path {rel!r} climbs out of its root with '..'"
    return None


def _file_entry(path: str, source: str, **meta: Any) -> Entry:
    """Stat one listed path: a regular file becomes a readable entry, anything else an error."""
    try:
        st = os.stat(path)                                   # follows symlinks
    except FileNotFoundError:
        kind = "dangling symlink" if os.path.islink(path) else "missing file"
        return Entry(uri=path, source=source, error=("not_found", kind), **meta)
    except OSError as exc:
        return Entry(uri=path, source=source, error=("unreadable", f"stat: {exc}"), **meta)
    if stat.S_ISDIR(st.st_mode):
        return Entry(uri=path, source=source, error=("unreadable", "is a directory"), **meta)
    if not stat.S_ISREG(st.st_mode):                         # FIFO, socket, device: never opened
        return Entry(uri=path, source=source, error=("unreadable", "not a regular file"), **meta)
    return Entry(uri=path, source=source, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns, **meta)


def _iter_folder(source: str, folder: str, cfg: IngestConfig, notes: Counter) -> Iterator[Entry]:
    """`folder:DIR`: DIR/<query>/.../*.jpg gets web label <query>; files directly in DIR none.

    Symlinks are followed only while they resolve inside DIR (else `unsafe_path`); a folder
    with an image extension (`x.jpg/`) or a FIFO is `unreadable`; files without an image
    extension and hidden files are counted as ignored, not read.
    """
    root = os.path.abspath(folder)
    if not os.path.isdir(root):
        yield Entry(uri=root, source=source, error=("not_found", "source folder does not exist"))
        return
    real_root = os.path.realpath(root)
    exts = {e.lower() for e in cfg.extensions}
    seen_dirs: set[str] = set()

    def walk(d: str, label: str | None, top: bool) -> Iterator[Entry]:
        real_d = os.path.realpath(d)
        if real_d in seen_dirs:                              # symlink loop / second route in
            return
        seen_dirs.add(real_d)
        try:
            names = sorted(os.listdir(d))
        except OSError as exc:
            yield Entry(uri=d, source=source, web_label=label, error=("unreadable", f"list: {exc}"))
            return
        for name in names:
            p = os.path.join(d, name)
            has_ext = os.path.splitext(name)[1].lower() in exts
            if name.startswith("."):
                notes["ignored"] += 1
                continue
            if os.path.islink(p) and not _within(os.path.realpath(p), real_root):
                yield Entry(uri=p, source=source, web_label=label,
                            error=("unsafe_path", f"symlink resolves outside {root}"))
                continue
            if os.path.isdir(p) and not has_ext:
                yield from walk(p, name if top else label, top=False)
            elif has_ext:
                yield _file_entry(p, source, web_label=label)
            else:
                notes["ignored"] += 1

    yield from walk(root, None, top=True)


def _str_or_none(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    s = str(v).strip()
    return s or None


def _read_table(path: str, columns: list[str]) -> Any:
    """A CSV or Parquet file as a pyarrow Table (CSV columns named in `columns` kept as text)."""
    import pyarrow as pa

    if path.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in columns}, strings_can_be_null=True))
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _iter_manifest(source: str, file: str, cfg: IngestConfig, notes: Counter) -> Iterator[Entry]:
    """`manifest:FILE.csv|.parquet`: one row per image, path relative to the manifest's folder.

    A path that is absolute, climbs out with `..` or resolves (symlink) outside the folder is
    `unsafe_path`; a row with no path is `bad_row`.
    """
    mpath = os.path.abspath(file)
    if not os.path.isfile(mpath):
        yield Entry(uri=mpath, source=source, error=("not_found", "manifest file does not exist"))
        return
    if not mpath.lower().endswith((".csv", ".parquet", ".pq")):
        yield Entry(uri=mpath, source=source, error=("bad_row", "manifest must be .csv or .parquet"))
        return
    cols = [cfg.path_column, cfg.label_column, cfg.caption_column, cfg.url_column]
    try:
        table = _read_table(mpath, cols)
    except Exception as exc:
        yield Entry(uri=mpath, source=source, error=("bad_row", f"cannot read manifest: {exc}"))
        return
    if cfg.path_column not in table.column_names:
        yield Entry(uri=mpath, source=source, error=(
            "bad_row", f"no column {cfg.path_column!r} (columns: {', '.join(table.column_names)})"))
        return
    base = os.path.dirname(mpath)
    real_base = os.path.realpath(base)
    get = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows)
           for c in cols}
    for i in range(table.num_rows):
        meta = dict(web_label=_str_or_none(get[cfg.label_column][i]),
                    caption=_str_or_none(get[cfg.caption_column][i]),
                    url=_str_or_none(get[cfg.url_column][i]))
        rel = _str_or_none(get[cfg.path_column][i])
        if rel is None:
            yield Entry(uri=f"{mpath}#row{i}", source=source, error=("bad_row", f"row {i}: no {cfg.path_column}"), **meta)
            continue
        why = _unsafe_relpath(rel, any_dotdot=False)
        full = os.path.normpath(os.path.join(base, rel))
        if why is None and not _within(os.path.realpath(full), real_base):
            why = f"{rel!r} resolves outside the manifest folder"
        if why:
            yield Entry(uri=rel, source=source, error=("unsafe_path", f"row {i}: {why}"), **meta)
            continue
        yield _file_entry(full, source, **meta)


_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")        # webdataset's key/extension split


def _shard_metadata(shard: str, cfg: IngestConfig, notes: Counter) -> dict[str, dict[str, Any]]:
    """img2dataset's per-shard Parquet (`00000.tar` -> `00000.parquet`): key -> row."""
    pq_path = os.path.splitext(shard)[0] + ".parquet"
    if not os.path.isfile(pq_path):
        return {}
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(pq_path).to_pylist()
    except Exception as exc:
        log.warning("%s: unreadable shard metadata (%s); using members' .txt/.json only", pq_path, exc)
        return {}
    out = {}
    for row in rows:
        key = _str_or_none(row.get("key"))
        if key is None:
            continue
        if row.get("status") not in (None, "success"):
            notes["upstream_failed"] += 1                    # a failed download: no member exists
        out[key] = row
    return out


def _iter_wds(source: str, pattern: str, cfg: IngestConfig, notes: Counter) -> Iterator[Entry]:
    """`wds:SHARDS`: img2dataset-style tar shards, brace ranges (`{00000..00009}.tar`) allowed.

    Members `<key>.jpg|png|webp|...` are images; `<key>.txt` is the caption and `<key>.json`
    the metadata; the per-shard `<shard>.parquet` (key, url, caption, status, label column)
    wins over both. Offsets come from Python's `tarfile` (`TarInfo.offset_data`, `size`), so
    `Record.container/offset/length` let later stages read a member by one seek, without
    scanning the tar. Only uncompressed tars qualify (byte offsets must be file offsets).
    Member names that are absolute or contain `..`, and link members, are `unsafe_path`.
    """
    import tarfile

    from braceexpand import braceexpand

    shards = list(braceexpand(pattern))
    if len(shards) == 1 and os.path.isdir(shards[0]):
        shards = sorted(os.path.join(shards[0], n) for n in os.listdir(shards[0]) if n.endswith(".tar"))
    exts = {e.lower() for e in cfg.extensions}
    for shard in shards:
        shard = os.path.abspath(shard)
        if not os.path.isfile(shard):
            yield Entry(uri=shard, source=source, error=("not_found", "shard does not exist"))
            continue
        meta = _shard_metadata(shard, cfg, notes)
        shard_size = os.path.getsize(shard)
        members, texts = [], {}
        try:
            with tarfile.open(shard, mode="r:") as tf:
                for m in tf:
                    members.append(m)
                    km = _WDS_KEY.match(m.name)
                    if km and m.isreg() and km.group(2).lower() in ("txt", "json") \
                            and m.offset_data + m.size <= shard_size and _unsafe_relpath(m.name, any_dotdot=True) is None:
                        fh = tf.extractfile(m)
                        texts[(km.group(1), km.group(2).lower())] = fh.read().decode("utf-8", "replace") if fh else ""
        except (tarfile.TarError, OSError, EOFError) as exc:
            if not members:
                yield Entry(uri=shard, source=source, error=("unreadable", f"not a plain tar shard: {exc}"))
                continue
            log.warning("%s: tar ends early (%s); keeping the %d members before it", shard, exc, len(members))
        for m in members:
            uri = f"{shard}/{m.name}"
            km = _WDS_KEY.match(m.name)
            key, ext = (km.group(1), km.group(2).lower()) if km else (m.name, "")
            if not (m.isreg() or m.issym() or m.islnk()):
                continue                                     # directory entries
            why = _unsafe_relpath(m.name, any_dotdot=True)
            if why is None and not m.isreg():
                why = "link member"
            if why is not None:
                yield Entry(uri=uri, source=source, error=("unsafe_path", f"tar member: {why}"))
                continue
            if "." + ext not in exts:
                if ext not in ("txt", "json"):
                    notes["ignored"] += 1
                continue
            row = meta.get(PurePosixPath(key).name, meta.get(key, {}))
            info: dict[str, Any] = {}
            if (key, "json") in texts:
                try:
                    info = json.loads(texts[(key, "json")]) or {}
                except ValueError:
                    info = {}
            label = _str_or_none(row.get(cfg.label_column)) or _str_or_none(info.get(cfg.label_column))
            caption = (_str_or_none(row.get(cfg.caption_column)) or _str_or_none(texts.get((key, "txt")))
                       or _str_or_none(info.get(cfg.caption_column)))
            url = _str_or_none(row.get(cfg.url_column)) or _str_or_none(info.get(cfg.url_column))
            e = Entry(uri=uri, source=source, web_label=label, caption=caption, url=url, container=shard,
                      offset=m.offset_data, size=m.size, mtime_ns=int(m.mtime) * 10**9)
            if m.offset_data + m.size > shard_size:
                e.error = ("truncated", "member data runs past the end of the shard")
            yield e


def iter_source(source: str, cfg: IngestConfig, notes: Counter | None = None) -> Iterator[Entry]:
    """List one source by its prefix; each backend is imported only in its own branch."""
    notes = notes if notes is not None else Counter()
    prefix, sep, rest = source.partition(":")
    if not sep or not rest:
        raise ValueError(f"source {source!r} must look like folder:DIR, manifest:FILE or wds:SHARDS")
    if prefix == "folder":
        return _iter_folder(source, rest, cfg, notes)
    if prefix == "manifest":
        return _iter_manifest(source, rest, cfg, notes)
    if prefix == "wds":
        return _iter_wds(source, rest, cfg, notes)
    raise ValueError(f"source {source!r}: unknown prefix {prefix!r} (use folder:, manifest: or wds:)")
