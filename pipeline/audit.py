"""Audit of one ingested run: is every file, tar member and manifest row of its sources accounted?

`unaccounted(run_dir, sources)` lists each item the sources hold that is in neither
`manifest.parquet` nor `quarantine.parquet`: a silent loss. It lists the sources on its own
(an iterative `os.scandir` walk, `tarfile`, Python's csv reader, pyarrow for Parquet), not through
`pipeline.sources`, so a listing that drops something is caught rather than repeated. The only
rule it shares is the shard format's: a sample's `.txt` / `.json` / `.cls` sidecar is accounted
when an image member of its key is. Tests and `RELIABILITY` checks call it after an ingest.
"""
from __future__ import annotations

import csv
import os
import tarfile
from pathlib import Path
from typing import Iterator

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import load_manifest, load_quarantine, path_to_uri
from webkd.pipeline.sources import is_sidecar, wds_key

Item = tuple[str, tuple[str, ...]]          # (what, uris any one of which accounts for it)


def _folder_items(root: str) -> Iterator[Item]:
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        yield root, (path_to_uri(root),)
        return
    real_root = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = list(it)
        except (OSError, ValueError):
            yield d, (path_to_uri(d),)                      # an unreadable folder needs its own row
            continue
        for e in entries:
            inside = not e.is_symlink() or os.path.realpath(e.path) == real_root \
                or os.path.realpath(e.path).startswith(real_root.rstrip(os.sep) + os.sep)
            if inside and e.is_dir():
                stack.append(e.path)
            else:
                yield e.path, (path_to_uri(e.path),)


def _manifest_items(file: str, path_column: str) -> Iterator[Item]:
    mpath = os.path.abspath(file)
    base = os.path.dirname(mpath)
    whole = (path_to_uri(mpath),)
    try:
        if mpath.lower().endswith(".csv"):
            with open(mpath, encoding="utf-8", errors="surrogateescape", newline="") as fh:
                rows = [r for r in csv.reader(fh) if r]
            header, rows = (rows[0], rows[1:]) if rows else ([], [])
            header = [h.strip().lstrip("\ufeff") for h in header]
            k = header.index(path_column) if path_column in header else -1
            paths = [r[k] if 0 <= k < len(r) else None for r in rows]
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            col = pq.read_table(mpath, columns=[path_column]).column(0)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                col = col.cast(pa.large_binary())
            paths = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in col.to_pylist()]
    except Exception:                                        # unreadable as a whole: one row for the file
        yield mpath, whole
        return
    for i, rel in enumerate(paths):
        uris = [f"{mpath}#row{i}", *whole]
        if isinstance(rel, str) and rel.strip():
            rel = rel.strip()
            uris += [path_to_uri(os.path.normpath(os.path.join(base, rel))), path_to_uri(rel)]
        yield f"{mpath} row {i}", tuple(uris)


def _shard_items(shard: str) -> Iterator[Item]:
    shard = os.path.abspath(shard)
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for m in tf:
                members.append(m)
    except (tarfile.TarError, OSError, EOFError):
        if not members:
            yield shard, (path_to_uri(shard),)
            return
    images: dict[str, list[str]] = {}
    for m in members:
        key, fld = wds_key(m.name)
        if m.isreg() and not is_sidecar(fld):
            images.setdefault(key, []).append(path_to_uri(f"{shard}/{m.name}"))
    for m in members:
        if m.isdir():
            continue
        own = path_to_uri(f"{shard}/{m.name}")
        key, fld = wds_key(m.name)
        yield f"{shard}/{m.name}", (own, *(images.get(key, []) if is_sidecar(fld) else []))


def _items(source: str, path_column: str) -> Iterator[Item]:
    prefix, _, rest = source.partition(":")
    if prefix == "folder":
        yield from _folder_items(rest)
    elif prefix == "manifest":
        yield from _manifest_items(rest, path_column)
    elif prefix == "wds":
        from braceexpand import braceexpand

        shards = list(braceexpand(rest))
        if len(shards) == 1 and os.path.isdir(shards[0]):
            shards = sorted(os.path.join(shards[0], n) for n in os.listdir(shards[0]) if n.endswith(".tar"))
        for shard in shards:
            yield from _shard_items(shard)
    else:
        raise ValueError(f"source {source!r}: unknown prefix {prefix!r}")


def unaccounted(run_dir: str | Path, sources: list[str], path_column: str = "path") -> list[str]:
    """Every file / tar member / manifest row of `sources` with no manifest or quarantine row of
    the same source in the run at `run_dir` (printable text, one per loss); [] when none is lost."""
    paths = RunPaths(Path(run_dir))
    have = {(r.source, r.uri) for r in load_manifest(paths.manifest)}
    have |= {(q.source, q.uri) for q in load_quarantine(paths.quarantine)}
    return [f"{source}: {path_to_uri(what)}" for source in sources for what, uris in _items(source, path_column)
            if not any((source, u) in have for u in uris)]
