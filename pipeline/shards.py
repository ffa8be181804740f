"""Shards: the unit of work of ingest and feature extraction (img2dataset's and clip-retrieval's
shape). A stage plans its work as a list of `Shard`s (a slice of the listed entries, a block of
manifest rows), each shard's output is one file under `<run>/shards/<stage>/<key>.*` written
atomically and named by the shard's content key (a digest of its inputs), and the stage merges
the shard files in order into the row-aligned run arrays, then removes them.

Because a shard's output is keyed on its content and written atomically, running a shard twice
(a retried task, a Dask worker that died after finishing, PrefectHQ/prefect#15442) finds the
file and returns it without work: shard functions are idempotent. The single-process path
(`local_map`) and a task runner (flows/: Prefect `.map` over Dask or Ray) call the same shard
functions; this module imports no engine.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Shard:
    """Items [start, stop) of a stage's work list; `key` names its output file."""

    stage: str
    index: int
    start: int
    stop: int
    key: str

    def __len__(self) -> int:
        return self.stop - self.start


def content_key(*parts: Any) -> str:
    """sha256 (hex, 32 chars) of the JSON of `parts`: a shard's inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def plan_shards(stage: str, n: int, size: int, key_of: Callable[[int, int], str]) -> list[Shard]:
    """Consecutive shards of at most `size` items over n items; `key_of(start, stop)` keys each."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return [Shard(stage, i, lo, min(lo + size, n), key_of(lo, min(lo + size, n)))
            for i, lo in enumerate(range(0, n, size))]


def shard_dir(root: str | Path, stage: str) -> Path:
    return Path(root) / "shards" / stage


def shard_file(root: str | Path, shard: Shard, suffix: str) -> Path:
    return shard_dir(root, shard.stage) / f"{shard.key}{suffix}"


def clear_shards(root: str | Path, stage: str, keep: Iterable[Path] = ()) -> int:
    """Remove the stage's shard files (all but `keep`); returns how many."""
    d = shard_dir(root, stage)
    if not d.exists():
        return 0
    keep_set = {Path(p).resolve() for p in keep}
    gone = 0
    for f in d.iterdir():
        if f.is_file() and f.resolve() not in keep_set:
            f.unlink(missing_ok=True)
            gone += 1
    for empty in (d, d.parent):          # no empty shards/ folders left in the run directory
        try:
            empty.rmdir()
        except OSError:
            break
    return gone


def local_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """The single-process runner: the shards one after the other, in order."""
    return [fn(x) for x in items]
