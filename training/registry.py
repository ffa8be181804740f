"""Champion / challenger registry of exported students: `registry.json` in the run directory.

Every student that a flow trains gets a version (`v0001`, `v0002`, ...) and its own folder
`students/<version>/` (checkpoints, ledgers, metrics, `export/`). The registry records each
version with its metrics, what it was trained on (pool ids, overrides, training config), its
parent (the champion it was warm-started from), how it did against the champion on the same
validation split, and the decision. One version is the champion; `<run>/export/` holds a copy
of the champion's export, so deployed consumers always read one fixed path.

Promotion is one atomic switch: the registry pointer is rewritten with `os.replace` (the source
of truth), then the copied export folder is swapped in with two renames. A crash between the two
leaves the pointer right and the folder stale; `sync_export` (run by every `promote` and at the
start of a refresh) repairs it. A challenger is promoted only when it is strictly better than
the champion (by more than `min_delta`) on the same rows: a tie keeps the champion.

File format (`version` 1)::

    {"version": 1, "champion": "v0002",
     "entries": [{"version": "v0001", "kind": "distill", "status": "retired", "parent": null,
                  "created": iso, "promoted": iso | null, "export": "students/v0001/export",
                  "metrics": {...}, "trained_on": {...} | null,
                  "validation": {"metric": "val_agreement" | "val_acc", "rows": n, "ids_sha256": str,
                                 "score": float, "champion": "v0000" | null,
                                 "champion_score": float | null},
                  "decision": str}, ...]}
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from webkd.pipeline.paths import RunPaths, ledgers_in
from webkd.pipeline.report import pct
from webkd.pipeline.storage import (atomic_write_json, atomic_write_text, ids_sha256, locked, read_json, repair_hint,  # noqa: F401 (ids_sha256: registry.ids_sha256)
                                   replace_dir, sha256_file)
from webkd.training.pool import pool_state  # noqa: F401 (registry.pool_state: what a student is trained on)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "registry_version.json"          # written into <run>/export/ by promote: which version it is
_VERSION_RE = re.compile(r"^v(\d{4,})$")
KINDS = ("distill", "refresh", "adopted")
STATUSES = ("champion", "retired", "rejected")


class RegistryError(ValueError):
    """A registry file or request that cannot be honoured; the message says which."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# the registry file
# --------------------------------------------------------------------------------------------
@dataclass
class Registry:
    """The parsed `registry.json`; `entries` oldest first."""

    champion: str | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)

    def entry(self, version: str | None) -> dict[str, Any] | None:
        for e in self.entries:
            if e["version"] == version:
                return e
        return None

    @property
    def champion_entry(self) -> dict[str, Any] | None:
        return self.entry(self.champion)

    def last_trained(self) -> dict[str, Any] | None:
        """The newest entry that was trained here (not adopted), promoted or not."""
        for e in reversed(self.entries):
            if e.get("trained_on") is not None:
                return e
        return None

    def history(self) -> list[dict[str, Any]]:
        """Entries that were champion at some point, in promotion order."""
        return sorted((e for e in self.entries if e.get("promoted")), key=lambda e: e["promoted"])

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "champion": self.champion, "entries": self.entries}


def load_registry(path: str | Path) -> Registry:
    """Read `registry.json` (an empty Registry when absent); a malformed file is an error."""
    path = Path(path)
    try:
        raw = read_json(path, default=None)
    except (json.JSONDecodeError, OSError) as exc:
        raise RegistryError(f"{path}: unreadable registry ({exc}); {repair_hint(path)}") from None
    if raw is None:
        return Registry()
    if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION or not isinstance(raw.get("entries"), list):
        raise RegistryError(f"{path}: not a version-{FORMAT_VERSION} registry (keys: version, champion, entries); "
                            f"{repair_hint(path)}")
    reg = Registry(champion=raw.get("champion"), entries=list(raw["entries"]))
    for e in reg.entries:
        if not isinstance(e, dict) or not _VERSION_RE.match(str(e.get("version", ""))):
            raise RegistryError(f"{path}: entry without a valid version: {e!r}; {repair_hint(path)}")
    if reg.champion is not None and reg.entry(reg.champion) is None:
        raise RegistryError(f"{path}: champion {reg.champion!r} has no entry; {repair_hint(path)}")
    return reg


def save_registry(path: str | Path, reg: Registry) -> None:
    atomic_write_json(path, reg.to_json(), backup=True)   # registry.json.bak: the last good copy


def _number(version: str) -> int:
    m = _VERSION_RE.match(version)
    if not m:
        raise RegistryError(f"not a version name: {version!r} (expected v0001, v0002, ...)")
    return int(m.group(1))


