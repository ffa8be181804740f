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

VAL = "val"


def scored_validation(split: Any, status: Any) -> np.ndarray:
    """(N,) bool: the validation rows that are scored - split `val` and manifest status ok.

    A near duplicate is the same picture as its group's representative (which may be a training
    row), so scoring it would count one image twice or score a trained-on image."""
    return (np.asarray(split, dtype=object) == VAL) & (np.asarray(status, dtype=object) == OK)


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

    newest: dict[str, tuple[str, bool, str, int]] = {}     # id -> (split, kept, reason, pseudo-label)
    epochs = []
    for epoch, path in ledgers_in(selection_dir if selection_dir is not None else paths.selection_dir):
        if last_epoch is not None and epoch > last_epoch:
            continue
        epochs.append(epoch)
        t = pq.read_table(path, columns=["id", "split", "kept", "reason", "pseudo_label"]).to_pydict()
        for i, s, k, r, p in zip(t["id"], t["split"], t["kept"], t["reason"], t["pseudo_label"]):
            newest[i] = (s, bool(k), r, int(p))                 # a newer epoch overwrites

    kept = rejected = validation = scored = 0
    tally: dict[int, list] = {}
    for i, (s, k, r, p) in newest.items():
        if s == VAL:
            validation += 1
            scored += bool(scored_validation([s], [status.get(i, OK)])[0])
            continue
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
    return RunCounts(records=len(status), quarantined=sum(quarantine.values()), quarantine=dict(quarantine),
                     near_duplicates=sum(s == NEAR_DUPLICATE for s in status.values()), epochs=epochs,
                     images=len(newest), kept=kept, rejected=rejected, validation=validation,
                     validation_scored=scored, per_class=per_class)
