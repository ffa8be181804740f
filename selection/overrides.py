"""The run's human overrides store: forced keep ("accept"), forced reject ("reject") or a
corrected label ("relabel") per id.

The store is `overrides.json` in the run directory (`RunPaths.overrides`), in the format of
ARCHITECTURE.md::

    {"version": 1, "entries": {"<id>": {"action": "accept" | "reject" | "relabel",
                                        "label": str | null, "note": str, "time": iso8601}}}

`label` is optional: a teacher class name (the image's training / validation label and its query
mapping become that class) or null (off-class: its query maps to no teacher class). `relabel`
changes only the label and leaves the keep / reject decision to the selection; `accept` or
`reject` with a `label` fixes both. `training.pool.build_pool` applies the labels
(`apply_labels`), so every later curate, distill and refresh trains and validates with them.

People write it with `webkd override` (ids on the command line, or the file the gallery page
exports, which has the same shape; there `entries` only need `action`). The training loop
calls `apply_overrides` after every selection, so every ledger written after an override
shows it with reason `override`. Entries persist across refreshes until removed.

Writes are read-merge-replace under `pipeline.storage.locked` (filelock) and land atomically
(`pipeline.storage`), so a killed write leaves the old store, and two writers do not lose
each other's entries.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from webkd.pipeline.records import OVERRIDE, VALIDATION
from webkd.pipeline.report import printable
from webkd.pipeline.storage import atomic_write_json, locked, repair_hint

log = logging.getLogger(__name__)

VERSION = 1
ACTIONS = ("accept", "reject", "relabel")
DECISIONS = ("accept", "reject")        # the actions that force a keep / reject
OFF_CLASS_LABEL = "off-class"           # how the CLI and the page name the null label
PROTECTED = (VALIDATION,)      # reasons an override never changes (val rows are never trained on)


class OverridesError(ValueError):
    """A malformed overrides store or import file; the message names the file and the entry."""


@dataclass
class OverrideChanges:
    """What one write did to the store (for the CLI to print)."""

    added: dict[str, str] = field(default_factory=dict)                 # id -> action (describe())
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)   # id -> (old, new)
    unchanged: dict[str, str] = field(default_factory=dict)             # id -> action (same as before)
    removed: dict[str, str] = field(default_factory=dict)               # id -> action it had
    missing: list[str] = field(default_factory=list)                    # remove asked, not present
    total: int = 0                                                      # entries after the write

    @property
    def any(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def lines(self) -> list[str]:
        """One human-readable line per affected id, then a total (ids shown with `printable`:
        an id holding an ANSI escape sequence is echoed as text, never sent raw to the terminal)."""
        p = printable
        out = [f"+ {a:<6} {p(i)}" for i, a in self.added.items()]
        out += [f"~ {new:<6} {p(i)}  (was {old})" for i, (old, new) in self.changed.items()]
        out += [f"= {a:<6} {p(i)}  (unchanged)" for i, a in self.unchanged.items()]
        out += [f"- {a:<6} {p(i)}  (removed)" for i, a in self.removed.items()]
        out += [f"? {'':<6} {p(i)}  (not in the store, nothing removed)" for i in self.missing]
        out.append(f"{len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed; "
                   f"{self.total} override(s) in the store")
        return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_id(i: Any, where: str) -> str:
    if not isinstance(i, str) or not i.strip():
        raise OverridesError(f"{where}: id {i!r} must be a non-empty string")
    return i.strip()


def _parse(obj: Any, where: str, full: bool) -> dict[str, dict[str, str]]:
    """Validate a store / export object; return its entries (id -> {action, note, time}).

    `full` is for the store itself; an import file only needs `action` per entry.
    """
    if not isinstance(obj, dict):
        raise OverridesError(f"{where}: top level must be a JSON object with 'version' and 'entries', "
                             f"got {type(obj).__name__}")
    unknown = set(obj) - {"version", "entries"}
    if unknown:
        raise OverridesError(f"{where}: unknown top-level key(s) {sorted(unknown)} "
                             "(expected 'version' and 'entries')")
    version = obj.get("version", VERSION)
    if version != VERSION:
        raise OverridesError(f"{where}: unsupported version {version!r} (this webkd reads version {VERSION})")
    if "entries" not in obj:
        raise OverridesError(f"{where}: missing 'entries' (an object id -> {{\"action\": ...}})")
    entries = obj["entries"]
    if not isinstance(entries, dict):
        raise OverridesError(f"{where}: 'entries' must be an object id -> {{\"action\": ...}}, "
                             f"got {type(entries).__name__}")
    out: dict[str, dict[str, str]] = {}
    for raw_id, e in entries.items():
        i = _check_id(raw_id, where)
        if not isinstance(e, dict):
            raise OverridesError(f"{where}: entry {i!r} must be an object with an 'action', got {e!r}")
        action = e.get("action")
        if action not in ACTIONS:
            raise OverridesError(f"{where}: entry {i!r} has unknown action {action!r} "
                                 f"(expected one of {', '.join(ACTIONS)})")
        note = e.get("note", "")
        if not isinstance(note, str):
            raise OverridesError(f"{where}: entry {i!r}: 'note' must be a string")
        time = e.get("time", "")
        if not isinstance(time, str):
            raise OverridesError(f"{where}: entry {i!r}: 'time' must be an ISO 8601 string")
        if full and not time:
            log.debug("%s: entry %s has no time", where, i)
        out[i] = {"action": action, "note": note, "time": time}
        if "label" in e:
            label = e["label"]
            if label is not None and (not isinstance(label, str) or not label.strip()):
                raise OverridesError(f"{where}: entry {i!r}: 'label' must be a class name or null (off-class), "
                                     f"got {label!r}")
            out[i]["label"] = label
        elif action == "relabel":
            raise OverridesError(f"{where}: entry {i!r}: action 'relabel' needs a 'label' "
                                 "(a class name, or null for off-class)")
    return out


def describe(e: Mapping[str, Any]) -> str:
    """An entry as the CLI echoes it: `reject`, `relabel -> pants`, `accept -> off-class`."""
    if "label" not in e:
        return str(e["action"])
    return f"{e['action']} -> {OFF_CLASS_LABEL if e['label'] is None else e['label']}"


MAX_DEPTH = 8   # the format nests 3 deep ({"entries": {id: {"action": ...}}}); deeper is never a valid file
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _too_deep(text: str) -> bool:
    """Whether the JSON text nests objects / arrays deeper than MAX_DEPTH (strings skipped), checked
    before json.loads, whose recursive parser would fail on a 100k-deep file with RecursionError."""
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OverridesError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise OverridesError(f"{path}: cannot read ({exc})") from None
    deep = (f"{path}: JSON nested more than {MAX_DEPTH} levels deep; an overrides file is "
            '{"version": 1, "entries": {"<id>": {"action": "accept" | "reject"}}}: '
            "export it again from the gallery page or fix it by hand")
    if _too_deep(text):
        raise OverridesError(deep)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OverridesError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # the pre-check missed it (unbalanced text): the same one line
        raise OverridesError(deep) from None


def load_entries(path: str | Path) -> dict[str, dict[str, str]]:
    """The store's full entries (id -> {action, note, time}); {} when there is no store yet."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return _parse(_read_json(path), str(path), full=True)
    except OverridesError as exc:   # the store is the user's record: say how to get it back
        raise OverridesError(f"{exc}; {repair_hint(path)}") from None


