"""pipeline/paths.py: the ledger file names are written, parsed and listed in one place."""
from __future__ import annotations

import pytest

from webkd.pipeline.config import RunPaths as ConfigRunPaths
from webkd.pipeline.paths import LEDGER_GLOB, RunPaths, ledger_epoch, ledger_name, ledgers_in


def test_ledger_name_round_trips():
    for e in (0, 7, 42, 999, 1000, 12345):
        assert ledger_epoch(ledger_name(e)) == e
    assert ledger_name(7) == "epoch_007.parquet"
    assert ledger_name(1000) == "epoch_1000.parquet"
    with pytest.raises(ValueError):
        ledger_name(-1)


@pytest.mark.parametrize("name", ["epoch_7.parquet.tmp", ".epoch_001.parquet.abc.parquet", "epoch_.parquet",
                                  "epoch_x01.parquet", "epoch_001.json", "labels.parquet", "Epoch_001.parquet"])
def test_ledger_epoch_ignores_other_names(name):
    assert ledger_epoch(name) is None


def test_ledgers_listed_by_epoch_not_by_name(tmp_path):
    paths = RunPaths(tmp_path / "run")
    assert paths.ledgers() == [] and ledgers_in(tmp_path / "missing") == []
    paths.selection_dir.mkdir(parents=True)
    for e in (10, 2, 1000, 0):
        paths.ledger(e).write_bytes(b"x")
    (paths.selection_dir / ".epoch_003.parquet.tmp.parquet").write_bytes(b"x")   # an atomic write in flight
    (paths.selection_dir / "epoch_004.parquet").mkdir()                         # not a file
    (paths.selection_dir / "notes.txt").write_text("x")
    got = paths.ledgers()
    assert [e for e, _ in got] == [0, 2, 10, 1000]
    assert [p for _, p in got] == [paths.ledger(e) for e in (0, 2, 10, 1000)]
    assert ledgers_in(paths.selection_dir) == got
    assert all(p.match(LEDGER_GLOB) for _, p in got)


def test_config_still_exports_runpaths(tmp_path):
    assert ConfigRunPaths is RunPaths
    assert RunPaths(str(tmp_path)).ledger(1) == tmp_path / "selection" / "epoch_001.parquet"
