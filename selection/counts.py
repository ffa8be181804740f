"""The counts of a run, defined once: every report (the CLI line, the gallery summary and
`webkd inspect`, the model card's lineage, the Prefect artifacts, the registry) reads them here,
so two reports of the same run cannot disagree.

Definitions (a decision is a row's newest ledger row, as the gallery shows it):

- records: manifest rows (the pool).
- quarantined at ingest: quarantine rows written by ingest (unreadable, too small, exact
  duplicates, ...; `pipeline.records.INGEST_REASONS`). Near duplicates are marked later, by the
  index stage, and are counted apart: they are in the pool, with status `near_duplicate`.
- near-duplicates: manifest rows with status `near_duplicate`.
- kept / rejected: train-split rows with a decision, kept or not (a near duplicate in the train
  split is a rejection, reason `near_duplicate`).
- validation: validation-split rows with a decision. Held out, never trained on: they are
  neither kept nor rejected, so kept + rejected + validation = images with a decision.
- validation rows scored: `scored_validation` - the validation rows every validation score is
  computed on (the training loop's checkpoint choice, metrics.json, the registry's comparison).
- in-class / off-class queries (`QueryShare`): train rows with a decision whose web query maps to
  a teacher class (ledger `web_class >= 0`, i.e. `data.label_map` / `pipeline.records.class_index`)
  and those whose query maps to none (`web_class < 0`; rows without any query are in neither):
  how many, how many kept (share kept) and their mean curation weight (ledger `weight`).
- a collapsed class (`collapsed_classes`): a pseudo-label with at least COLLAPSE_MIN_START kept
  train images at epoch 0 that keeps fewer than max(1, COLLAPSE_SHARE x that) at a later epoch
  (so to zero when it started with fewer than 20; a class tiny from the start is never flagged).
  The training loop warns after each reselect; the run's counts list every class that collapsed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from webkd.pipeline.paths import RunPaths, ledgers_in
from webkd.pipeline.records import INGEST_REASONS, NEAR_DUPLICATE, OK, load_quarantine
from webkd.pipeline.report import pct

VAL = "val"
COLLAPSE_MIN_START = 10     # kept train images at epoch 0 below which a class is too small to judge
COLLAPSE_SHARE = 0.05       # a class keeping fewer than max(1, 5% of its epoch-0 kept) has collapsed


def scored_validation(split: Any, status: Any) -> np.ndarray:
    """(N,) bool: the validation rows that are scored - split `val` and manifest status ok.

    A near duplicate is the same picture as its group's representative (which may be a training
    row), so scoring it would count one image twice or score a trained-on image."""
    return (np.asarray(split, dtype=object) == VAL) & (np.asarray(status, dtype=object) == OK)


def kept_per_class(pseudo_label: Any, kept: Any, split: Any, num_classes: int | None = None) -> np.ndarray:
    """(K,) int64: kept train-split rows per pseudo-label (validation rows never count)."""
    pl = np.asarray(pseudo_label, dtype=np.int64)
    m = np.asarray(kept, dtype=bool) & (np.asarray(split, dtype=object) != VAL) & (pl >= 0)
    return np.bincount(pl[m], minlength=num_classes or 0)


def collapsed_classes(kept_start: Any, kept_now: Any, min_start: int = COLLAPSE_MIN_START,
                      share: float = COLLAPSE_SHARE) -> np.ndarray:
    """Classes that lost (nearly) all their kept images, the one rule every report uses:
    kept_start[c] >= min_start and kept_now[c] < max(1, share * kept_start[c]).

    kept_start, kept_now: (K,) kept train rows per pseudo-label at epoch 0 and at a later epoch
    (over the same rows). Returns the class indices, ascending."""
    a = np.asarray(kept_start, dtype=np.int64)
    b = np.asarray(kept_now, dtype=np.int64)
    k = max(len(a), len(b))
    a, b = np.pad(a, (0, k - len(a))), np.pad(b, (0, k - len(b)))
    return np.flatnonzero((a >= min_start) & (b < np.maximum(1.0, share * a)))


@dataclass(frozen=True)
class Collapse:
    """A class that lost (nearly) all its kept images (`collapsed_classes`)."""

    pseudo_label: int
    epoch: int            # first epoch it was collapsed at
    start: int            # kept train images at epoch 0 (of the rows that epoch's ledger has)
    kept: int             # kept at `epoch`
    last: int             # kept at the newest epoch counted

    def line(self, name: str) -> str:
        return (f"class {name} lost (nearly) all its kept images at epoch {self.epoch}: kept {self.start} at "
                f"epoch 0, {self.kept} at epoch {self.epoch}, {self.last} at the last epoch")


@dataclass(frozen=True)
class QueryShare:
    """Train rows with a decision of one kind of web query (in-class or off-class)."""

    images: int
    kept: int
    mean_weight: float    # NaN without images

    @property
    def share(self) -> float:
        return self.kept / self.images if self.images else float("nan")

    def text(self) -> str:
        w = "-" if self.mean_weight != self.mean_weight else f"{self.mean_weight:.3f}"
        return f"kept {self.kept} / {self.images} ({pct(self.share)}), mean weight {w}"


def query_shares_line(in_class: QueryShare, off_class: QueryShare) -> str:
    """How every report prints the two shares (inspect, curation artifact, model card)."""
    return f"in-class queries: {in_class.text()}; off-class queries: {off_class.text()}"


@dataclass(frozen=True)
class ClassTally:
    """Kept / rejected train rows of one pseudo-label and its most common rejection reason."""

    pseudo_label: int
    kept: int
    rejected: int
    top_reason: str


@dataclass(frozen=True)
class RunCounts:
    records: int
    quarantined: int                      # quarantined at ingest
    quarantine: dict[str, int]            # the same, by reason
    near_duplicates: int
    epochs: list[int]                     # ledgers the decisions come from
    images: int                           # rows with a decision = kept + rejected + validation
    kept: int
    rejected: int
    validation: int
    validation_scored: int
    per_class: list[ClassTally] = field(default_factory=list)   # by pseudo-label, train rows
    in_class: QueryShare = QueryShare(0, 0, float("nan"))       # web query maps to a teacher class
    off_class: QueryShare = QueryShare(0, 0, float("nan"))      # web query maps to none
    collapsed: list[Collapse] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def count_run(paths: RunPaths | str | Path, selection_dir: str | Path | None = None,
              last_epoch: int | None = None) -> RunCounts:
    """The counts of the run at `paths` (manifest, quarantine) with the decisions of the ledgers
    in `selection_dir` (default: the run's `selection/`; a challenger's is
    `students/<version>/selection/`) up to `last_epoch` (default: all)."""
    paths = paths if isinstance(paths, RunPaths) else RunPaths(Path(paths))
    status: dict[str, str] = {}
    if paths.manifest.exists():
        t = pq.read_table(paths.manifest, columns=["id", "status"]).to_pydict()
        status = dict(zip(t["id"], t["status"]))
    quarantine = Counter(q.reason for q in load_quarantine(paths.quarantine) if q.reason in INGEST_REASONS)

    # id -> (split, kept, reason, pseudo-label, weight, query kind: 1 in-class, 0 off-class, -1 no query)
    newest: dict[str, tuple[str, bool, str, int, float, int]] = {}
    epochs = []
    start: dict[str, tuple[bool, int, str]] | None = None        # the first ledger: id -> (kept, pl, split)
    kept_by_epoch: list[tuple[int, np.ndarray, np.ndarray]] = []  # (epoch, kept now, kept at start) per class
    for epoch, path in ledgers_in(selection_dir if selection_dir is not None else paths.selection_dir):
        if last_epoch is not None and epoch > last_epoch:
            continue
        epochs.append(epoch)
        f = pq.read_table(path)
        names = set(f.column_names)
        t = f.select([c for c in ("id", "split", "kept", "reason", "pseudo_label", "weight", "web_label", "web_class")
                      if c in names]).to_pydict()
        n = len(t["id"])
        weight = t.get("weight") or [None] * n
        web_label = t.get("web_label") or [None] * n
        web_class = t.get("web_class") or [-1] * n
        for i, s, k, r, p, w, q, c in zip(t["id"], t["split"], t["kept"], t["reason"], t["pseudo_label"],
                                          weight, web_label, web_class):
            w = float(k) if w is None or w != w else float(w)
            c = -1 if c is None else c
            newest[i] = (s, bool(k), r, int(p), w, (1 if c >= 0 else 0) if q is not None else -1)
        if start is None:
            start = {i: (bool(k), int(p), s) for i, k, p, s in zip(t["id"], t["kept"], t["pseudo_label"], t["split"])}
        else:
            now = kept_per_class(t["pseudo_label"], t["kept"], t["split"])
            was = [start[i] for i in t["id"] if i in start]
            before = kept_per_class([x[1] for x in was], [x[0] for x in was], [x[2] for x in was])
            kept_by_epoch.append((epoch, now, before))

    kept = rejected = validation = scored = 0
    tally: dict[int, list] = {}
    queries = {0: [0, 0, 0.0], 1: [0, 0, 0.0]}                   # kind -> [images, kept, weight sum]
    for i, (s, k, r, p, w, q) in newest.items():
        if s == VAL:
            validation += 1
            scored += bool(scored_validation([s], [status.get(i, OK)])[0])
            continue
        if q >= 0:
            queries[q][0] += 1
            queries[q][1] += k
            queries[q][2] += w
        c = tally.setdefault(p, [0, 0, Counter()])
        if k:
            kept += 1
            c[0] += 1
        else:
            rejected += 1
            c[1] += 1
            c[2][r] += 1
    per_class = [ClassTally(p, c[0], c[1], c[2].most_common(1)[0][0] if c[2] else "")
                 for p, c in sorted(tally.items())]
    share = {q: QueryShare(v[0], v[1], v[2] / v[0] if v[0] else float("nan")) for q, v in queries.items()}
    return RunCounts(records=len(status), quarantined=sum(quarantine.values()), quarantine=dict(quarantine),
                     near_duplicates=sum(s == NEAR_DUPLICATE for s in status.values()), epochs=epochs,
                     images=len(newest), kept=kept, rejected=rejected, validation=validation,
                     validation_scored=scored, per_class=per_class, in_class=share[1], off_class=share[0],
                     collapsed=_collapses(kept_by_epoch))


def _collapses(kept_by_epoch: list[tuple[int, np.ndarray, np.ndarray]]) -> list[Collapse]:
    """Every class that collapsed at some epoch after the first: its first such epoch."""
    found: dict[int, Collapse] = {}
    for epoch, now, before in kept_by_epoch:
        for c in collapsed_classes(before, now).tolist():
            if c not in found:
                found[c] = Collapse(c, epoch, int(before[c]), int(now[c]) if c < len(now) else 0, 0)
    if not kept_by_epoch:
        return []
    last = kept_by_epoch[-1][1]
    return [Collapse(c.pseudo_label, c.epoch, c.start, c.kept, int(last[p]) if (p := c.pseudo_label) < len(last) else 0)
            for _, c in sorted(found.items())]
