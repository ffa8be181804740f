"""Caches are checked before they are used, and a full disk or a kill leaves nothing behind
(issue 12, items 5, 8 and 9), on real image files ingested by the real ingest:

- same-size corruption of the pixel cache or of `features/*.logits.npy` is found by the block
  checksums on load: only the damaged rows are decoded / encoded again, one warning names the cache;
- a truncated pixel or feature sidecar JSON rebuilds the cache instead of a JSONDecodeError;
- source files deleted after ingest are not black training rows: they are quarantined
  (`source_missing`, manifest status + quarantine row) and left out of the pool's candidates and of
  the teacher's selection; restored, they come back;
- a real SIGKILL in the pixel stage (and in the feature stage) leaves a full-size temp file; the
  next write of that cache (or any command's run lock) removes it, never a live writer's;
- disk full on a real small tmpfs (a mount namespace, `unshare -rm`; skipped where the kernel
  refuses it): `webkd features` ends with one line "disk full: need N MB at PATH", exit 2, and
  no temp file; an ENOSPC in the middle of a write is the same line.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from webkd.pipeline import npyfile
from webkd.pipeline.config import IngestConfig, ModelSpec, PreprocessSpec, RunPaths
from webkd.pipeline.features import extract_features, load_features
from webkd.pipeline.ingest import run_ingest
from webkd.pipeline.pixels import build_pixel_cache, pixel_cache, pixel_meta_path
from webkd.pipeline.records import OK, SOURCE_MISSING, load_manifest, load_quarantine
from webkd.pipeline.storage import clean_stale_temps, run_lock
from webkd.training import models as M

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _direct(uri: str, size: int) -> np.ndarray:
    """Independent decode of a real file: Pillow, RGB, Lanczos squash."""
    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.LANCZOS))


def _write(root: Path, clothing, n: int, offset: int = 0) -> Path:
    from conftest import write_query_folder

    idx = np.arange(offset, offset + n)
    write_query_folder(root, clothing.images[idx], clothing.labels[idx], list(clothing.class_names))
    return root


def _ingest(src: Path, run: Path) -> list:
    run_ingest([f"folder:{src}"], RunPaths(run), IngestConfig(min_side=1), workers=1)
    return load_manifest(RunPaths(run).manifest)


def _flip(path: Path, offset: int, count: int = 64) -> None:
    """Same-size corruption: `count` bytes at `offset` inverted in place."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(255 - b for b in data))
    assert path.stat().st_size == size


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


@pytest.fixture
def small_blocks(monkeypatch):
    """8 KiB checksum blocks (4 MiB in use), so a cache of a few dozen images has several."""
    monkeypatch.setattr(npyfile, "BLOCK", 8192)


# --------------------------------------------------------------------------------------------
# item 5: checksums
# --------------------------------------------------------------------------------------------
def test_same_size_corruption_of_the_pixel_cache_is_found_and_only_its_rows_decoded(clothing, tmp_path,
                                                                                     small_blocks, caplog):
    records = _ingest(_write(tmp_path / "web", clothing, 40), tmp_path / "run")
    path = RunPaths(tmp_path / "run").pixels(32, "squash")
    first = np.array(build_pixel_cache(records, path, 32, "squash", workers=1))
    for i in (0, 17, len(records) - 1):
        np.testing.assert_array_equal(first[i], _direct(records[i].uri, 32))
    assert len(json.loads(pixel_meta_path(path).read_text())["checksum"]["crc"]) > 3

    # rows 30.. are in the last blocks; delete an early row's file: it must not be needed
    row_bytes = 32 * 32 * 3
    header = path.stat().st_size - len(records) * row_bytes
    _flip(path, header + 30 * row_bytes + 100)
    gone = Path(records[2].uri)
    saved = gone.read_bytes()
    gone.unlink()
    caplog.set_level(logging.WARNING)
    again = build_pixel_cache(records, path, 32, "squash", workers=1)
    np.testing.assert_array_equal(again, first)                       # repaired, row 2 copied, not decoded
    warned = [r.getMessage() for r in caplog.records if "rebuilt" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0] and "do not match their checksums" in warned[0]
    assert json.loads(pixel_meta_path(path).read_text())["failed"] == []
    gone.write_bytes(saved)

    # a file of another size (truncated) is damage to every row: all decoded again
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 10)
    np.testing.assert_array_equal(build_pixel_cache(records, path, 32, "squash", workers=1), first)

    # no corruption: verified and used as is
    caplog.clear()
    np.testing.assert_array_equal(build_pixel_cache(records, path, 32, "squash", workers=1), first)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return M.build_model(ModelSpec(name="cnn_tiny", preprocess=PreprocessSpec(size=32)), num_classes=7).eval()


