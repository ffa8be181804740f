"""Sources: list the images of one web source, chosen by prefix, before reading any bytes.

`iter_source(spec, cfg)` dispatches on the prefix (timm's reader-factory pattern) and yields
`Entry`s: a readable file or tar member with its web label / caption / url, or a listing failure
(`Entry.error = (reason, detail)`) that ingest turns into a quarantine row.

    folder:DIR          DIR/<query>/.../*.jpg, the query folder name is the web label
    manifest:FILE       CSV or Parquet, one row per image, paths relative to FILE's folder
    wds:SHARDS          img2dataset-style uncompressed tar shards (brace ranges allowed)

Nothing is skipped by its name: every file of a folder (hidden ones, any or no extension) and
every tar member is listed, and ingest decides by content (Pillow) whether it is an image; only
a shard sample's own sidecars (`<key>.txt` / `.json` / `.cls` beside its image) are metadata,
not entries. Not-a-file entries (FIFO, device) are `not_a_file` and never opened.

Path safety lives here, where paths enter: absolute paths, `..` that climbs out, symlinks that
resolve outside the source root and link members in tars are `unsafe_path`. Names that are not
UTF-8 (or hold control characters) are kept, their uri stored losslessly (`records.path_to_uri`).
Each backend (pyarrow for Parquet manifests, tarfile/braceexpand for shards) is imported only in
its own branch. Reading and decoding the bytes is `pipeline.ingest`'s job.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from webkd.pipeline.config import IngestConfig
from webkd.pipeline.manifest_rows import BadManifest, csv_rows, parquet_rows, str_or_none
from webkd.pipeline.records import name_to_text, path_to_uri

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

    def __post_init__(self) -> None:
        self.uri = path_to_uri(self.uri)      # storable text; `path` / `container` keep the real name

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
    except (OSError, ValueError) as exc:                     # ENAMETOOLONG, ELOOP, a NUL byte
        return Entry(uri=path, source=source, error=("unreadable", f"stat: {exc}"), **meta)
    if not stat.S_ISREG(st.st_mode):                         # directory, FIFO, socket, device: never opened
        return Entry(uri=path, source=source, error=("not_a_file", _file_kind(st.st_mode)), **meta)
    return Entry(uri=path, source=source, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns, **meta)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"{kind}, not a regular file"
    return "not a regular file"


def _iter_folder(source: str, folder: str, cfg: IngestConfig, notes: Counter) -> Iterator[Entry]:
    """`folder:DIR`: DIR/<query>/.../<file> gets web label <query>; files directly in DIR none.

    Every file is listed, whatever its name (hidden, no or any extension): ingest decides by
    content. Symlinks are followed only while they resolve inside DIR (else `unsafe_path`); a
    FIFO, socket or device is `not_a_file`. The walk is iterative (a stack of folder listings),
    so any depth works; a folder reached twice (symlink loop) is listed once.
    """
    root = os.path.abspath(folder)
    if not os.path.isdir(root):
        yield Entry(uri=root, source=source, error=("not_found", "source folder does not exist"))
        return
    real_root = os.path.realpath(root)
    seen_dirs: set[tuple[int, int]] = set()

    def listing(d: str, label: str | None) -> Iterator[Entry | tuple[str, str | None]]:
        """The entries of one folder, in name order: files as Entry, sub-folders as (path, label)."""
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen_dirs:          # symlink loop / second route in
                return
            seen_dirs.add((st.st_dev, st.st_ino))
            names = sorted(os.listdir(d))
        except (OSError, ValueError) as exc:
            yield Entry(uri=d, source=source, web_label=label, error=("unreadable", f"list folder: {exc}"))
            return
        for name in names:
            p = os.path.join(d, name)
            if os.path.islink(p) and not _within(os.path.realpath(p), real_root):
                yield Entry(uri=p, source=source, web_label=label,
                            error=("unsafe_path", f"symlink resolves outside {root}"))
            elif os.path.isdir(p):
                yield (p, name_to_text(name) if d == root else label)
            else:
                yield _file_entry(p, source, web_label=label)

    stack = [listing(root, None)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, Entry):
            yield item
        else:
            stack.append(listing(*item))


def _iter_manifest(source: str, file: str, cfg: IngestConfig, notes: Counter) -> Iterator[Entry]:
    """`manifest:FILE.csv|.parquet`: one row per image, path relative to the manifest's folder.

    A path that is absolute, climbs out with `..` or resolves (symlink) outside the folder is
    `unsafe_path`; a row with no path, a NUL byte in it, invalid UTF-8 or (CSV) the wrong number
    of fields is `bad_row` (uri `<manifest>#row<i>`, the detail names the line); the other rows
    are read as usual.
    """
    mpath = os.path.abspath(file)
    if not os.path.isfile(mpath):
        yield Entry(uri=mpath, source=source, error=("not_found", "manifest file does not exist"))
        return
    if not mpath.lower().endswith((".csv", ".parquet", ".pq")):
        yield Entry(uri=mpath, source=source, error=("bad_row", "manifest must be .csv or .parquet"))
        return
    cols = [cfg.path_column, cfg.label_column, cfg.caption_column, cfg.url_column]
    read = csv_rows if mpath.lower().endswith(".csv") else parquet_rows
    base = os.path.dirname(mpath)
    real_base = os.path.realpath(base)
    rows = read(mpath, cols, cfg.path_column)
    i = -1
    while True:
        try:
            where, vals, why = next(rows)
        except StopIteration:
            return
        except (BadManifest, OSError, UnicodeError) as exc:
            yield Entry(uri=mpath, source=source, error=("bad_row", f"cannot read manifest: {exc}"))
            return
        i += 1
        if vals is None:
            yield Entry(uri=f"{mpath}#row{i}", source=source, error=("bad_row", f"{where}: {why}"))
            continue
        meta = dict(web_label=vals.get(cfg.label_column), caption=vals.get(cfg.caption_column),
                    url=vals.get(cfg.url_column))
        rel = vals.get(cfg.path_column)
        if rel is None or "\x00" in rel:
            why = f"no {cfg.path_column}" if rel is None else f"{cfg.path_column} {rel!r} holds a NUL byte"
            yield Entry(uri=f"{mpath}#row{i}", source=source, error=("bad_row", f"{where}: {why}"), **meta)
            continue
        why = _unsafe_relpath(rel, any_dotdot=False)
        full = os.path.normpath(os.path.join(base, rel))
        if why is None and not _within(os.path.realpath(full), real_base):
            why = f"{rel!r} resolves outside the manifest folder"
        if why:
            yield Entry(uri=rel, source=source, error=("unsafe_path", f"{where}: {why}"), **meta)
            continue
        yield _file_entry(full, source, **meta)


_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")        # webdataset's key/extension split
SIDECAR_EXTS = ("txt", "json", "cls")   # a shard sample's caption / metadata / class: not an image
_TAR_KINDS = {tarfile.FIFOTYPE: "a FIFO", tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device"}


def wds_key(name: str) -> tuple[str, str]:
    """(sample key, field) of a shard member as webdataset splits it: `d/a.b.jpg` -> (`d/a`, `b.jpg`);
    a name without a dot (or a hidden one) is its own key with field ''."""
    km = _WDS_KEY.match(name)
    return (km.group(1), km.group(2)) if km else (name, "")


def is_sidecar(field: str) -> bool:
    """A member field that is a sample's metadata (`txt`, `json`, `cls`, also `b.txt`), by name."""
    return field.rsplit(".", 1)[-1].lower() in SIDECAR_EXTS


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
        notes["unclean_listing"] += 1                        # list it again next round
        return {}
    out = {}
    for row in rows:
        key = str_or_none(row.get("key"))
        if key is None:
            continue
        if row.get("status") not in (None, "success"):
            notes["upstream_failed"] += 1                    # a failed download: no member exists
        out[key] = row
    return out


