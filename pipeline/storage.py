"""Atomic writes (temp file in the same folder + rename) for every artifact in a run directory,
groups of files committed together, folders swapped in whole, the lock of a run directory and
of read-modify-write of shared files, and the sha256 of a file.

A killed run never leaves a half-written manifest, feature cache, ledger or checkpoint: readers
see either the old file or the new one. Files that only make sense together (one ingest round's
manifest, quarantine and state) are written with `commit_files`: staged, then one small commit
file, then moved into place, and `recover_files` rolls a committed group forward (or drops an
uncommitted one) after a kill. A folder that must be complete or absent (an export) is built
beside its target and swapped in with `replace_dir`. Two writers that read, merge and write back
the same file (the overrides store, the registry) hold `locked(path)`, so neither loses the
other's change; every command that writes a run directory holds `run_lock` for its whole run.

A temp file is named `.<target>.tmp<pid>.<random>`: one whose writer is gone (a SIGKILL, an OOM
kill) is removed by the next write of the same target and by `clean_stale_temps`, which every
writing command runs under its run lock. A full disk is `DiskFull`, one line ("disk full: need N MB
at PATH"): large writes check the free space first (`ensure_free_space`), and an ENOSPC during a
write is turned into the same line, the temp file removed.

Tests kill a process between two writes with `WEBKD_KILL_AT_WRITE=N` (SIGKILL after the N-th
completed write or rename made through these helpers), and count them with `WEBKD_WRITE_LOG=PATH`
(one line "<n>\t<target>" appended per completed write or rename).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

KILL_AT_WRITE = "WEBKD_KILL_AT_WRITE"     # tests: SIGKILL this process after its N-th write
WRITE_LOG = "WEBKD_WRITE_LOG"             # tests: append "<n>\t<target>" to this file per write
_writes = 0


_named: dict[str, int] = {}


def _written(target: str | Path = "") -> None:
    """Count one completed write or rename; with WEBKD_KILL_AT_WRITE=N the N-th one kills the
    process (SIGKILL: no cleanup, no atexit), so a test can stop a run between any two writes;
    WEBKD_KILL_AT_WRITE=NAME (or NAME@K) kills after the first (K-th) write of a file or folder
    called NAME."""
    global _writes
    _writes += 1
    if os.environ.get(WRITE_LOG):
        with open(os.environ[WRITE_LOG], "a", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(f"{_writes}\t{target}\n")
    at = os.environ.get(KILL_AT_WRITE)
    if not at:
        return
    if at.isdigit():
        hit = _writes == int(at)
    else:
        name, _, k = at.partition("@")
        if Path(target).name == name:
            _named[name] = _named.get(name, 0) + 1
        hit = Path(target).name == name and _named[name] == int(k or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


class DiskFull(OSError):
    """Not enough free space for a write (a user error: one line, "disk full: need N MB at PATH")."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def ensure_free_space(path: str | Path, need: int, margin: int = 1 << 20) -> None:
    """Raise `DiskFull` unless the file system of `path` has `need` bytes (+ `margin`) free, before
    a large write starts (a cache written into a full disk otherwise fails half-way)."""
    path = Path(path)
    free = _free_bytes(path.parent)
    if free < need + margin:
        raise DiskFull(f"disk full: need {_mb(need)} MB at {path} ({_mb(free)} MB free); "
                       "free some space or move the run directory (run_dir=...)")


_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.tmp(?P<pid>\d+)\.[^/]*$")


def _stale(name: str) -> bool:
    m = _TEMP_RE.match(name)
    return bool(m) and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))


