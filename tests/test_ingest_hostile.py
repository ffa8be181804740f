"""A hostile corpus through the real ingest: nothing crashes, nothing is lost, every file has its
exact outcome, and a re-run changes nothing (issue 12, items 7 and 10).

Real photos (clothing-dataset-small) are written as real files whose names are not UTF-8 or
hold control characters, into a folder 1,100 levels deep, without extensions, hidden, beside
text / SVG / HEIC files, FIFOs and a device node, listed by CSV / Parquet manifests with bad
rows (invalid UTF-8, ragged, a NUL byte), and packed as tar members `a.b.jpg`, `noext`, FIFO and
device. `pipeline.audit.unaccounted` lists every file / member / row in neither manifest nor
quarantine; it must list nothing, and it must list a row we delete (so the check can fail).
"""
from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, features

from webkd.pipeline.audit import unaccounted
from webkd.pipeline.config import IngestConfig, RunPaths
from webkd.pipeline.ingest import load_rgb, run_ingest
from webkd.pipeline.records import (REASONS, load_manifest, load_quarantine, path_to_uri, read_bytes,
                                    save_manifest, save_quarantine, uri_to_path)

DEPTH = 1100
HAS_AVIF = features.check("avif")


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(clothing) -> list[np.ndarray]:
    """24 distinct real clothing photos (64x64 RGB)."""
    idx = np.random.default_rng(1).choice(len(clothing.images), 24, replace=False)
    return [clothing.images[i] for i in idx]


def remove_tree(top: Path) -> None:
    """rm -r without recursion: shutil.rmtree (and pytest's own tmp cleanup, which uses it) hits
    RecursionError on a 1,100-deep folder, so the test removes its deep folder itself."""
    stack = [str(top)]
    while stack:
        try:
            entries = list(os.scandir(stack[-1]))
        except FileNotFoundError:
            stack.pop()
            continue
        subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                os.unlink(e.path)
        if subdirs:
            stack.extend(subdirs)
        else:
            os.rmdir(stack.pop())


@pytest.fixture
def corpus_root(tmp_path):
    """tmp_path, with the deep folder removed afterwards (pass or fail), so that no later pytest
    session on this machine crashes while cleaning old tmp folders."""
    yield tmp_path
    remove_tree(tmp_path / "web" / "deep")


def fsname(raw: bytes) -> str:
    """A file name from raw bytes, as Python's os functions carry it (surrogateescape)."""
    return os.fsdecode(raw)


def add_member(tf: tarfile.TarFile, name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE) -> None:
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.type = 1_700_000_000, kind
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    ti.size = len(data) if data is not None else 0
    tf.addfile(ti, io.BytesIO(data) if data is not None else None)


