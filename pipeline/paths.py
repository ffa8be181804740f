"""`RunPaths`: every file name in a run directory, defined once.

Stages hand each other a run directory; each artifact's name is a property or method here, so
no other module spells a file name. The decision ledgers are the one family of names with a
number in them: `ledger_name(epoch)` writes it, `ledger_epoch(name)` reads it back, and
`ledgers_in(folder)` / `RunPaths.ledgers()` list the ledgers present, sorted by epoch (also in
a student's `students/<version>/selection/`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LEDGER_GLOB = "epoch_*.parquet"
STUDENT_PREDICTIONS = "student_predictions.parquet"   # in an export folder: the exported student's predictions
_LEDGER_RE = re.compile(r"^epoch_(\d+)\.parquet$")


def ledger_name(epoch: int) -> str:
    """The file name of epoch `epoch`'s ledger: `epoch_007.parquet` (three digits at least)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return f"epoch_{int(epoch):03d}.parquet"


def ledger_epoch(name: str | Path) -> int | None:
    """The epoch of a ledger file name (`epoch_007.parquet` -> 7); None for any other name."""
    m = _LEDGER_RE.match(Path(name).name)
    return int(m.group(1)) if m else None


def ledgers_in(folder: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every ledger file in `folder`, oldest epoch first ([] without the folder)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    found = [(e, p) for p in d.glob(LEDGER_GLOB) if (e := ledger_epoch(p.name)) is not None and p.is_file()]
    return sorted(found)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.parquet"

    @property
    def ingest_state(self) -> Path:
        """Source listings already seen (uri -> size, mtime, id) for incremental ingest."""
        return self.root / "ingest_state.parquet"

    @property
    def ingest_shards(self) -> Path:
        """Tar shards listed by the last ingest round (`sources.ShardMemo`), committed with the state."""
        return self.root / "ingest_shards.json"

    @property
    def ingest_stage(self) -> Path:
        """`.ingest_round/`: one ingest round's manifest, quarantine and state (or the pixel stage's
        `source_missing` marks in manifest and quarantine) before they are committed together
        (`pipeline.storage.commit_files`); absent between rounds."""
        return self.root / ".ingest_round"

    @property
    def lock(self) -> Path:
        """`run.lock`: the run directory's writer lock (`pipeline.storage.run_lock`); who holds it
        is in `run.lock.json` beside it."""
        return self.root / "run.lock"

    @property
    def test_dir(self) -> Path:
        """`test/`: data.test_source ingested as a run of its own (manifest, pixel cache, features)."""
        return self.root / "test"

    def eval_set(self, source: str) -> Path:
        """`eval/<12 hex>/`: one data.decontaminate source ingested as a run of its own (named by a
        hash of the source string)."""
        import hashlib

        return self.root / "eval" / hashlib.sha256(source.encode()).hexdigest()[:12]

    @property
    def eval_duplicates(self) -> Path:
        """`eval_duplicates.parquet`: one row per (pool row, method) match against an evaluation
        image: the evidence behind each eval_duplicate status (pipeline/decontam.py)."""
        return self.root / "eval_duplicates.parquet"

    @property
    def decontam_stage(self) -> Path:
        """`.decontam_round/`: the decontamination stage's manifest, quarantine and evidence before
        they are committed together (`pipeline.storage.commit_files`); absent between rounds."""
        return self.root / ".decontam_round"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def features(self, key: str) -> Path:
        return self.features_dir / f"{key}.npy"

    def logits(self, key: str) -> Path:
        return self.features_dir / f"{key}.logits.npy"

    def features_meta(self, key: str) -> Path:
        return self.features_dir / f"{key}.json"

    def pixels(self, size: int, fit: str) -> Path:
        return self.root / "pixels" / f"rgb{size}_{fit}.npy"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    def index(self, key: str) -> Path:
        return self.index_dir / f"{key}.faiss"

    @property
    def selection_dir(self) -> Path:
        return self.root / "selection"

    def ledger(self, epoch: int) -> Path:
        """`selection/epoch_<kkk>.parquet`: the decision ledger of one epoch."""
        return self.selection_dir / ledger_name(epoch)

    def ledgers(self) -> list[tuple[int, Path]]:
        """(epoch, path) of every ledger in `selection/`, oldest epoch first."""
        return ledgers_in(self.selection_dir)

    @property
    def labels(self) -> Path:
        """Refined labels (PLL two-hot): id, refined_label, pair_1, pair_2, agree."""
        return self.root / "labels.parquet"

    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    @property
    def gallery_dir(self) -> Path:
        return self.root / "gallery"

    @property
    def gallery(self) -> Path:
        return self.gallery_dir / "index.html"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints_dir / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints_dir / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def export_stage(self) -> Path:
        """`.export.build/`: an export being written; renamed to `export/` only when complete."""
        return self.root / ".export.build"

    @property
    def student_predictions(self) -> Path:
        """`export/student_predictions.parquet`: the exported student's prediction per pool image
        (id, student_pred, student_conf), written at export, copied with the champion's export."""
        return self.export_dir / STUDENT_PREDICTIONS

    @property
    def overrides(self) -> Path:
        return self.root / "overrides.json"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def students_dir(self) -> Path:
        return self.root / "students"