def load_overrides(path: str | Path) -> dict[str, str]:
    """The store as id -> "accept" | "reject" | "relabel" ({} when there is no store yet)."""
    return {i: e["action"] for i, e in load_entries(path).items()}


def load_labels(path: str | Path) -> dict[str, str | None]:
    """The corrected labels of the store: id -> class name, or None for off-class."""
    return {i: e["label"] for i, e in load_entries(path).items() if "label" in e}


def apply_labels(ids: Sequence[str], labels: Mapping[str, str | None], classes: Sequence[str],
                 where: str = "overrides.json") -> tuple[np.ndarray, np.ndarray]:
    """The corrected labels of a pool: (rows (n,) int64, classes (n,) int64, -1 = off-class).

    Ids not in `ids` are skipped (an image that left the pool); a label that is not one of
    `classes` is one clear error (the store names a class the config no longer has).
    """
    lookup = {c: k for k, c in enumerate(classes)}
    unknown = sorted({lab for lab in labels.values() if lab is not None and lab not in lookup})
    if unknown:
        raise OverridesError(f"{where}: label(s) {unknown} are not classes of data.classes {list(classes)}; "
                             "relabel those images again (webkd override RUN --relabel ID=CLASS) or remove them")
    pos = {i: r for r, i in enumerate(ids)}
    hit = [(pos[i], -1 if lab is None else lookup[lab]) for i, lab in labels.items() if i in pos]
    rows = np.array([r for r, _ in hit], dtype=np.int64)
    return rows, np.array([c for _, c in hit], dtype=np.int64)


def _merge(path: Path, updates: Mapping[str, dict[str, str]], remove: Iterable[str]) -> OverrideChanges:
    """Read the store, apply `updates` (id -> entry) then `remove`, write it back atomically."""
    with locked(path):
        entries = load_entries(path)
        ch = OverrideChanges()
        for i, e in updates.items():
            old = entries.get(i)
            if old is None:
                ch.added[i] = describe(e)
            elif describe(old) != describe(e):
                ch.changed[i] = (describe(old), describe(e))
            else:
                ch.unchanged[i] = describe(e)
            entries[i] = e                      # later write wins (note and time refresh too)
        for i in remove:
            if i in entries:
                ch.removed[i] = describe(entries.pop(i))
            else:
                ch.missing.append(i)
        ch.total = len(entries)
        if ch.any or updates:
            atomic_write_json(path, {"version": VERSION, "entries": dict(sorted(entries.items()))},
                              backup=True)   # overrides.json.bak: the last good copy
    return ch