@dataclass
class ShardMemo:
    """The tar shards listed by the last ingest round, so that an unchanged shard is not opened
    again (listing parses every member header and reads every caption: ~0.2 ms an image).

    `known` / `listed`: "<source>\t<absolute shard path>" -> {"sig": the tar's and its Parquet's size and
    mtime and the listing settings, "entries": entries it listed, "sidecars", "upstream_failed"}.
    `plan_ingest` uses `known` only when the ingest state it was committed with is intact, so a
    skipped shard's entries are all in the state, unchanged."""

    known: dict[str, dict[str, Any]]
    listed: dict[str, dict[str, Any]] = field(default_factory=dict)   # this round's, written with the state
    skipped_entries: int = 0


def _shard_sig(shard: str, cfg: IngestConfig) -> list[Any]:
    pq_path = os.path.splitext(shard)[0] + ".parquet"
    st = os.stat(shard)
    pst = os.stat(pq_path) if os.path.isfile(pq_path) else None
    return [st.st_size, st.st_mtime_ns, pst.st_size if pst else None, pst.st_mtime_ns if pst else None,
            [cfg.label_column, cfg.caption_column, cfg.url_column]]


def _iter_wds(source: str, pattern: str, cfg: IngestConfig, notes: Counter,
              memo: ShardMemo | None = None) -> Iterator[Entry]:
    """`wds:SHARDS`: img2dataset-style tar shards, brace ranges (`{00000..00009}.tar`) allowed.

    Every regular member is an image candidate (decided by content: `a.b.jpg`, `noext` too),
    except a sample's sidecars: `<key>.txt` is the caption, `<key>.json` the metadata (`.cls`
    the class) of the image members with the same key; a sidecar with no such member is
    `not_an_image`, a FIFO or device member `not_a_file`; the per-shard `<shard>.parquet` (key, url, caption, status, label column)
    wins over both. Offsets come from Python's `tarfile` (`TarInfo.offset_data`, `size`), so
    `Record.container/offset/length` let later stages read a member by one seek, without
    scanning the tar. Only uncompressed tars qualify (byte offsets must be file offsets).
    Member names that are absolute or contain `..`, and link members, are `unsafe_path`.
    """
    from braceexpand import braceexpand

    shards = list(braceexpand(pattern))
    if len(shards) == 1 and os.path.isdir(shards[0]):
        shards = sorted(os.path.join(shards[0], n) for n in os.listdir(shards[0]) if n.endswith(".tar"))
    for shard in shards:
        shard = os.path.abspath(shard)
        if not os.path.isfile(shard):
            yield Entry(uri=shard, source=source, error=("not_found", "shard does not exist"))
            continue
        mkey = f"{source}\t{shard}"                                  # the same shard under another source: its own
        sig = _shard_sig(shard, cfg) if memo is not None else None
        prev = memo.known.get(mkey) if memo is not None else None
        if prev is not None and prev.get("sig") == sig:            # listed before, unchanged
            memo.listed[mkey] = prev
            memo.skipped_entries += int(prev["entries"])
            notes["sidecars"] += int(prev["sidecars"])
            notes["upstream_failed"] += int(prev["upstream_failed"])
            continue
        before = (notes["sidecars"], notes["upstream_failed"], notes["unclean_listing"])
        count = 0
        for e in _shard_entries(shard, source, cfg, notes):
            count += 1
            yield e
        # only a clean listing is remembered: an unreadable tar or Parquet, or a tar that ended
        # early, may be fixed without its size or mtime changing (permissions, a network mount)
        if memo is not None and notes["unclean_listing"] == before[2]:
            memo.listed[mkey] = {"sig": sig, "entries": count, "sidecars": notes["sidecars"] - before[0],
                                 "upstream_failed": notes["upstream_failed"] - before[1]}