def test_same_size_corruption_of_the_logits_is_recomputed_from_the_damaged_row(clothing, tmp_path, monkeypatch,
                                                                                  caplog):
    monkeypatch.setattr(npyfile, "BLOCK", 512)      # feature rows are small: 512-byte checksum blocks
    records = _ingest(_write(tmp_path / "web", clothing, 40), tmp_path / "run")
    paths = RunPaths(tmp_path / "run")
    pix = build_pixel_cache(records, paths.pixels(32, "squash"), 32, "squash", workers=1)
    model = _encoder()
    ids = [r.id for r in records]
    fc = extract_features(model, pix, "t", "fp", paths, batch_size=8, device="cpu", row_ids=ids)
    want_e, want_z = np.array(fc.embeddings), np.array(fc.logits)
    assert json.loads(paths.features_meta("t").read_text())["checksums"]["logits"]["crc"]

    def first_bad(path: Path, row_bytes: int, at_row: int) -> int:
        """Flip bytes inside row `at_row` of the array at `path`; the first row of that block."""
        header = path.stat().st_size - len(records) * row_bytes
        _flip(path, header + at_row * row_bytes + 2, 4)
        return ((at_row * row_bytes + 2) // 512) * 512 // row_bytes

    # logits (7 classes, float16): a late row damaged; never used damaged, re-encoded from its block
    start = first_bad(paths.logits("t"), 7 * 2, 38)
    assert 0 < start <= 38
    caplog.set_level(logging.WARNING)
    assert load_features(paths, "t") is None
    assert any("t.logits.npy" in r.getMessage() and "do not match" in r.getMessage() for r in caplog.records)
    fc2 = extract_features(model, pix, "t", "fp", paths, batch_size=8, device="cpu", row_ids=ids)
    assert fc2.computed == len(records) - start
    np.testing.assert_allclose(np.asarray(fc2.logits, np.float32), want_z.astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(fc2.logits[:start], want_z[:start])

    # embeddings: the same, from the damaged block of that file
    start = first_bad(paths.features("t"), want_e.shape[1] * 2, 30)
    assert 0 < start <= 30
    fc3 = extract_features(model, pix, "t", "fp", paths, batch_size=8, device="cpu", row_ids=ids)
    assert fc3.computed == len(records) - start
    np.testing.assert_allclose(np.asarray(fc3.embeddings, np.float32), want_e.astype(np.float32), atol=2e-3)
    assert extract_features(model, pix, "t", "fp", paths, batch_size=8, device="cpu", row_ids=ids).computed == 0


def test_verify_cost_on_a_60k_pixel_cache(tmp_path):
    """The load-time check of a 60k x 32x32x3 uint8 cache (184 MB) stays cheap (measured ~0.15 s)."""
    a = np.random.default_rng(0).integers(0, 256, (60_000, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "pix.npy"
    with open(path, "wb") as fh:
        w = npyfile.NpyWriter(fh, a.shape, np.uint8)
        for s in range(0, len(a), 4096):
            w.write(a[s:s + 4096])
        checks = w.checks()
    np.testing.assert_array_equal(np.load(path, mmap_mode="r")[12345], a[12345])
    npyfile.verify_npy(path, checks, len(a))                           # warm the page cache
    t = time.perf_counter()
    assert npyfile.verify_npy(path, checks, len(a)) is None
    spent = time.perf_counter() - t
    print(f"verify 60k x 32x32x3 uint8 ({path.stat().st_size / 2**20:.0f} MB): {spent:.3f} s")
    assert spent < 3.0
    _flip(path, path.stat().st_size - 5000, 1)
    d = npyfile.verify_npy(path, checks, len(a))
    row = 32 * 32 * 3
    assert d is not None and d.first_row == (len(checks["crc"]) - 1) * npyfile.BLOCK // row
    assert d.bad_rows[-1] == len(a) - 1 and len(d.bad_rows) <= npyfile.BLOCK // row + 2


# --------------------------------------------------------------------------------------------
# item 8: damaged sidecars rebuild
# --------------------------------------------------------------------------------------------
def test_truncated_sidecars_rebuild_the_cache(clothing, tmp_path, caplog):
    records = _ingest(_write(tmp_path / "web", clothing, 12), tmp_path / "run")
    paths = RunPaths(tmp_path / "run")
    path = paths.pixels(32, "squash")
    first = np.array(build_pixel_cache(records, path, 32, "squash", workers=1))
    meta = pixel_meta_path(path)
    meta.write_text(meta.read_text()[:25])
    caplog.set_level(logging.WARNING)
    np.testing.assert_array_equal(build_pixel_cache(records, path, 32, "squash", workers=1), first)
    assert json.loads(meta.read_text())["rows"] == len(records)
    assert any("damaged" in r.getMessage() and str(meta) in r.getMessage() for r in caplog.records)

    pix = np.load(path, mmap_mode="r")
    model = _encoder()
    want = np.array(extract_features(model, pix, "t", "fp", paths, batch_size=8, device="cpu").logits)
    side = paths.features_meta("t")
    side.write_text(side.read_text()[: len(side.read_text()) // 2])
    assert load_features(paths, "t") is None
    again = extract_features(model, pix, "t", "fp", paths, batch_size=8, device="cpu")
    assert again.computed == len(records)
    np.testing.assert_array_equal(again.logits, want)


# --------------------------------------------------------------------------------------------
# item 5: a source file gone since ingest
# --------------------------------------------------------------------------------------------
def test_deleted_sources_are_quarantined_not_black_training_rows(clothing, tmp_path):
    from webkd.flows.stages.curate import features, teacher_selection
    from webkd.pipeline.config import load_config
    from webkd.training.pool import build_pool

    names = list(clothing.class_names)
    classes = ["dress", "pants"]
    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:10] for c in classes])
    from conftest import write_query_folder

    files = write_query_folder(tmp_path / "web", clothing.images[idx], clothing.labels[idx], names)
    cfg_d = {"run_dir": str(tmp_path / "run"), "seed": 1,
             "data": {"sources": [f"folder:{tmp_path / 'web'}"], "classes": classes, "image_size": 32,
                      "val_fraction": 0.25},
             "teachers": [{"key": "t", "name": "cnn_tiny"}], "student": {"key": "s", "name": "cnn_tiny"},
             "selection": {"mode": "none"}, "train": {"method": "kd", "epochs": 1, "batch_size": 8}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg_d))
    cfg = load_config(str(tmp_path / "cfg.yaml"), [])
    records = _ingest(tmp_path / "web", tmp_path / "run")
    paths = RunPaths(tmp_path / "run")
    assert len(records) == 20

    deleted = files[3:8]
    saved = {p: p.read_bytes() for p in deleted}
    for p in deleted:
        p.unlink()
    features(cfg)                                  # the pixel stage finds them gone
    gone_ids = {r.id for r in records if Path(r.uri) in saved}
    manifest = {r.id: r.status for r in load_manifest(paths.manifest)}
    assert {i for i, s in manifest.items() if s == SOURCE_MISSING} == gone_ids
    q = [row for row in load_quarantine(paths.quarantine) if row.reason == SOURCE_MISSING]
    assert {row.id for row in q} == gone_ids and all("gone" in row.detail for row in q)

    pool = build_pool(paths, cfg.data, ["t"])
    assert len(pool) == 20                          # still row-aligned with every cache
    missing = np.array([i in gone_ids for i in pool.ids])
    assert not (pool.candidates & missing).any() and not np.isin(pool.validation_rows, np.flatnonzero(missing)).any()
    teacher_selection(cfg)                          # selection.mode none: every candidate is kept
    ledger = pq.read_table(paths.ledger(0)).to_pydict()
    by_id = dict(zip(ledger["id"], zip(ledger["kept"], ledger["reason"])))
    assert all(not by_id[i][0] and by_id[i][1] in (SOURCE_MISSING, "validation") for i in gone_ids)
    assert any(by_id[i][1] == SOURCE_MISSING for i in gone_ids)
    assert sum(k for k, _ in by_id.values()) == int(pool.candidates.sum()) > 0

    # again: nothing changes (no second quarantine row)
    features(cfg)
    assert len([r for r in load_quarantine(paths.quarantine) if r.reason == SOURCE_MISSING]) == len(gone_ids)

    # the files come back: decoded, back to ok, their quarantine rows gone
    for p, data in saved.items():
        p.write_bytes(data)
    pix = pixel_cache(paths, load_manifest(paths.manifest), 32, "squash")
    assert all(r.status == OK for r in load_manifest(paths.manifest))
    assert not [r for r in load_quarantine(paths.quarantine) if r.reason == SOURCE_MISSING]
    for i, r in enumerate(records):
        if r.id in gone_ids:
            np.testing.assert_array_equal(pix[i], _direct(r.uri, 32))


# --------------------------------------------------------------------------------------------
# item 9: kills leave temp files, the next run removes them
# --------------------------------------------------------------------------------------------
PIXELS_CHILD = """
import sys
from webkd.pipeline.config import RunPaths
from webkd.pipeline.pixels import build_pixel_cache
from webkd.pipeline.records import load_manifest
paths = RunPaths(sys.argv[1])
build_pixel_cache(load_manifest(paths.manifest), paths.pixels(64, "squash"), 64, "squash", workers=1, block=64)
"""

FEATURES_CHILD = """
import sys, time, numpy as np, torch
from webkd.pipeline import npyfile
# the features stage writes its arrays only in the final merge (shards are encoded first), a window
# too short to kill in reliably on an idle machine: the child pauses after its first rows reach the
# temp file, so the SIGKILL lands mid-write every time (a real kill of a real process, on real files)
_write = npyfile.NpyWriter.write
def _write_then_pause(self, rows):
    _write(self, rows)
    self.fh.flush()
    time.sleep(60)
npyfile.NpyWriter.write = _write_then_pause
from webkd.pipeline.config import ModelSpec, PreprocessSpec, RunPaths
from webkd.pipeline.features import extract_features
from webkd.training import models as M
torch.set_num_threads(1)
paths = RunPaths(sys.argv[1])
pix = np.load(paths.pixels(64, "squash"), mmap_mode="r")
model = M.build_model(ModelSpec(name="cnn_tiny", preprocess=PreprocessSpec(size=64)), num_classes=10).eval()
extract_features(model, pix, "t", "fp", paths, batch_size=16, device="cpu")
"""


def _kill_when_temp_grows(code: str, run: Path, folder: Path, min_bytes: int) -> Path:
    """Run `code` in a real process, SIGKILL it once its temp file in `folder` holds `min_bytes`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            big = [t for t in _temps(folder) if t.stat().st_size >= min_bytes] if folder.exists() else []
            if big:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                return big[0]
            time.sleep(0.01)
        raise AssertionError(f"no temp file of {min_bytes} bytes before the process ended: {p.communicate()[1][-2000:]}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigkill_in_the_pixel_and_feature_stages_leaves_temps_the_next_run_removes(clothing, tmp_path):
    n = 1200
    records = _ingest(_write(tmp_path / "web", clothing, n), tmp_path / "run")
    paths = RunPaths(tmp_path / "run")
    pixels_dir = paths.pixels(64, "squash").parent

    temp = _kill_when_temp_grows(PIXELS_CHILD, paths.root, pixels_dir, 2 << 20)
    assert temp.exists() and not paths.pixels(64, "squash").exists()  # killed mid-write: a big temp, no cache
    # a live writer's temp is never taken: a temp named after a running process stays
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = pixels_dir / f".rgb64_squash.npy.tmp{live.pid}.abc.npy"
        other.write_bytes(b"x")
        pix = build_pixel_cache(records, paths.pixels(64, "squash"), 64, "squash", workers=2)
        assert not temp.exists() and other.exists()
    finally:
        live.kill()
        live.wait()
    assert pix.shape == (n, 64, 64, 3)
    np.testing.assert_array_equal(pix[n - 1], _direct(records[n - 1].uri, 64))

    ftemp = _kill_when_temp_grows(FEATURES_CHILD, paths.root, paths.features_dir, 1)
    assert ftemp.exists() and not paths.features("t").exists()
    with run_lock(paths.lock, "test"):               # every writing command cleans at start
        pass
    assert not _temps(paths.root)                    # the pixel temp of the (now dead) sleeper too
    assert clean_stale_temps(paths.root) == []


# --------------------------------------------------------------------------------------------
# item 9: a real full disk (a small tmpfs in a private mount namespace)
# --------------------------------------------------------------------------------------------
DISK_CHILD = r"""
import json, os, subprocess, sys
from pathlib import Path
cfg, mnt, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
res = {}
env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
for verb in ("ingest", "features"):
    p = subprocess.run([sys.executable, "-m", "webkd.flows", verb, cfg], env=env, capture_output=True, text=True)
    res[verb] = {"rc": p.returncode, "stderr": p.stderr}
res["after_features"] = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file())
from webkd.pipeline.storage import DiskFull, atomic_write_bytes
try:
    atomic_write_bytes(mnt / "run" / "big.bin", b"\0" * (8 << 20))   # no precheck: ENOSPC mid-write
    res["enospc"] = "written"
except DiskFull as exc:
    res["enospc"] = str(exc)
res["after_enospc"] = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file())
out.write_text(json.dumps(res))
"""


def _small_fs_command(mnt: Path, size: str) -> list[str] | None:
    """A command prefix that runs the rest inside a private mount namespace with a `size` tmpfs on
    `mnt` (root: plain unshare -m; else a user namespace, unshare -rm), or None where refused."""
    if not shutil.which("unshare"):
        return None
    for flags in (["-m"], ["-rm"]) if os.geteuid() == 0 else (["-rm"],):
        probe = subprocess.run(["unshare", *flags, "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {mnt}"],
                               capture_output=True)
        if probe.returncode == 0:
            return ["unshare", *flags, "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs {mnt} && exec "$@"', "sh"]
    return None


def test_disk_full_is_one_line_and_leaves_no_temp_file(clothing, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    prefix = _small_fs_command(mnt, "2m")
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (no root and no unprivileged user+mount namespaces): "
                    "the disk-full path is covered only where it can be made real")
    _write(tmp_path / "web", clothing, 200)          # 200 x 64x64x3 = 2.4 MB of pixels: more than the disk
    cfg = {"run_dir": str(mnt / "run"), "data": {"sources": [f"folder:{tmp_path / 'web'}"],
                                                 "classes": list(clothing.class_names), "image_size": 64},
           "teachers": [{"key": "t", "name": "cnn_tiny"}], "student": {"key": "s", "name": "cnn_tiny"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([*prefix, sys.executable, "-c", DISK_CHILD, str(tmp_path / "cfg.yaml"), str(mnt),
                        str(tmp_path / "res.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["ingest"]["rc"] == 0, res["ingest"]["stderr"][-2000:]
    feat = res["features"]
    lines = [ln for ln in feat["stderr"].splitlines() if ln.startswith("webkd features:")]
    assert feat["rc"] == 2 and len(lines) == 1, feat["stderr"][-3000:]
    assert "Traceback" not in feat["stderr"]
    assert lines[0].startswith("webkd features: disk full: need 2.3 MB at ") and "pixels/rgb64_squash.npy" in lines[0]
    assert not [f for f in res["after_features"] if ".tmp" in f or f.startswith("run/pixels/rgb")]
    assert res["enospc"].startswith("disk full: need more than ") and "big.bin" in res["enospc"]
    assert not [f for f in res["after_enospc"] if "big.bin" in f]