def build_corpus(root: Path, photos: list[np.ndarray]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Write the corpus; returns (sources, expected kept name -> format, expected rejected name -> reason).

    Names are the last path component (of a file, a tar member or `<manifest>#row<i>`), as text.
    """
    jpg = [encode(p, "JPEG", quality=90) for p in photos]
    kept: dict[str, str] = {}
    rejected: dict[str, str] = {}

    web = root / "web"
    q = web / "q"
    q.mkdir(parents=True)
    # item 7: names that are not UTF-8, or hold control characters, and a non-UTF-8 query folder
    (q / fsname(b"caf\xe9-latin1.jpg")).write_bytes(jpg[0])
    kept[fsname(b"caf\xe9-latin1.jpg")] = "JPEG"
    (q / "\x1b[31mred\x07.jpg").write_bytes(jpg[1])
    kept["\x1b[31mred\x07.jpg"] = "JPEG"
    bad_dir = web / fsname(b"\xff\xfequery")
    bad_dir.mkdir()
    (bad_dir / "in-bad-folder.png").write_bytes(encode(photos[2], "PNG"))
    kept["in-bad-folder.png"] = "PNG"
    (q / fsname(b"\xc3(not-utf8.txt")).write_bytes(b"plain words, not pixels\n")
    rejected[fsname(b"\xc3(not-utf8.txt")] = "not_an_image"
    # item 7: a folder 1,100 levels deep, an image at the bottom
    deep = web / "deep"
    deep.mkdir()
    for _ in range(DEPTH):                                         # os.makedirs itself recurses
        deep = deep / "d"
        deep.mkdir()
    (deep / "bottom.jpg").write_bytes(jpg[3])
    kept["bottom.jpg"] = "JPEG"
    # item 10: decided by content, never by name
    (q / "photo").write_bytes(jpg[4])                              # a JPEG without an extension
    kept["photo"] = "JPEG"
    (q / "shot.jpeg.bin").write_bytes(encode(photos[5], "PNG"))    # a PNG with a wrong extension
    kept["shot.jpeg.bin"] = "PNG"
    (q / ".hidden.jpg").write_bytes(jpg[6])                        # hidden files are listed
    kept[".hidden.jpg"] = "JPEG"
    (q / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    rejected[".DS_Store"] = "not_an_image"
    (q / "notes.txt").write_text("caption: a red dress\n")
    rejected["notes.txt"] = "not_an_image"
    (q / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
                                '<rect width="64" height="64" fill="red"/></svg>')
    rejected["logo.svg"] = "unsupported_format"
    (q / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    rejected["phone.heic"] = "unsupported_format"
    (q / "favicon.ico").write_bytes(encode(photos[7], "ICO"))      # Pillow decodes ICO
    kept["favicon.ico"] = "ICO"
    if HAS_AVIF:                                                   # and AVIF when built with libavif
        (q / "modern.avif").write_bytes(encode(photos[8], "AVIF", quality=90))
        kept["modern.avif"] = "AVIF"
    (q / "sub.jpg").mkdir()                                        # a folder named like an image: walked
    (q / "sub.jpg" / "inside.webp").write_bytes(encode(photos[9], "WEBP", quality=90))
    kept["inside.webp"] = "WEBP"
    os.mkfifo(q / "pipe.jpg")                                      # never opened (would block)
    rejected["pipe.jpg"] = "not_a_file"
    try:
        os.mknod(q / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        rejected["null.png"] = "not_a_file"
    except (PermissionError, OSError):                             # no CAP_MKNOD: the tar members cover devices
        pass

    # item 7: manifests with bad rows among good ones
    man = root / "man"
    man.mkdir()
    for i in (10, 11, 12):
        (man / f"m{i}.jpg").write_bytes(jpg[i])
    (man / fsname(b"raw\xe9.jpg")).write_bytes(jpg[13])            # listed only by a bad row
    csv_bytes = (b"path,label\n"
                 b"m10.jpg,shirt\n"
                 b"raw\xe9.jpg,shirt\n"                                # line 3: invalid UTF-8
                 b"m11.jpg,shirt,extra field\n"                        # line 4: ragged
                 b"\n"                                                 # a blank line is no row
                 b"m\x00.jpg,shirt\n"                                  # line 6: a NUL byte in the path
                 b"m12.jpg,shirt\n")
    (man / "list.csv").write_bytes(csv_bytes)
    kept.update({"m10.jpg": "JPEG", "m12.jpg": "JPEG"})
    csv_rows = {f"list.csv#row{i}": ("bad_row", f"line {line}") for i, line in ((1, 3), (2, 4), (3, 6))}
    pq.write_table(pa.table({"path": ["m11.jpg", "nul\x00byte.jpg"], "label": ["shirt", "shirt"]}),
                   man / "list.parquet")
    kept["m11.jpg"] = "JPEG"
    csv_rows["list.parquet#row1"] = ("bad_row", "NUL")
    rejected.update({k: v[0] for k, v in csv_rows.items()})

    # item 10: tar members decided by content; a sample's sidecars belong to it
    shard = root / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tf:
        add_member(tf, "000001.jpg", jpg[14])
        add_member(tf, "000001.txt", b"a photo of a hat")
        add_member(tf, "000001.json", b'{"url": "http://x/1.jpg", "label": "hat"}')
        add_member(tf, "a.b.jpg", jpg[15])                         # key "a", field "b.jpg"
        add_member(tf, "noext", jpg[16])
        add_member(tf, fsname(b"\xe9t\xe9.png"), encode(photos[17], "PNG"))   # a non-UTF-8 member name
        add_member(tf, "\x1b]0;pwned\x07.jpg", jpg[18])
        add_member(tf, "drawing.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>")
        add_member(tf, "readme.txt", b"no image has this key")    # a sidecar of nothing
        add_member(tf, "fifo.jpg", kind=tarfile.FIFOTYPE)
        add_member(tf, "tty.jpg", kind=tarfile.CHRTYPE)
        add_member(tf, "disk.png", kind=tarfile.BLKTYPE)
    kept.update({"000001.jpg": "JPEG", "a.b.jpg": "JPEG", "noext": "JPEG", fsname(b"\xe9t\xe9.png"): "PNG",
                 "\x1b]0;pwned\x07.jpg": "JPEG"})
    rejected.update({"drawing.svg": "unsupported_format", "readme.txt": "not_an_image", "fifo.jpg": "not_a_file",
                     "tty.jpg": "not_a_file", "disk.png": "not_a_file"})
    sources = [f"folder:{web}", f"manifest:{man / 'list.csv'}", f"manifest:{man / 'list.parquet'}",
               f"wds:{shard}"]
    return sources, kept, rejected


def name_of(uri: str) -> str:
    path = uri_to_path(uri)
    return path.rsplit("/", 1)[-1]


def test_hostile_corpus_every_file_accounted_and_rerun_stable(corpus_root, photos):
    tmp_path = corpus_root
    sources, kept, rejected = build_corpus(tmp_path, photos)
    paths = RunPaths(tmp_path / "run")
    rep = run_ingest(sources, paths, IngestConfig(), workers=2)    # must not raise

    recs = load_manifest(paths.manifest)
    quar = load_quarantine(paths.quarantine)
    got_kept = {name_of(r.uri): r for r in recs}
    got_rej = {name_of(r.uri): r for r in quar}
    assert {n: r.format for n, r in got_kept.items()} == kept, rep.summary()
    assert {n: r.reason for n, r in got_rej.items()} == rejected, rep.summary()
    assert all(r.reason in REASONS for r in quar)
    assert rep.seen == rep.kept + rep.n_quarantined and rep.sidecars == 2
    assert unaccounted(paths.root, sources) == []                 # every file / member / row has a row

    # the stored text is printable UTF-8 and gives back the exact bytes of each odd name
    for r in [*recs, *quar]:
        for text in (r.uri, r.web_label or "", getattr(r, "container", None) or ""):
            text.encode("utf-8")
            assert text.isprintable(), text
    latin = got_kept[fsname(b"caf\xe9-latin1.jpg")]
    assert latin.uri.startswith("file://") and os.fsencode(uri_to_path(latin.uri)).endswith(b"caf\xe9-latin1.jpg")
    assert read_bytes(latin) == (Path(uri_to_path(latin.uri))).read_bytes()
    assert np.asarray(load_rgb(latin)).shape == (64, 64, 3)       # later stages read it back
    assert got_kept["in-bad-folder.png"].web_label == "\\xff\\xfequery"
    member = got_kept[fsname(b"\xe9t\xe9.png")]
    assert member.container and np.asarray(load_rgb(member)).shape == (64, 64, 3)
    assert got_kept["bottom.jpg"].web_label == "deep" and got_kept["photo"].web_label == "q"
    shard_rec = got_kept["000001.jpg"]
    assert (shard_rec.caption, shard_rec.web_label) == ("a photo of a hat", "hat")   # sidecars used
    for name, where in (("list.csv#row1", "line 3"), ("list.csv#row2", "line 4"), ("list.csv#row3", "line 6"),
                        ("list.parquet#row1", "NUL")):
        assert where in got_rej[name].detail, (name, got_rej[name].detail)
    assert "3 fields" in got_rej["list.csv#row2"].detail and "UTF-8" in got_rej["list.csv#row1"].detail
    assert "sidecar" in got_rej["readme.txt"].detail and "FIFO" in got_rej["fifo.jpg"].detail

    # a re-run over the same corpus reads nothing and writes the same rows (none doubled)
    files = {p: p.read_bytes() for p in (paths.manifest, paths.quarantine)}
    again = run_ingest(sources, paths, IngestConfig(), workers=2)
    assert (again.new, again.kept, again.n_quarantined) == (0, 0, 0)
    assert again.skipped_unchanged == rep.seen
    assert {p: p.read_bytes() for p in files} == files
    assert load_manifest(paths.manifest) == recs and load_quarantine(paths.quarantine) == quar

    # the audit can fail: a lost row and a file added after the ingest are both listed
    save_quarantine(paths.quarantine, [r for r in quar if name_of(r.uri) != "noext"])
    (tmp_path / "web" / "q" / "late.jpg").write_bytes(encode(photos[20], "JPEG"))
    missing = unaccounted(paths.root, sources)
    assert len(missing) == 1 and missing[0].endswith("/q/late.jpg")
    save_quarantine(paths.quarantine, quar)
    recs_without = [r for r in recs if name_of(r.uri) != "noext"]
    save_manifest(paths.manifest, recs_without)
    assert [m for m in unaccounted(paths.root, sources) if m.endswith("/noext")]


def test_path_uri_round_trip_is_lossless():
    for raw in (b"/w/plain.jpg", b"/w/caf\xe9 100%.jpg", b"/w/\x1b[2J\x00nul", "/w/é.jpg".encode(), b"/w/%41"):
        path = os.fsdecode(raw)
        uri = path_to_uri(path)
        uri.encode("utf-8")
        assert os.fsencode(uri_to_path(uri)) == raw
        assert (uri == path) == (raw in (b"/w/plain.jpg", "/w/é.jpg".encode(), b"/w/%41"))


@pytest.mark.skipif(not HAS_AVIF, reason="this Pillow is built without AVIF (PIL.features.check('avif') is False)")
def test_avif_without_extension_is_kept(tmp_path, photos):
    web = tmp_path / "web" / "q"
    web.mkdir(parents=True)
    (web / "noname").write_bytes(encode(photos[0], "AVIF", quality=90))
    paths = RunPaths(tmp_path / "run")
    rep = run_ingest([f"folder:{tmp_path / 'web'}"], paths, IngestConfig())
    assert rep.kept == 1 and load_manifest(paths.manifest)[0].format == "AVIF"