def _shard_entries(shard: str, source: str, cfg: IngestConfig, notes: Counter) -> Iterator[Entry]:
    """The entries of one tar shard (see `_iter_wds`)."""
    meta = _shard_metadata(shard, cfg, notes)
    shard_size = os.path.getsize(shard)
    members, texts = [], {}
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for m in tf:
                members.append(m)
                key, fld = wds_key(m.name)
                if m.isreg() and fld.lower() in ("txt", "json") \
                        and m.offset_data + m.size <= shard_size and _unsafe_relpath(m.name, any_dotdot=True) is None:
                    fh = tf.extractfile(m)
                    texts[(key, fld.lower())] = fh.read().decode("utf-8", "replace") if fh else ""
    except (tarfile.TarError, OSError, EOFError) as exc:
        notes["unclean_listing"] += 1
        if not members:
            yield Entry(uri=shard, source=source, error=("unreadable", f"not a plain tar shard: {exc}"))
            return
        log.warning("%s: tar ends early (%s); keeping the %d members before it", shard, exc, len(members))
    samples = {wds_key(m.name)[0] for m in members if m.isreg() and not is_sidecar(wds_key(m.name)[1])}
    for m in members:
        if m.isdir():
            continue                                     # directory entries hold no bytes
        uri = f"{shard}/{m.name}"
        key, fld = wds_key(m.name)
        why = _unsafe_relpath(m.name, any_dotdot=True)
        if why is None and (m.issym() or m.islnk()):
            why = "link member"
        if why is not None:
            yield Entry(uri=uri, source=source, error=("unsafe_path", f"tar member: {why}"))
            continue
        if not m.isreg():                                # FIFO, device, unknown type: no bytes to read
            kind = _TAR_KINDS.get(m.type, f"of type {m.type!r}")
            yield Entry(uri=uri, source=source, error=("not_a_file", f"tar member is {kind}, not a regular file"))
            continue
        if is_sidecar(fld):
            if key in samples:                           # the caption / metadata of a sample
                notes["sidecars"] += 1
            else:
                yield Entry(uri=uri, source=source, error=(
                    "not_an_image", f"sidecar .{fld} with no image member for key {key!r}"))
            continue
        row = meta.get(PurePosixPath(key).name, meta.get(key, {}))
        info: dict[str, Any] = {}
        if (key, "json") in texts:
            try:
                info = json.loads(texts[(key, "json")]) or {}
            except (ValueError, RecursionError):
                info = {}
            if not isinstance(info, dict):
                info = {}
        label = str_or_none(row.get(cfg.label_column)) or str_or_none(info.get(cfg.label_column))
        caption = (str_or_none(row.get(cfg.caption_column)) or str_or_none(texts.get((key, "txt")))
                   or str_or_none(info.get(cfg.caption_column)))
        url = str_or_none(row.get(cfg.url_column)) or str_or_none(info.get(cfg.url_column))
        e = Entry(uri=uri, source=source, web_label=label, caption=caption, url=url, container=shard,
                  offset=m.offset_data, size=m.size, mtime_ns=int(m.mtime) * 10**9)
        if m.offset_data + m.size > shard_size:
            e.error = ("truncated", "member data runs past the end of the shard")
        yield e


def iter_source(source: str, cfg: IngestConfig, notes: Counter | None = None,
                memo: ShardMemo | None = None) -> Iterator[Entry]:
    """List one source by its prefix; each backend is imported only in its own branch. `memo`
    (tar shards only) skips the shards listed unchanged by the last round."""
    notes = notes if notes is not None else Counter()
    prefix, sep, rest = source.partition(":")
    if not sep or not rest:
        raise ValueError(f"source {source!r} must look like folder:DIR, manifest:FILE or wds:SHARDS")
    if prefix == "folder":
        return _iter_folder(source, rest, cfg, notes)
    if prefix == "manifest":
        return _iter_manifest(source, rest, cfg, notes)
    if prefix == "wds":
        return _iter_wds(source, rest, cfg, notes, memo)
    raise ValueError(f"source {source!r}: unknown prefix {prefix!r} (use folder:, manifest: or wds:)")