def record_overrides(path: str | Path, accept: Sequence[str] = (), reject: Sequence[str] = (),
                     remove: Sequence[str] = (), note: str = "",
                     relabel: Mapping[str, str | None] | None = None) -> OverrideChanges:
    """Merge forced keeps / forced rejects / corrected labels / removals into the store at `path`
    (atomic). `relabel`: id -> class name or None (off-class); an id also in `accept` / `reject`
    gets both (the decision and the label), else action "relabel".

    The newest call wins for an id (its whole entry); an id may appear in only one of accept,
    reject and remove of a call, and not in both relabel and remove.
    """
    path = Path(path)
    acc = [_check_id(i, "accept") for i in accept]
    rej = [_check_id(i, "reject") for i in reject]
    rem = [_check_id(i, "remove") for i in remove]
    lab = {_check_id(i, "relabel"): v for i, v in (relabel or {}).items()}
    clash = (set(acc) & set(rej)) | (set(acc) & set(rem)) | (set(rej) & set(rem)) | (set(lab) & set(rem))
    if clash:
        raise OverridesError(f"id(s) given more than one action in one call: {sorted(clash)}")
    bad = {i: v for i, v in lab.items() if v is not None and (not isinstance(v, str) or not v.strip())}
    if bad:
        raise OverridesError(f"relabel: label(s) must be class names (or off-class), got {bad}")
    time = _now()
    updates = {i: {"action": "accept", "note": note, "time": time} for i in acc}
    updates.update({i: {"action": "reject", "note": note, "time": time} for i in rej})
    for i, v in lab.items():
        updates.setdefault(i, {"action": "relabel", "note": note, "time": time})["label"] = v
    return _merge(path, updates, rem)


def import_overrides_file(path: str | Path, file: str | Path) -> OverrideChanges:
    """Merge an overrides file (the gallery's export, same format) into the store at `path`.

    The whole file is validated before anything is written; entries keep their own note, and
    get the import time when they carry none.
    """
    file = Path(file)
    if not file.exists():
        raise OverridesError(f"{file}: no such file")
    incoming = _parse(_read_json(file), str(file), full=False)
    time = _now()
    for e in incoming.values():
        e["time"] = e["time"] or time
        e["note"] = e["note"] or f"imported from {file.name}"
    return _merge(Path(path), incoming, ())


def apply_overrides(keep: np.ndarray, reason: np.ndarray, ids: Sequence[str],
                    overrides: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Force the human decisions onto one selection: accept -> kept, reject -> rejected
    (a `relabel` entry forces nothing here: its label reaches the pool, `apply_labels`).

    keep (N,) bool, reason (N,) str and ids (N,) are row-aligned. Overridden rows get reason
    `override`; rows whose reason is `validation` are never touched (they are never trained
    on). Returns new arrays; the inputs are not modified. Weights follow `keep` (the caller
    sets 1.0 / 0.0 as for any KD³ decision).
    """
    as_unicode = isinstance(reason, np.ndarray) and reason.dtype.kind == "U"
    keep = np.array(keep, dtype=bool, copy=True)                  # (N,)
    reason = np.array(reason, dtype=object, copy=True)            # (N,)
    if not (len(keep) == len(reason) == len(ids)):
        raise ValueError(f"keep ({len(keep)}), reason ({len(reason)}) and ids ({len(ids)}) must be row-aligned")
    bad = {a for a in overrides.values() if a not in ACTIONS}
    if bad:
        raise OverridesError(f"unknown override action(s) {sorted(bad)} (expected {', '.join(ACTIONS)})")
    for n, i in enumerate(ids if overrides else ()):
        action = overrides.get(i)
        if action not in DECISIONS or reason[n] in PROTECTED:
            continue
        keep[n] = action == "accept"
        reason[n] = OVERRIDE
    if as_unicode:  # give back the caller's kind of array (widened: "override" may be longer)
        reason = reason.astype(str)
    return keep, reason


def record_page_decisions(path: str | Path, obj: Any, where: str = "the gallery page") -> OverrideChanges:
    """Merge the decisions a served gallery page sends, `{"entries": {id: entry}, "remove": [id]}`
    (entries in the store's format), into the store at `path`; validated whole before any write."""
    if not isinstance(obj, dict) or set(obj) - {"entries", "remove"}:
        raise OverridesError(f"{where}: expected an object with 'entries' and 'remove'")
    incoming = _parse({"version": VERSION, "entries": obj.get("entries") or {}}, where, full=False)
    remove = obj.get("remove") or []
    if not isinstance(remove, list):
        raise OverridesError(f"{where}: 'remove' must be a list of ids")
    rem = [_check_id(i, where) for i in remove]
    clash = set(rem) & set(incoming)
    if clash:
        raise OverridesError(f"{where}: id(s) both set and removed: {sorted(clash)}")
    time = _now()
    for e in incoming.values():
        e["time"] = e["time"] or time
        e["note"] = e["note"] or "gallery"
    return _merge(Path(path), incoming, rem)