def version_name(n: int) -> str:
    return f"v{n:04d}"


def allocate_version(paths: RunPaths, reuse: bool = True) -> str:
    """The version for the next student. With `reuse`, an unregistered `students/<v>/` left by
    an interrupted challenger is taken again (its checkpoint resumes when the config matches);
    otherwise, or when there is none, the next unused number."""
    reg = load_registry(paths.registry)
    known = {e["version"] for e in reg.entries}
    folders = sorted((p.name for p in paths.students_dir.glob("v*") if p.is_dir() and _VERSION_RE.match(p.name)),
                     key=_number)
    for name in folders if reuse else []:
        if name not in known:
            return name
    top = max([_number(v) for v in known] + [_number(f) for f in folders] + [0])
    return version_name(top + 1)


def student_dir(paths: RunPaths, version: str) -> RunPaths:
    """`students/<version>/` as a RunPaths: checkpoints, selection ledgers, metrics, export."""
    _number(version)
    return RunPaths(paths.students_dir / version)


def register(paths: RunPaths, version: str, *, kind: str, metrics: Mapping[str, Any],
             trained_on: Mapping[str, Any] | None, parent: str | None = None,
             validation: Mapping[str, Any] | None = None, decision: str = "",
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Add (or replace) the entry of `version` with status `rejected`; `promote` makes it the
    champion. The export must already be in `students/<version>/export/`."""
    if kind not in KINDS:
        raise RegistryError(f"kind must be one of {KINDS}, got {kind!r}")
    export = student_dir(paths, version).export_dir
    if not (export / "student.safetensors").exists():
        raise RegistryError(f"{export}: no student.safetensors; export the student before registering it")
    with locked(paths.registry):
        reg = load_registry(paths.registry)
        entry = {"version": version, "kind": kind, "status": "rejected", "parent": parent, "created": _now(),
                 "promoted": None, "export": str(export.relative_to(paths.root)), "metrics": dict(metrics),
                 "trained_on": dict(trained_on) if trained_on is not None else None,
                 "validation": dict(validation) if validation is not None else None, "decision": decision,
                 "weights_sha256": weights_sha256(export), **dict(extra or {})}
        old = reg.entry(version)
        if old is not None:
            if reg.champion == version:
                raise RegistryError(f"{version} is the champion; register a new version instead")
            reg.entries.remove(old)
        reg.entries.append(entry)
        save_registry(paths.registry, reg)
    return entry


# --------------------------------------------------------------------------------------------
# skip or train, better or not
# --------------------------------------------------------------------------------------------
def needs_training(reg: Registry, state: Mapping[str, Any]) -> tuple[bool, str]:
    """(train?, why). Skip when the newest trained student (champion or rejected challenger)
    was trained on exactly this state: same pool ids, same overrides, same training config."""
    last = reg.last_trained()
    if last is None:
        return True, "no student has been trained on this run yet"
    before = last["trained_on"]
    if dict(before) == dict(state):
        return False, f"nothing new since {last['version']} (same pool, overrides and config)"
    changed = [k for k in ("ids_sha256", "overrides_sha256", "config") if before.get(k) != state.get(k)]
    what = {"ids_sha256": f"pool {before.get('rows')} -> {state.get('rows')} records",
            "overrides_sha256": "overrides changed", "config": "training config changed"}
    return True, "; ".join(what[k] for k in changed) or "state changed"


def decide(champion_score: float | None, challenger_score: float, min_delta: float = 0.0) -> tuple[bool, str]:
    """Promote iff the challenger beats the champion by more than `min_delta` on the same rows
    and metric. No champion: promote. A tie, or a challenger that cannot be scored (NaN, no
    validation rows), keeps the champion."""
    delta = f" + {min_delta}" if min_delta else ""
    if champion_score is None:
        return True, f"promoted: no champion to beat (challenger {challenger_score:.4f})"
    if challenger_score is None or math.isnan(challenger_score):
        return False, "kept champion: challenger could not be scored (no validation rows)"
    if math.isnan(champion_score):
        return True, f"promoted: champion could not be scored, challenger {challenger_score:.4f}"
    if challenger_score > champion_score + min_delta:
        return True, f"promoted: challenger {challenger_score:.4f} > champion {champion_score:.4f}{delta}"
    return False, f"kept champion: challenger {challenger_score:.4f} <= champion {champion_score:.4f}{delta}"


def evaluate_export(export_dir: str | Path, pixels: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                    class_group: np.ndarray | None = None, device: str = "cpu", batch_size: int = 512) -> float:
    """Top-1 accuracy of an exported student on `pixels[rows]` (uint8 (N, S, S, 3)) against
    `labels` (len(rows),: query labels, or the teacher's top-1 for agreement), classes in one
    group counting as equal. NaN without labelled rows."""
    import torch

    from webkd.training.export import load_student
    from webkd.training.loop import accuracy, predict_logits

    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    if not len(rows) or not (labels >= 0).any():
        return float("nan")
    dev = torch.device(device)
    model = load_student(export_dir, dev)
    logits = predict_logits(lambda x: model(x), pixels, rows, dev, batch_size)   # (n, K)
    return accuracy(logits, labels, class_group)


def export_classes(export_dir: str | Path) -> list[str] | None:
    meta = read_json(Path(export_dir) / "student.json", default=None)
    return None if meta is None else list(meta.get("classes") or [])


# --------------------------------------------------------------------------------------------
# promotion: pointer first, then the folder swap
# --------------------------------------------------------------------------------------------
def weights_sha256(export_dir: str | Path) -> str | None:
    """sha256 of an export's `student.safetensors` (None when absent): which student it is."""
    f = Path(export_dir) / "student.safetensors"
    return sha256_file(f) if f.exists() else None


def _copy_export(src: Path, dst_parent: Path, version: str, marker: bool = True) -> Path:
    """Copy `src` into a fresh hidden folder in `dst_parent` (with the version marker)."""
    tmp = dst_parent / f".export.new-{version}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    dst_parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp)
    (tmp / MARKER).unlink(missing_ok=True)
    if marker:
        atomic_write_json(tmp / MARKER, {"version": version, "copied": _now()})
    return tmp


def _clean_leftovers(paths: RunPaths) -> None:
    """Temporary export folders of an interrupted promotion (never the live export/); call it
    holding the lock, so a promotion running in another process is not disturbed."""
    for leftover in list(paths.root.glob(".export.new-*")) + list(paths.root.glob(".export.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace the folder `target` with `tmp`: two renames, the old folder deleted after."""
    replace_dir(tmp, target)


def export_complete(export_dir: str | Path) -> bool:
    """An export folder with everything `save_export` writes (weights, readable metadata, the
    ONNX file when the metadata names one). `training.export` builds exports beside their
    target and renames them in whole, so only an old or hand-made folder can be partial."""
    d = Path(export_dir)
    if not (d / "student.safetensors").is_file():
        return False
    try:
        meta = read_json(d / "student.json", default=None)
    except (ValueError, OSError):
        return False
    if not isinstance(meta, dict) or "student_spec" not in meta or "deploy" not in meta:
        return False
    onnx = (meta.get("onnx") or {}).get("file")
    return not onnx or (d / onnx).is_file()


def unregistered_version(paths: RunPaths, sha: str | None) -> str | None:
    """A `students/<version>/` the registry does not list whose export holds the weights `sha`:
    an export archived by a run killed before it registered it (reused, not left an orphan)."""
    if sha is None:
        return None
    known = {e["version"] for e in load_registry(paths.registry).entries}
    for p in sorted(paths.students_dir.glob("v*"), key=lambda p: p.name):
        if p.is_dir() and _VERSION_RE.match(p.name) and p.name not in known \
                and export_complete(p / "export") and weights_sha256(p / "export") == sha:
            return p.name
    return None


def _card_note(card: Path, entry: Mapping[str, Any]) -> None:
    """Append the registry facts (version, parent, same-split comparison) to a copied model card."""
    if not card.exists():
        return
    v = entry.get("validation") or {}
    lines = ["", "## Registry", "",
             f"- version: {entry['version']} ({entry['kind']}), warm-started from: {entry.get('parent') or '-'}",
             f"- validation split: {v.get('rows', '-')} rows (ids sha256 {str(v.get('ids_sha256', '-'))[:12]})",
             f"- {v.get('metric', 'score')} on it: this student {pct(v.get('score'))}, champion before it "
             f"{v.get('champion') or '-'} {pct(v.get('champion_score'))}",
             f"- decision: {entry.get('decision') or '-'}", ""]
    atomic_write_text(card, card.read_text().rstrip("\n") + "\n" + "\n".join(lines))


def _install(paths: RunPaths, entry: Mapping[str, Any]) -> None:
    """Copy a registered export (with marker and card note) over `<run>/export/`."""
    tmp = _copy_export(paths.root / entry["export"], paths.root, entry["version"])
    _card_note(tmp / "model_card.md", entry)
    _swap_in(tmp, paths.export_dir)


def promote(paths: RunPaths, version: str) -> Path:
    """Make `version` the champion: registry pointer (atomic), then `<run>/export/` swapped for a
    copy of `students/<version>/export/` (with a `registry_version.json` marker and a registry
    note in its model card). Returns the export folder."""
    with locked(paths.registry):
        _clean_leftovers(paths)
        reg = load_registry(paths.registry)
        entry = reg.entry(version)
        if entry is None:
            raise RegistryError(f"{version} is not registered in {paths.registry}")
        if not (paths.root / entry["export"] / "student.safetensors").exists():
            raise RegistryError(f"{paths.root / entry['export']}: the export of {version} is missing")
        previous = reg.champion
        for e in reg.entries:
            if e["version"] == previous and previous != version:
                e["status"] = "retired"
        entry["status"] = "champion"
        entry["promoted"] = _now()
        reg.champion = version
        save_registry(paths.registry, reg)                       # the switch
        _install(paths, entry)
    log.info("promoted %s (champion before: %s) -> %s", version, previous, paths.export_dir)
    return paths.export_dir


def sync_export(paths: RunPaths) -> bool:
    """Repair `<run>/export/` after a crash mid-promotion: when it is missing, incomplete or
    marked as another version than the registry's champion, copy the champion back. Returns
    True when it had to. (A complete export without a marker, or with the champion's marker but
    other weights, was written by a library `distill`: `adopt_export` takes care of that one.)"""
    with locked(paths.registry):
        _clean_leftovers(paths)
        reg = load_registry(paths.registry)
        entry = reg.champion_entry
        if entry is None:
            return False
        marker = read_json(paths.export_dir / MARKER, default=None) or {}
        complete = export_complete(paths.export_dir)
        if complete and marker.get("version") in (reg.champion, None):
            return False          # the champion, or a complete export written outside the flows (adopt_export)
        _install(paths, entry)
    log.warning("export/ did not hold the champion %s: restored it from %s", reg.champion, entry["export"])
    return True


def archive_export(paths: RunPaths, version: str, source: str | Path | None = None) -> Path:
    """Copy an export folder (default `<run>/export/`) into `students/<version>/export/`, so a
    student trained in the run directory itself has a version folder like any challenger."""
    src = Path(source) if source is not None else paths.export_dir
    if not export_complete(src):
        raise RegistryError(f"{src}: not a complete export folder (student.safetensors, student.json)")
    dst = student_dir(paths, version).export_dir
    tmp = _copy_export(src, dst.parent, version, marker=False)
    _swap_in(tmp, dst)
    return dst


def adopt_export(paths: RunPaths) -> str | None:
    """`<run>/export/` holding a student the registry does not know (made by a library-level
    `distill`, before or after the registry existed): archive and register it (kind `adopted`,
    trained_on unknown, so the next refresh trains) and make it the champion, since writing
    export/ by hand is an explicit choice. Returns the new version, or None."""
    sha = weights_sha256(paths.export_dir)
    if sha is None:
        return None
    if not export_complete(paths.export_dir):
        log.warning("%s is incomplete (an export interrupted before it was finished): not adopted",
                    paths.export_dir)
        return None
    reg = load_registry(paths.registry)
    if any(e.get("weights_sha256") == sha for e in reg.entries if e["version"] == reg.champion):
        return None
    version = unregistered_version(paths, sha)
    if version is None:
        version = allocate_version(paths, reuse=False)
        archive_export(paths, version)
    meta = read_json(paths.export_dir / "student.json", default={}) or {}
    register(paths, version, kind="adopted", metrics=meta.get("metrics", {}), trained_on=None,
             decision="promoted: adopted export/ written outside the flows")
    promote(paths, version)
    log.info("adopted %s as %s", paths.export_dir, version)
    return version


# --------------------------------------------------------------------------------------------
# ledgers that go with the champion
# --------------------------------------------------------------------------------------------
def publish_selection(src_dir: str | Path, dst_dir: str | Path, epochs: int) -> list[Path]:
    """Copy the ledgers `epoch_<k>.parquet` (k < epochs) of a promoted student into the run's
    `selection/` (atomically, one file at a time) and delete ledgers of epochs >= `epochs` there,
    which belong to an older, longer training. `src_dir == dst_dir` only prunes."""
    from webkd.pipeline.storage import atomic_path

    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    if src.resolve() != dst.resolve():
        for epoch, p in ledgers_in(src):
            if epoch < epochs:
                with atomic_path(dst / p.name, suffix=".parquet") as tmp:
                    shutil.copyfile(p, tmp)
                out.append(dst / p.name)
    for epoch, p in ledgers_in(dst):
        if epoch >= epochs:
            p.unlink(missing_ok=True)
    return out
