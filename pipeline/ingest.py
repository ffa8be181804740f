"""Ingest: web images in, validated records out (`manifest.parquet` + `quarantine.parquet`).

Two parts, in reading order (listing the sources is `pipeline.sources`):

1. Decoding and validation (`decode_image`, `to_rgb`, `load_rgb`) live in `pipeline.decode`
   and are importable from here.
2. `load_entry` (one listed `Entry` -> content id + decoded image; ingest and `webkd predict`
   both read through it) and `run_ingest`: content-hash ids, exact-duplicate merging,
   quarantine, incremental re-runs.
"""
from __future__ import annotations

import logging
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from webkd.pipeline.progress import tqdm

from webkd.pipeline.config import IngestConfig
from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import (DUPLICATE, OK, QuarantineRow, Record, load_manifest, load_quarantine, path_to_uri,
                                    save_manifest, save_quarantine)
from webkd.pipeline.sources import Entry, ShardMemo, iter_source
from webkd.pipeline.shards import Shard, clear_shards, content_key, local_map, plan_shards, shard_file
from webkd.pipeline.storage import atomic_write_json, atomic_write_table, commit_files, read_json, recover_files

log = logging.getLogger(__name__)


from webkd.pipeline.decode import (SUPPORTED_MODES, Decoded, Rejected, content_id, decode_image,  # noqa: E402,F401
                                   load_rgb, to_rgb)


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


@dataclass
class IngestPlan:
    """What one ingest round reads: the new or changed entries, cut into shards."""

    batch: int
    todo: list[Entry]
    shards: list[Shard]
    seen: int = 0
    skipped_unchanged: int = 0
    sidecars: int = 0
    upstream_failed: int = 0
    shard_memo: dict[str, dict[str, Any]] | None = None   # tar shards listed this round (sources.ShardMemo)

    def entries(self, shard: Shard) -> list[Entry]:
        return self.todo[shard.start:shard.stop]


def plan_ingest(sources: list[str], paths: RunPaths, cfg: IngestConfig, shard_size: int = 1000) -> IngestPlan:
    """List `sources`, leave out the entries unchanged since the last round (`paths.ingest_state`)
    and cut the rest into shards keyed on their listing (entry keys, sizes, mtimes, offsets) and
    the ingest settings."""
    recovered = recover_files(paths.ingest_stage)   # a round killed mid-commit: finish it or drop it
    if recovered:
        log.warning("%s: an interrupted ingest round was %s", paths.root, recovered)
    records = load_manifest(paths.manifest)
    state = _load_state(paths.ingest_state)
    batch = 1 + max([r["batch"] for r in state.values()] + [r.batch for r in records] + [-1])
    notes: Counter = Counter()
    todo: list[Entry] = []
    memo = ShardMemo(known=_load_memo(paths, len(state)))
    seen = skipped = 0
    for source in sources:
        for entry in iter_source(source, cfg, notes, memo):
            seen += 1
            prev = state.get(entry.key)
            if prev is not None and (prev["size"], prev["mtime_ns"], prev["offset"]) == \
                    (entry.size, entry.mtime_ns, entry.offset):
                skipped += 1
                continue
            todo.append(entry)
    seen, skipped = seen + memo.skipped_entries, skipped + memo.skipped_entries
    settings = cfg.model_dump(mode="json")
    shards = plan_shards("ingest", len(todo), shard_size, lambda lo, hi: content_key(
        settings, [(e.key, e.size, e.mtime_ns, e.offset, e.container, e.error) for e in todo[lo:hi]]))
    return IngestPlan(batch, todo, shards, seen, skipped, notes["sidecars"], notes["upstream_failed"], memo.listed)


def _load_memo(paths: RunPaths, state_rows: int) -> dict[str, dict[str, Any]]:
    """The last round's listed tar shards, when committed with the ingest state as it is now (a
    state lost or replaced since would let a skipped shard's entries go unread: then none)."""
    memo = read_json(paths.ingest_shards, default=None)
    if not isinstance(memo, dict) or memo.get("state_rows") != state_rows or not isinstance(memo.get("shards"), dict):
        return {}
    return memo["shards"]


_OUTCOME_FIELDS = ("id", "reason", "detail", "width", "height", "format", "mode")