def clean_stale_temps(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Remove the temp files (`.<target>.tmp<pid>.*`) that writers which are no longer running
    left in `folder` (a kill during a cache write leaves a full-size one). Returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    walk = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for d, _, names in walk:
        for name in names:
            if _stale(name):
                p = Path(d) / name
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    if removed:
        log.info("removed %d temp file(s) left by killed runs in %s", len(removed), folder)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", need: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename. With `need`
    (bytes about to be written) the free space is checked first; a full disk during the write is
    `DiskFull` either way, and the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        if _stale(old.name):
            with contextlib.suppress(OSError):
                old.unlink()
    if need is not None:
        ensure_free_space(path, need)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp{os.getpid()}.", suffix=suffix or path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, DiskFull):
                size = tmp_path.stat().st_size if tmp_path.exists() else 0
                amount = f"{_mb(need)} MB" if need else f"more than {_mb(size)} MB"
                raise DiskFull(f"disk full: need {amount} at {path} ({_mb(_free_bytes(path.parent))} MB "
                               "free); free some space or move the run directory (run_dir=...)") from None
            raise
        os.replace(tmp_path, path)
        _written(path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, backup: bool = False) -> None:
    """Write `obj` as JSON atomically; with `backup` (records a user owns: the registry, the
    overrides store) the same text also goes to `<name>.bak`, the last good copy that
    `repair_hint` points to when the file itself is later found damaged."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_text(path, text)
    if backup:
        atomic_write_text(backup_path(path), text)


def backup_path(path: str | Path) -> Path:
    """`registry.json` -> `registry.json.bak` (written by `atomic_write_json(..., backup=True)`)."""
    path = Path(path)
    return path.with_name(path.name + ".bak")


def repair_hint(path: str | Path) -> str:
    """How to repair a damaged JSON record a user owns, for its one-line error: restore the last
    good copy beside it when there is one that parses, else fix or move the file aside."""
    path, bak = Path(path), backup_path(path)
    try:
        json.loads(bak.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"fix it by hand, or move it aside (mv {path} {path}.broken) to start a new one"
    return f"restore the last good copy with `cp {bak} {path}` (or move {path.name} aside to start a new one)"


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def atomic_write_table(path: str | Path, table: Any) -> None:
    """Write a pyarrow Table as Parquet atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


# --------------------------------------------------------------------------------------------
# groups of files committed together, folders swapped in whole
# --------------------------------------------------------------------------------------------
COMMIT = "COMMIT.json"


def commit_files(stage: str | Path, writes: Sequence[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write several files as one change: each `write(staged_path)` writes the new version of its
    target into the folder `stage`, then `stage/COMMIT.json` (the commit point, written last)
    lists them, then they are moved over their targets and the folder is removed. A kill before
    the commit file leaves every target as it was (the staged files are dropped by
    `recover_files`); a kill after it is completed by `recover_files`."""
    stage = Path(stage)
    recover_files(stage)
    stage.mkdir(parents=True, exist_ok=True)
    files = {}
    for target, write in writes:
        write(stage / Path(target).name)
        files[Path(target).name] = os.path.relpath(Path(target), stage)
    atomic_write_json(stage / COMMIT, {"files": files})
    _roll_forward(stage)


def _roll_forward(stage: Path) -> None:
    for name, rel in read_json(stage / COMMIT)["files"].items():
        src = stage / name
        if src.exists():
            os.replace(src, stage / rel)
            _written(stage / rel)
    (stage / COMMIT).unlink()
    _written(stage / COMMIT)
    shutil.rmtree(stage, ignore_errors=True)


def recover_files(stage: str | Path) -> str | None:
    """Finish or drop the group of files a killed `commit_files` left in `stage`: 'completed'
    (it had committed: the rest is moved into place), 'dropped' (it had not: the targets are
    the old ones), None (nothing left over)."""
    stage = Path(stage)
    if (stage / COMMIT).exists():
        try:
            read_json(stage / COMMIT)
        except ValueError:   # cannot happen with the atomic write; be safe: treat as uncommitted
            shutil.rmtree(stage, ignore_errors=True)
            return "dropped"
        _roll_forward(stage)
        return "completed"
    if stage.exists():
        shutil.rmtree(stage, ignore_errors=True)
        return "dropped"
    return None


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Put the complete folder `new` in place of `target` (renames only; the old folder, moved
    aside to a hidden `.<name>.old-*` beside it, is deleted after). A kill leaves `target`
    either the old folder, the new one, or absent, never a mix; `.old-*` leftovers are removed
    by the next call for the same target."""
    new, target = Path(new), Path(target)
    for leftover in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
    if target.exists():
        os.replace(target, old)
        _written(old)
    os.replace(new, target)
    _written(target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# locks
# --------------------------------------------------------------------------------------------
class RunLocked(RuntimeError):
    """Another live process holds the lock of a run directory (a user error: one line)."""


_HELD: dict[str, list] = {}   # lock file -> [FileLock, depth]: re-entrant within a process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie (killed, not yet reaped) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _holder(info: Path) -> dict[str, Any] | None:
    try:
        h = read_json(info)
    except (ValueError, OSError):
        return None
    return h if isinstance(h, dict) and isinstance(h.get("pid"), int) else None


def _describe(h: dict[str, Any] | None) -> str:
    if not h:
        return "another process (holder unknown)"
    return (f"`{h.get('command') or 'webkd'}` (pid {h['pid']} on host {h.get('host', '?')}, "
            f"started {h.get('started', '?')})")


@contextlib.contextmanager
def run_lock(lock_file: str | Path, command: str = "") -> Iterator[None]:
    """Hold the exclusive lock of a run directory (`RunPaths.lock`) for a whole command. A second
    writer fails at once with `RunLocked`, one line naming the holder (pid, host, start time,
    command, from the `<lock>.json` beside the lock file). The lock is an OS lock (`filelock`), so
    a process that dies (SIGKILL, OOM) releases it; its holder file is then stale (a pid not
    alive on this host) and the next run takes over with a warning. Re-entrant in one process
    (the CLI holds it and the flow it runs takes it again)."""
    lock_file = Path(lock_file)
    key = str(lock_file.resolve())
    held = _HELD.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    info = lock_file.with_name(lock_file.name + ".json")
    lock = FileLock(str(lock_file), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        h = _holder(info)
        for _ in range(100):  # the new holder may not have written its name yet (an fsync on a busy
            if h is not None and _alive(h["pid"]):   # disk took more than the 1 s waited before)
                break
            time.sleep(0.05)
            h = _holder(info)
        raise RunLocked(f"{lock_file.parent} is in use by {_describe(h)}; wait for it to finish "
                        f"(or stop it{' with kill ' + str(h['pid']) if h else ''}) and run again") from None
    try:
        before = _holder(info)
        host = socket.gethostname()
        if before is not None and before["pid"] != os.getpid():
            if before.get("host") == host and not _alive(before["pid"]):
                log.warning("%s: taking over the lock left by %s, which is no longer running",
                            lock_file.parent, _describe(before))
        atomic_write_json(info, {"pid": os.getpid(), "host": host, "command": command,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S%z")})
        _HELD[key] = [lock, 1]
        clean_stale_temps(lock_file.parent)   # temp files of killed runs (no live writer: we hold the lock)
        try:
            yield
        finally:
            _HELD.pop(key, None)
            with contextlib.suppress(OSError):
                info.unlink()
    finally:
        lock.release()


@contextlib.contextmanager
def locked(path: str | Path, timeout: float = -1) -> Iterator[None]:
    """Hold the inter-process lock of `path` (the file `<path>.lock` beside it) for a
    read-modify-write. `filelock` works on every OS (fcntl on POSIX, msvcrt on Windows) and is
    re-entrant within a process; timeout < 0 waits for as long as it takes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout):
        yield


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks (weights files, cache-key signatures)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def ids_sha256(ids) -> str:
    """Order-sensitive hash of a list of record ids (a manifest, a pool, a validation split)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\n")
    return h.hexdigest()
