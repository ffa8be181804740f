"""Ingest on real image files: four source kinds agree, a corpus of bad/odd files, incremental.

Images are real photos from ../shared/data (clothing-dataset-small via the `clothing`
fixture, PACS JPEGs via `pacs_jpeg`), written as JPEG/PNG/GIF/WebP/TIFF files into tmp folders.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from webkd.pipeline import ingest
from webkd.pipeline.config import IngestConfig, RunPaths
from webkd.pipeline.ingest import Rejected, decode_image, load_rgb, run_ingest, to_rgb
from webkd.pipeline.records import REASONS, load_manifest, load_quarantine, read_bytes


# --------------------------------------------------------------------------------------------
# helpers: real photos -> encoded files
# --------------------------------------------------------------------------------------------
def encode(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mad(a, b) -> float:
    """Mean absolute difference of two uint8 images."""
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A ~100-byte PNG whose header claims width x height 1-bit pixels (no pixel data behind it)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def photos(clothing) -> list[tuple[np.ndarray, str]]:
    """12 real clothing photos (64x64 RGB), 3 from each of 4 classes, with their class name."""
    rng = np.random.default_rng(0)
    out = []
    for c in (0, 1, 4, 6):                                  # dress, hat, pants, shoes
        idx = rng.choice(np.flatnonzero(clothing.labels == c), 3, replace=False)
        out += [(clothing.images[i], clothing.class_names[c]) for i in idx]
    return out


def _ids_labels(run: Path) -> list[tuple[str, str | None, tuple[str, ...]]]:
    return sorted((r.id, r.web_label, tuple(r.web_labels)) for r in load_manifest(RunPaths(run).manifest))


# --------------------------------------------------------------------------------------------
# four sources, one set of records
# --------------------------------------------------------------------------------------------
def test_folder_csv_parquet_and_shards_give_identical_records(tmp_path, photos, pacs_jpeg):
    jpegs, pacs = pacs_jpeg
    files = [(f"img_{i:03d}.{'png' if i % 4 == 3 else 'jpg'}",
              encode(arr, "PNG") if i % 4 == 3 else encode(arr, "JPEG", quality=90), label)
             for i, (arr, label) in enumerate(photos)]
    files += [(f"pacs_{i:03d}.jpg", jpegs[i], pacs.class_names[int(pacs.labels[i])]) for i in (0, 2000, 5000)]

    web = tmp_path / "web"                                  # folder: and both manifests
    rows = []
    for name, data, label in files:
        (web / label).mkdir(parents=True, exist_ok=True)
        (web / label / name).write_bytes(data)
        rows.append({"path": f"{label}/{name}", "label": label, "caption": f"a {label}", "url": f"http://x/{name}"})
    with open(web / "list.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), web / "list.parquet")

    shards = tmp_path / "shards"                            # img2dataset layout, two shards
    shards.mkdir()
    for s, part in enumerate((files[:8], files[8:])):
        members, meta = [], []
        for j, (name, data, label) in enumerate(part):
            key = f"{s:05d}{j:04d}"
            ext = name.rsplit(".", 1)[1]
            members += [(f"{key}.{ext}", data), (f"{key}.txt", f"a {label}".encode()),
                        (f"{key}.json", json.dumps({"key": key, "url": f"http://x/{name}"}).encode())]
            meta.append({"key": key, "url": f"http://x/{name}", "caption": f"a {label}",
                         "status": "success", "label": label})
        meta.append({"key": f"{s:05d}9999", "url": "http://x/dead", "caption": None,
                     "status": "failed_to_download", "label": None})
        write_tar(shards / f"{s:05d}.tar", members)
        pq.write_table(pa.Table.from_pylist(meta), shards / f"{s:05d}.parquet")

    cfg = IngestConfig()
    sources = {"folder": f"folder:{web}", "csv": f"manifest:{web / 'list.csv'}",
               "parquet": f"manifest:{web / 'list.parquet'}", "wds": f"wds:{shards}/{{00000..00001}}.tar"}
    results = {}
    for kind, src in sources.items():
        rep = run_ingest([src], RunPaths(tmp_path / f"run_{kind}"), cfg, workers=2)
        # the folder source lists every file: the two manifests beside the images are rows too
        stray = {"not_an_image": 2} if kind == "folder" else {}
        assert rep.kept == len(files) and rep.quarantined == stray, (kind, rep.summary())
        results[kind] = _ids_labels(tmp_path / f"run_{kind}")
    expected = sorted((sha(d), lab, (lab,)) for _, d, lab in files)
    for kind, got in results.items():
        assert got == expected, kind
    assert rep.upstream_failed == 2                         # the two failed-download rows were counted
    assert rep.sidecars == 2 * len(files)                   # each image's .txt and .json: not entries

    shard_recs = {r.id: r for r in load_manifest(RunPaths(tmp_path / "run_wds").manifest)}
    folder_recs = {r.id: r for r in load_manifest(RunPaths(tmp_path / "run_folder").manifest)}
    for rid, r in shard_recs.items():                       # read back by seek, same pixels
        assert r.container and r.container.endswith(".tar") and r.offset > 0
        assert sha(read_bytes(r)) == rid
        assert r.caption == f"a {r.web_label}" and r.url.startswith("http://x/")
        assert np.array_equal(np.asarray(load_rgb(r)), np.asarray(load_rgb(folder_recs[rid])))
    csv_recs = load_manifest(RunPaths(tmp_path / "run_csv").manifest)
    assert {r.uri for r in csv_recs} == {r.uri for r in folder_recs.values()}


# --------------------------------------------------------------------------------------------
# the bad / odd file corpus
# --------------------------------------------------------------------------------------------
def test_bad_and_odd_files_each_get_their_exact_outcome(tmp_path, photos, capsys):
    upright = photos[0][0][:40]                             # (40, 64, 3): landscape, for EXIF
    photo, other = photos[1][0], photos[5][0]
    web = tmp_path / "web"
    q = web / "q"
    q.mkdir(parents=True)
    jpeg = encode(photo, "JPEG", quality=90)

    (q / "zero.jpg").write_bytes(b"")
    (q / "truncated.jpg").write_bytes(jpeg[: int(len(jpeg) * 0.6)])
    (q / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    (q / "notes.png").write_bytes(b"just some text that someone saved with a .png name\n" * 3)
    (q / "bomb.png").write_bytes(png_bomb())
    (q / "tiny.png").write_bytes(encode(photo[:1, :1], "PNG"))
    (q / "big.png").write_bytes(encode(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8), "PNG"))
    (q / "float.tif").write_bytes(encode(photo[..., 0].astype(np.float32) / 255, "TIFF"))
    bad_crc = bytearray(encode(photo, "PNG"))
    bad_crc[60] ^= 0xFF                                     # flip a byte inside the IDAT data
    (q / "crc.png").write_bytes(bytes(bad_crc))
    (q / "cmyk.jpg").write_bytes(encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95))
    grey8 = np.asarray(Image.fromarray(photo).convert("L"))
    (q / "deep16.png").write_bytes(encode(grey8.astype(np.uint16) * 257, "PNG"))
    pal = Image.fromarray(photo).quantize(32)
    t_index = pal.getpixel((0, 0))
    (q / "palette.png").write_bytes(encode(pal, "PNG", transparency=t_index))
    frames = [Image.fromarray(a) for a in (photo, other, photos[9][0])]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (q / "anim.gif").write_bytes(gif.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6                                        # "rotate 90 CW to display"
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)   # (64, 40) on disk
    (q / "rotated.jpg").write_bytes(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    (q / "photo.webp").write_bytes(encode(photo, "WEBP", quality=90))
    (q / "readme.txt").write_text("not an image: a quarantine row, decided by content")
    (web / "loose.jpg").write_bytes(encode(photos[7][0], "JPEG"))      # directly in DIR: no label
    (q / "folder.jpg").mkdir()                              # a directory named .jpg: walked like any
    (q / "folder.jpg" / "inner").write_bytes(encode(photos[8][0], "PNG"))   # kept, by content
    os.mkfifo(q / "pipe.jpg")                               # not_a_file: a FIFO (never opened)
    os.symlink(q / "gone.jpg", q / "dangling.jpg")          # not_found: dangling symlink
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(encode(other, "JPEG"))
    os.symlink(outside, q / "escape.jpg")                   # unsafe_path: link leaves the folder
    dup = encode(photos[3][0], "JPEG")
    for label, name in (("a", "copy1.jpg"), ("b", "copy2.jpg")):
        (web / label).mkdir()
        (web / label / name).write_bytes(dup)

    man = tmp_path / "man"
    man.mkdir()
    (man / "ok.jpg").write_bytes(encode(photos[4][0], "JPEG"))
    with open(man / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["path", "label"], ["ok.jpg", "m"], [str(outside), "m"], ["../outside.jpg", "m"],
                     ["", "m"], ["missing.jpg", "m"], ["sub/../ok.jpg", "m2"]])
    shard = tmp_path / "evil.tar"
    write_tar(shard, [("../evil.jpg", jpeg), ("/abs.jpg", jpeg), ("000001.jpg", encode(photos[6][0], "JPEG"))])

    cfg = IngestConfig(max_bytes=100_000)
    paths = RunPaths(tmp_path / "run")
    rep = run_ingest([f"folder:{web}", f"manifest:{man / 'list.csv'}", f"wds:{shard}"], paths, cfg, workers=2)
    print(rep.summary())
    assert "quarantined" in capsys.readouterr().out

    recs = {Path(r.uri).name: r for r in load_manifest(paths.manifest)}
    quar = load_quarantine(paths.quarantine)
    reasons = {}
    for row in quar:
        reasons.setdefault(Path(row.uri).name if "row" not in row.uri else row.uri, []).append(row.reason)
    expect_rejected = {
        "zero.jpg": "empty", "truncated.jpg": "truncated", "page.jpg": "not_an_image",
        "notes.png": "not_an_image", "bomb.png": "bomb", "tiny.png": "too_small", "big.png": "too_large",
        "float.tif": "unsupported_mode", "crc.png": "truncated", "readme.txt": "not_an_image",
        "pipe.jpg": "not_a_file", "dangling.jpg": "not_found", "escape.jpg": "unsafe_path",
        "copy2.jpg": "duplicate", "evil.jpg": "unsafe_path", "abs.jpg": "unsafe_path",
        "outside.jpg": "unsafe_path", "missing.jpg": "not_found",
    }
    for name, reason in expect_rejected.items():
        assert reason in reasons.get(name, []), (name, reasons.get(name), rep.summary())
        assert name not in recs
    assert reasons["outside.jpg"] == ["unsafe_path", "unsafe_path"]     # absolute and ../ rows
    assert [u for u in reasons if "#row" in u and reasons[u] == ["bad_row"]]  # the row without a path
    assert all(r.reason in REASONS for r in quar)
    assert set(recs) == {"cmyk.jpg", "deep16.png", "palette.png", "anim.gif", "rotated.jpg", "photo.webp",
                         "copy1.jpg", "ok.jpg", "000001.jpg", "loose.jpg", "inner"}
    assert recs["inner"].web_label == "q" and recs["inner"].format == "PNG"
    assert recs["loose.jpg"].web_label is None and recs["loose.jpg"].web_labels == []
    assert recs["cmyk.jpg"].web_label == "q"
    # nothing dropped silently: every listed entry is a record, a quarantine row or a refreshed re-listing
    assert rep.seen == rep.kept + rep.n_quarantined + rep.refreshed
    assert rep.quarantined["unsafe_path"] == 5

    # duplicate bytes under two names: one record, both labels, duplicate row points at it
    c1 = recs["copy1.jpg"]
    assert c1.web_label == "a" and c1.web_labels == ["a", "b"]
    (dup_row,) = [r for r in quar if r.reason == "duplicate" and Path(r.uri).name == "copy2.jpg"]
    assert dup_row.dup_of == c1.id == sha(dup)
    # the same file listed again via `sub/../ok.jpg` with another label merges into one record
    assert recs["ok.jpg"].web_labels == ["m", "m2"]

    # kept ones: correctly oriented and converted (pixels, not only sizes)
    rot = recs["rotated.jpg"]
    assert (rot.width, rot.height) == (64, 40)
    rot_px = np.asarray(load_rgb(rot))
    assert rot_px.shape == upright.shape
    assert mad(rot_px, upright) < 6 < mad(rot_px, upright[::-1, ::-1])   # not upside down either

    cm = recs["cmyk.jpg"]
    assert cm.mode == "CMYK" and mad(load_rgb(cm), photo) < 6

    d16 = recs["deep16.png"]
    assert d16.mode.startswith("I")
    px16 = np.asarray(load_rgb(d16))
    assert np.array_equal(px16[..., 0], grey8) and np.array_equal(px16[..., 2], grey8)
    assert px16.max() == grey8.max() > 200                  # scaled, not clipped to 255

    pr = recs["palette.png"]
    assert pr.mode == "P"
    idx = np.asarray(pal)
    lut = np.asarray(pal.getpalette()[: 3 * 256] + [0] * (768 - len(pal.getpalette()[:768])), np.uint8).reshape(-1, 3)
    want = np.where((idx == t_index)[..., None], 255, lut[idx]).astype(np.uint8)
    assert (idx == t_index).any() and np.array_equal(np.asarray(load_rgb(pr)), want)

    gr = recs["anim.gif"]
    gif_px = np.asarray(load_rgb(gr))
    assert gr.format == "GIF" and gif_px.shape == (64, 64, 3)
    assert mad(gif_px, photo) < 12 < mad(gif_px, other)    # the first frame

    assert recs["photo.webp"].format == "WEBP" and mad(load_rgb(recs["photo.webp"]), photo) < 8
    sh = recs["000001.jpg"]
    assert sh.container == str(shard) and sha(read_bytes(sh)) == sh.id


# --------------------------------------------------------------------------------------------
# decode unit checks: bomb bands, 16-bit I mode, alpha
# --------------------------------------------------------------------------------------------
def test_bomb_guard_warning_and_error_bands_both_reject(photos):
    png = encode(photos[0][0], "PNG")                       # 64 x 64 = 4096 pixels
    for limit in (3000, 1500):                              # Pillow warns in (limit, 2 limit], raises above
        with pytest.raises(Rejected) as err:
            decode_image(png, IngestConfig(max_pixels=limit))
        assert err.value.reason == "bomb"
    assert decode_image(png, IngestConfig(max_pixels=4096)).width == 64
    with pytest.raises(Rejected, match="bomb"):
        decode_image(png_bomb(), IngestConfig())


def test_to_rgb_scales_i_mode_and_composites_alpha(photos):
    grey = np.asarray(Image.fromarray(photos[2][0]).convert("L"))
    i_img = Image.fromarray(grey.astype(np.int32) * 257, "I")       # 16-bit values held in mode I
    assert np.array_equal(np.asarray(to_rgb(i_img))[..., 1], grey)
    rgba = np.dstack([photos[2][0], np.where(np.arange(64) < 32, 0, 255).astype(np.uint8)[None, :].repeat(64, 0)])
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[:, :32] == 255).all() and np.array_equal(out[:, 32:], photos[2][0][:, 32:])
    with pytest.raises(Rejected, match="unsupported_mode"):
        to_rgb(Image.new("F", (8, 8)))


# --------------------------------------------------------------------------------------------
# incremental re-runs and atomic writes
# --------------------------------------------------------------------------------------------
def test_incremental_reruns_read_only_new_or_changed_files(tmp_path, photos, monkeypatch):
    web = tmp_path / "web"
    for i, (arr, label) in enumerate(photos[:6]):
        (web / label).mkdir(parents=True, exist_ok=True)
        (web / label / f"a{i}.jpg").write_bytes(encode(arr, "JPEG"))
    paths, cfg, src = RunPaths(tmp_path / "run"), IngestConfig(), [f"folder:{web}"]
    r0 = run_ingest(src, paths, cfg)
    assert (r0.batch, r0.new, r0.kept) == (0, 6, 6)
    first = load_manifest(paths.manifest)

    for i, (arr, label) in enumerate(photos[6:10]):         # the source grows by 4 files
        (web / label).mkdir(parents=True, exist_ok=True)
        (web / label / f"b{i}.jpg").write_bytes(encode(arr, "JPEG"))
    (web / "dress" / "bad.jpg").write_bytes(b"")
    r1 = run_ingest(src, paths, cfg)
    assert (r1.batch, r1.seen, r1.skipped_unchanged, r1.new, r1.kept) == (1, 11, 6, 5, 4)
    assert r1.quarantined == {"empty": 1}
    second = load_manifest(paths.manifest)
    assert second[:6] == first                              # existing rows unchanged, same order
    assert [r.batch for r in second[6:]] == [1] * 4

    calls = []
    real = ingest.decode_image
    monkeypatch.setattr(ingest, "decode_image", lambda data, c: calls.append(1) or real(data, c))
    r2 = run_ingest(src, paths, cfg)                        # unchanged: nothing read or decoded
    assert (r2.new, r2.skipped_unchanged, r2.kept, calls) == (0, 11, 0, [])
    assert load_manifest(paths.manifest) == second
    assert len(load_quarantine(paths.quarantine)) == 1      # the bad file is not re-quarantined

    victim = web / photos[0][1] / "a0.jpg"                  # touched (same bytes) and changed
    os.utime(victim, ns=(1, 1))
    changed = web / photos[1][1] / "a1.jpg"
    changed.write_bytes(encode(photos[11][0], "JPEG"))
    r3 = run_ingest(src, paths, cfg)
    assert (r3.new, r3.refreshed, r3.kept, r3.n_quarantined, len(calls)) == (2, 1, 1, 0, 2)
    third = load_manifest(paths.manifest)
    assert third[: len(second)] == second and third[-1].uri == str(changed)

    leftovers = [p.name for p in paths.root.iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []
    assert sorted(p.name for p in paths.root.iterdir()) == ["ingest_state.parquet", "manifest.parquet",
                                                             "quarantine.parquet"]


def test_unchanged_tar_shards_are_not_opened_again(tmp_path, photos, monkeypatch):
    """A refresh lists only the shards that are new or changed since the last round: listing a
    shard parses every member header (~0.2 ms an image), which at 1M images is minutes."""
    shards = tmp_path / "shards"
    shards.mkdir()
    photos = photos + [(np.ascontiguousarray(a[:, ::-1]), label) for a, label in photos]   # 24 real images

    def shard(s: int, part: list) -> None:
        members, meta = [], []
        for j, (arr, label) in enumerate(part):
            key = f"{s:05d}{j:04d}"
            members += [(f"{key}.jpg", encode(arr, "JPEG", quality=90)), (f"{key}.txt", f"a {label}".encode())]
            meta.append({"key": key, "caption": f"a {label}", "status": "success", "label": label})
        meta.append({"key": f"{s:05d}9999", "status": "failed_to_download", "label": None})
        write_tar(shards / f"{s:05d}.tar", members)
        pq.write_table(pa.Table.from_pylist(meta), shards / f"{s:05d}.parquet")

    shard(0, photos[:6])
    shard(1, photos[6:12])
    src, paths, cfg = f"wds:{shards}/{{00000..00002}}.tar", RunPaths(tmp_path / "run"), IngestConfig()
    first = run_ingest([src], paths, cfg, workers=1)
    assert first.kept == 12 and first.quarantined == {"not_found": 1}   # shard 2 is not there yet

    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda name, *a, **k: (opened.append(Path(name).name), real_open(name, *a, **k))[1])
    again = run_ingest([src], paths, cfg, workers=1)
    assert opened == [] and again.new == 0 and again.skipped_unchanged == again.seen == first.seen == 13
    assert (again.sidecars, again.upstream_failed) == (first.sidecars, first.upstream_failed) == (12, 2)

    shard(2, photos[12:16])                                  # a new crawl's shard, and one shard rewritten
    shard(1, photos[6:12] + photos[16:18])
    os.utime(shards / "00001.tar", ns=(1, 10**18))
    opened.clear()
    third = run_ingest([src], paths, cfg, workers=1)
    assert sorted(opened) == ["00001.tar", "00002.tar"] and third.kept == 6
    assert third.skipped_unchanged == 6 + 6                   # shard 0 (memo) and shard 1's old samples (state)
    assert len(load_manifest(paths.manifest)) == 18

    # an unclean listing (here an unreadable Parquet) is not remembered: once the file is fixed
    # with its size and mtime as they were, the shard is read again and gets its labels
    pqf = shards / "00000.parquet"
    good, st = pqf.read_bytes(), pqf.stat()
    pqf.write_bytes(b"x" * len(good))
    os.utime(pqf, ns=(st.st_atime_ns, st.st_mtime_ns))
    shard(3, photos[18:20])
    opened.clear()
    run_ingest([src.replace("00002", "00003")], paths, cfg, workers=1)
    pqf.write_bytes(good)
    os.utime(pqf, ns=(st.st_atime_ns, st.st_mtime_ns))
    opened.clear()
    run_ingest([src.replace("00002", "00003")], paths, cfg, workers=1)
    assert sorted(opened) == ["00000.tar"]                    # shards 1-3 were listed cleanly

    # a lost ingest state: the memo is not trusted, every shard is listed again, nothing is lost
    paths.ingest_state.unlink()
    opened.clear()
    fourth = run_ingest([src], paths, cfg, workers=1)
    assert sorted(opened) == ["00000.tar", "00001.tar", "00002.tar"]
    assert fourth.kept == 0 and len(load_manifest(paths.manifest)) == 20