def ingest_shard(entries: list[Entry], shard: Shard, root: str | Path, cfg: IngestConfig, workers: int = 2) -> Path:
    """Read, hash and validate one shard's entries; their outcomes go to one JSON file named by the
    shard's content key, written atomically. Idempotent: an existing complete file is returned
    as it is (a shard done twice, by a retry or a re-scheduled task, is not read again)."""
    out = shard_file(root, shard, ".json")
    done = read_json(out, default=None)
    if isinstance(done, list) and len(done) == len(entries):
        return out
    outcomes = _ordered_map(lambda e: _process(e, cfg), entries, workers)
    rows = [{f: getattr(o, f) for f in _OUTCOME_FIELDS}
            for o in tqdm(outcomes, total=len(entries), desc=f"ingest shard {shard.index}", unit="img", leave=False)]
    atomic_write_json(out, rows)
    return out


def _shard_outcomes(plan: IngestPlan, files: list[Path]) -> Iterator[_Outcome]:
    for shard, f in zip(plan.shards, files):
        rows = read_json(f, default=None)
        entries = plan.entries(shard)
        if not isinstance(rows, list) or len(rows) != len(entries):
            raise ValueError(f"ingest shard {f} is incomplete ({len(rows or [])}/{len(entries)} outcomes): run it again")
        for e, r in zip(entries, rows):
            yield _Outcome(e, **{k: r[k] for k in _OUTCOME_FIELDS})


def run_ingest(sources: list[str], paths: RunPaths, cfg: IngestConfig, workers: int = 2,
               shard_size: int = 1000) -> IngestReport:
    """One ingest round over `sources` into `paths.manifest` / `paths.quarantine`, on one
    process: `plan_ingest`, `ingest_shard` for each shard in turn, `merge_ingest`. A task runner
    (flows/curate.py) runs the same three with the shards spread over its workers."""
    plan = plan_ingest(sources, paths, cfg, shard_size)
    files = local_map(lambda s: ingest_shard(plan.entries(s), s, paths.root, cfg, workers), plan.shards)
    return merge_ingest(plan, paths, files)


def merge_ingest(plan: IngestPlan, paths: RunPaths, files: list[Path]) -> IngestReport:
    """Merge the shards' outcomes, in listing order, into the manifest and quarantine.

    Record id = sha256 of the bytes. The first occurrence of some bytes becomes the record; each
    further copy adds its label to that record's `web_labels` and gets a `duplicate` quarantine
    row (`dup_of` = the record id). Every failure is a quarantine row with a reason. Incremental:
    `paths.ingest_state` remembers each listed entry (source, uri, label -> size, mtime_ns,
    offset, outcome); an unchanged entry is not read again, new records are appended (existing
    rows keep their order), and every new row carries `batch` = this round's number. The
    result does not depend on how the shards were cut or where they ran.
    """
    recover_files(paths.ingest_stage)
    records = load_manifest(paths.manifest)
    quarantine = load_quarantine(paths.quarantine)
    state = _load_state(paths.ingest_state)
    batch, todo = plan.batch, plan.todo
    report = IngestReport(batch=batch, seen=plan.seen, skipped_unchanged=plan.skipped_unchanged,
                          sidecars=plan.sidecars, upstream_failed=plan.upstream_failed)

    by_id = {r.id: i for i, r in enumerate(records)}
    state_before = dict(state)
    quarantined: Counter = Counter()
    for out in _shard_outcomes(plan, files):
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

    memo = {"state_rows": len(state), "shards": plan.shard_memo or {}}
    memo_writes = [(paths.ingest_shards, lambda p: atomic_write_json(p, memo))] \
        if memo["shards"] or paths.ingest_shards.exists() else []     # tar shards only
    if todo or not (paths.manifest.exists() and paths.ingest_state.exists()):  # nothing read: nothing to write
        # one commit for the round's files: a kill leaves all old or all new (recover_files)
        commit_files(paths.ingest_stage, [(paths.manifest, lambda p: save_manifest(p, records)),
                                          (paths.quarantine, lambda p: save_quarantine(p, quarantine)),
                                          (paths.ingest_state, lambda p: _save_state(p, state))] + memo_writes)
    elif memo_writes and read_json(paths.ingest_shards, default=None) != memo:
        atomic_write_json(paths.ingest_shards, memo)
    clear_shards(paths.root, "ingest")
    report.quarantined = dict(quarantined)
    report.total_records, report.total_quarantined = len(records), len(quarantine)
    log.info("ingest round %d: listed %d, kept %d, quarantined %d; %d manifest rows", batch, report.seen, report.kept, report.n_quarantined, report.total_records)  # the CLI prints the table
    return report
