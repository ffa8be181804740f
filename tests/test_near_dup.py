"""Near duplicates at scale (pipeline/near_dup.py): the IVF search past near_dup_exact_max finds
the same groups as the exact one on real photos with planted copies, and a refresh groups only
the new rows without changing any old mark."""
from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from webkd.pipeline import near_dup
from webkd.pipeline.config import IndexConfig, RunPaths
from webkd.pipeline.index_stage import index_run
from webkd.pipeline.records import NEAR_DUPLICATE, Record, load_manifest, load_quarantine, save_manifest
from webkd.pipeline.storage import atomic_save_npy


def _copy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A re-upload: JPEG re-encoded at a random quality, sometimes a little brighter."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    out = np.asarray(Image.open(buf).convert("RGB")).astype(np.int16)
    if rng.random() < 0.5:
        out += 6
    return np.clip(out, 0, 255).astype(np.uint8)


def _pool(images: np.ndarray, n: int, n_copies: int, seed: int, start_img: int = 0,
          old: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n distinct real photos from images[start_img:] with n_copies copies of earlier rows (of
    `old` + the new rows) inserted after their originals; (pixels, source row of each copy or -1)."""
    rng = np.random.default_rng(seed)
    base = list(images[start_img:start_img + n])
    prev = [] if old is None else list(old)
    rows, src = list(base), [-1] * n
    for _ in range(n_copies):
        at = int(rng.integers(1, len(rows) + 1))
        j = int(rng.integers(0, len(prev) + at))             # any earlier row, old or new
        orig = prev[j] if j < len(prev) else rows[j - len(prev)]
        rows.insert(at, _copy(orig, rng))
        src.insert(at, j)
    return np.stack(rows), np.asarray(src)


def _records(pixels: np.ndarray, start: int, batch: int) -> list[Record]:
    return [Record(id=hashlib.sha256(p.tobytes() + bytes([batch])).hexdigest(), uri=f"web/q/img_{start + i:05d}.png",
                   source="folder:web", web_label="q", web_labels=["q"], width=32, height=32, format="PNG",
                   mode="RGB", batch=batch) for i, p in enumerate(pixels)]


def _run(paths: RunPaths, pixels: np.ndarray, records: list[Record], cfg: IndexConfig):
    save_manifest(paths.manifest, records)
    emb = np.random.default_rng(0).standard_normal((len(records), 8)).astype(np.float16)
    atomic_save_npy(paths.features("k"), emb)
    return index_run(paths, "k", cfg, pixels=pixels)


def _marks(paths: RunPaths) -> list[tuple[str, str | None]]:
    return [(r.status, r.dup_of) for r in load_manifest(paths.manifest)]


@pytest.fixture(scope="module")
def photos(pacs32):
    """1,400 real photos (PACS photo domain, 32 px, then the other domains)."""
    photo = pacs32.domains == pacs32.domain_names.index("photo")
    order = np.concatenate([np.flatnonzero(photo), np.flatnonzero(~photo)])
    return np.asarray(pacs32.images[order[:1400]], np.uint8)


def test_ivf_search_finds_the_exact_groups_and_refresh_groups_only_new_rows(tmp_path, photos, monkeypatch):
    th = 0.97
    exact = IndexConfig(near_dup_threshold=th, near_dup_exact_max=10**6)
    ivf = IndexConfig(near_dup_threshold=th, near_dup_exact_max=300, near_dup_nprobe=8)
    pix, src = _pool(photos, 1000, 60, seed=1)
    recs = _records(pix, 0, batch=0)

    a, b = RunPaths(tmp_path / "exact"), RunPaths(tmp_path / "ivf")
    ra = _run(a, pix, [dataclasses.replace(r) for r in recs], exact)
    rb = _run(b, pix, [dataclasses.replace(r) for r in recs], ivf)
    assert ra.near_dup.meta["factory"] == "Flat" and rb.near_dup.meta["factory"].startswith("IVF")
    assert rb.near_dup.meta["factory"].endswith(",SQ8") and rb.near_dup.action == "full"
    assert _marks(a) == _marks(b)
    # every planted copy is found (joined to its original's group); the distinct photos are not merged much
    man = load_manifest(b.manifest)
    dups = [i for i, r in enumerate(man) if r.status == NEAR_DUPLICATE]
    assert {i for i in np.flatnonzero(src >= 0)} <= set(dups)
    assert len(dups) <= 60 + 10
    assert sum(q.reason == NEAR_DUPLICATE for q in load_quarantine(b.quarantine)) == len(dups)

    # refresh: 300 new photos and 30 copies (of old and new rows) appended
    pix2, src2 = _pool(photos, 300, 30, seed=2, start_img=1000, old=pix)
    recs2 = _records(pix2, len(pix), batch=1)
    grown = np.concatenate([pix, pix2])
    before = _marks(b)
    rb2 = _run(b, grown, load_manifest(b.manifest) + recs2, ivf)
    assert rb2.near_dup.action == "incremental" and rb2.near_dup.new_rows == len(pix2)
    assert _marks(b)[:len(pix)] == before                  # old marks untouched
    new_copies = len(pix) + np.flatnonzero(src2 >= 0)
    assert all(_marks(b)[i][0] == NEAR_DUPLICATE for i in new_copies)
    # ... and they are what grouping the whole grown pool from scratch gives
    c = RunPaths(tmp_path / "exact_grown")
    _run(c, grown, [dataclasses.replace(r) for r in recs + recs2], exact)
    assert _marks(c) == _marks(b)
    q = load_quarantine(b.quarantine)
    assert sorted(r.id for r in q if r.reason == NEAR_DUPLICATE) == \
        sorted(r.id for r in load_manifest(b.manifest) if r.status == NEAR_DUPLICATE)

    # a run killed after the index file but before its sidecar: the next run groups every row again
    more = _records(photos[1300:1340], len(grown), batch=2)
    grown2 = np.concatenate([grown, photos[1300:1340]])

    def killed(plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(near_dup, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(b, grown2, load_manifest(b.manifest) + more, ivf)
    monkeypatch.undo()
    again = index_run(b, "k", ivf, pixels=grown2)
    assert again.near_dup.action == "full" and "sidecar" in again.near_dup.why
    d = RunPaths(tmp_path / "exact_grown2")
    _run(d, grown2, [dataclasses.replace(r) for r in recs + recs2 + more], exact)
    assert _marks(d) == _marks(b)


def test_near_duplicates_off_forgets_the_saved_search(tmp_path, photos):
    pix, _ = _pool(photos, 200, 10, seed=3)
    paths = RunPaths(tmp_path / "run")
    rep = _run(paths, pix, _records(pix, 0, 0), IndexConfig(near_dup_threshold=0.97))
    assert rep.near_duplicates >= 10 and near_dup.near_dup_path(paths, "k", "pixels").exists()
    off = index_run(paths, "k", IndexConfig(near_dup_threshold=None), pixels=pix)
    assert off.near_duplicates == 0 and off.near_dup is None
    assert not near_dup.near_dup_path(paths, "k", "pixels").exists()
    assert all(s == "ok" for s, _ in _marks(paths))


def test_marks_changed_since_the_saved_grouping_are_regrouped(tmp_path, photos):
    """A near duplicate that left the candidates and came back as ok (pixel stage: source_missing,
    then its file back) must not become a leader because a refresh trusted the manifest."""
    cfg = IndexConfig(near_dup_threshold=0.97)
    pix, src = _pool(photos, 300, 12, seed=4)
    paths = RunPaths(tmp_path / "run")
    _run(paths, pix, _records(pix, 0, 0), cfg)
    man = load_manifest(paths.manifest)
    row = int(np.flatnonzero(src >= 0)[0])
    assert man[row].status == NEAR_DUPLICATE
    man[row].status, man[row].dup_of = "ok", None
    more = photos[1300:1320]
    report = _run(paths, np.concatenate([pix, more]), man + _records(more, len(pix), 1), cfg)
    assert report.near_dup.action == "full" and "marks" in report.near_dup.why
    assert load_manifest(paths.manifest)[row].status == NEAR_DUPLICATE
