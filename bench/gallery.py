"""Gallery at scale: render a 50k-row run (3 epochs of ledgers) and open it in Chromium.

The run is built from real images (clothing photos + PACS, from ../shared/data), repeated to
reach --rows; each copy gets a distinct JPEG comment, so every file has its own bytes and its
id is its real sha256. It has a row-aligned 32 px pixel cache, as `webkd features` leaves it.

Measured:
  cold render   no gallery/ yet: every thumbnail made (from the pixel cache) + data + page
  warm render   thumbnails cached: data + page only (what a re-render after a new epoch costs)
  cold, files   no pixel cache: every thumbnail decoded from its file with load_rgb
  page open     Chromium (headless): goto -> load event -> first tiles visible; median of 3
  filter        one class filter on 50k rows -> counts and the first page re-rendered

    .venv/bin/python bench/gallery.py              # 50,000 rows, prints a Markdown table
    .venv/bin/python bench/gallery.py --rows 5000 --no-files
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webkd.pipeline import datasets  # noqa: E402
from webkd.pipeline.config import RunPaths  # noqa: E402
from webkd.pipeline.records import Record, save_manifest  # noqa: E402
from webkd.pipeline.storage import atomic_write_table  # noqa: E402
from webkd.selection.gallery import render_gallery  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LEDGER_SCHEMA = pa.schema([
    ("id", pa.string()), ("row", pa.int64()), ("epoch", pa.int32()), ("split", pa.string()),
    ("kept", pa.bool_()), ("weight", pa.float32()), ("reason", pa.string()),
    ("pseudo_label", pa.int32()), ("confidence", pa.float32()), ("threshold", pa.float32()),
    ("teacher_share", pa.float32()), ("teacher_top1", pa.int32()), ("teacher_top2", pa.int32()),
    ("teacher_p1", pa.float32()), ("teacher_p2", pa.float32()), ("student_pred", pa.int32()),
    ("student_conf", pa.float32()), ("web_label", pa.string()), ("web_class", pa.int32()),
    ("knn_agree", pa.float32()),
])


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: same pixels, different bytes (unique id)."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def source_images() -> tuple[list[bytes], list[np.ndarray], list[str]]:
    """Real images as JPEG bytes, their 32 px pixels, and their web query (class name)."""
    blobs, pixels, queries = [], [], []
    c = datasets.load_clothing()
    for img, lab in zip(c.images, c.labels):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        pixels.append(np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC)))
        queries.append(c.class_names[int(lab)])
    jb, meta = datasets.pacs_jpeg_bytes()
    p32 = datasets.load_pacs(size=32)
    for b, img, lab in zip(jb, p32.images, meta.labels):
        blobs.append(b)
        pixels.append(img)
        queries.append(meta.class_names[int(lab)])
    return blobs, pixels, queries


def build_run(root: Path, rows: int, epochs: int, seed: int = 0) -> RunPaths:
    rng = np.random.default_rng(seed)
    blobs, pixels, queries = source_images()
    classes = ["t-shirt", "pants", "longsleeve", "dress", "outwear", "shirt", "shoes",
               "dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    paths = RunPaths(root / "run")
    shutil.rmtree(root, ignore_errors=True)
    web = root / "web"
    order = rng.permutation(rows) % len(blobs)                # which real image each row shows
    records, px = [], np.empty((rows, 32, 32, 3), dtype=np.uint8)   # (N, 32, 32, 3)
    t0 = time.perf_counter()
    for r, s in enumerate(order.tolist()):
        data = with_comment(blobs[s], f"webkd bench copy {r}")
        d = web / queries[s]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img_{r:06d}.jpg"
        p.write_bytes(data)
        records.append(Record(id=hashlib.sha256(data).hexdigest(), uri=str(p), source=f"folder:{web}",
                              web_label=queries[s], web_labels=[queries[s]], length=len(data),
                              width=64, height=64, format="JPEG", mode="RGB"))
        px[r] = pixels[s]
    n = rows
    ids = [x.id for x in records]
    # near duplicates: 2% of rows point at the previous row of the same query
    last: dict[str, int] = {}
    for r, rec in enumerate(records):
        if rec.web_label in last and rng.random() < 0.02:
            rec.status, rec.dup_of = "near_duplicate", ids[last[rec.web_label]]
        else:
            last[rec.web_label] = r
    paths.root.mkdir(parents=True)
    save_manifest(paths.manifest, records)
    paths.pixels(32, "squash").parent.mkdir(parents=True)
    np.save(paths.pixels(32, "squash"), px)
    (paths.root / "config.yaml").write_text(json.dumps({"data": {"classes": classes}}))
    lookup = {c: k for k, c in enumerate(classes)}
    web_class = np.array([lookup.get(x.web_label, -1) for x in records])
    dup = np.array([x.status == "near_duplicate" for x in records])
    split = np.where(rng.random(n) < 0.1, "val", "train")
    K = len(classes)
    for e in range(epochs):
        pl = np.where((web_class >= 0) & (rng.random(n) > 0.3), web_class, rng.integers(0, K, n))
        conf = rng.uniform(0.1, 1.0, n)
        thr = 0.4 + 0.04 * (pl % 5)
        reason = np.where(conf < 0.25, "low_confidence", np.where(conf < thr, "below_class_threshold", "selected"))
        reason = np.where(web_class < 0, "off_class", reason)
        reason = np.where(dup, "near_duplicate", reason)
        reason = np.where(split == "val", "validation", reason)
        kept = reason == "selected"
        cols = {"id": ids, "row": np.arange(n), "epoch": np.full(n, e), "split": split, "kept": kept,
                "weight": kept * 1.0, "reason": reason, "pseudo_label": pl, "confidence": conf,
                "threshold": thr, "teacher_share": np.full(n, max(0.0, 1 - e / 2)), "teacher_top1": pl,
                "teacher_top2": (pl + 1) % K, "teacher_p1": conf, "teacher_p2": (1 - conf) * 0.5,
                "student_pred": np.full(n, -1) if e == 0 else pl,
                "student_conf": np.full(n, np.nan) if e == 0 else conf * 0.9,
                "web_label": [x.web_label for x in records], "web_class": web_class,
                "knn_agree": np.full(n, np.nan)}
        table = pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in LEDGER_SCHEMA}, schema=LEDGER_SCHEMA)
        try:
            from webkd.selection.policy import write_ledger
        except ImportError:
            atomic_write_table(paths.ledger(e), table)
        else:
            write_ledger(paths.ledger(e), table)
    print(f"built {n} rows from {len(blobs)} real images x {epochs} epochs in "
          f"{time.perf_counter() - t0:.1f} s: {paths.root}", file=sys.stderr)
    return paths


def timed(fn, *a, **k) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*a, **k)
    return time.perf_counter() - t0, time.process_time() - c0


SHEETS_LOADED = """async () => {
  const urls = new Set(Array.from(document.querySelectorAll('.tile .thumb')).map(d => d.style.backgroundImage.slice(5, -2)));
  const sizes = await Promise.all(Array.from(urls).map(u => new Promise(ok => {
    const im = new Image(); im.onload = () => ok(im.naturalWidth); im.onerror = () => ok(-1); im.src = u; })));
  if (sizes.some(s => s <= 0)) throw new Error('a sprite sheet failed to load');
  return sizes.length;
}"""


def open_times(url: str, repeats: int) -> tuple[list[float], list[float], float]:
    from playwright.sync_api import sync_playwright

    times, thumbs, filt = [], [], float("nan")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for _ in range(repeats):
            ctx = b.new_context()
            page = ctx.new_page()
            t0 = time.perf_counter()
            page.goto(url, wait_until="load")
            page.wait_for_selector(".tile", state="visible")
            times.append(time.perf_counter() - t0)
            page.evaluate(SHEETS_LOADED)
            thumbs.append(time.perf_counter() - t0)
            # one class filter over every row: counts + first page re-rendered
            t1 = time.perf_counter()
            page.select_option("#f-class", "1")
            page.evaluate("document.getElementById('n-kept').textContent")
            filt = time.perf_counter() - t1
            ctx.close()
        b.close()
    return times, thumbs, filt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gallery")
    ap.add_argument("--per-sheet", type=int, default=256)
    ap.add_argument("--no-files", action="store_true", help="skip the cold render from files (load_rgb)")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse a run already built in --out with as many rows")
    args = ap.parse_args()

    paths = RunPaths(args.out / "run")
    if args.reuse and paths.manifest.exists() and paths.ledger(args.epochs - 1).exists() \
            and pq.read_metadata(paths.manifest).num_rows == args.rows:
        print(f"reusing {paths.root}", file=sys.stderr)
    else:
        paths = build_run(args.out, args.rows, args.epochs)
    rows = []
    shutil.rmtree(paths.gallery_dir, ignore_errors=True)
    cold = timed(render_gallery, paths.root, per_sheet=args.per_sheet)
    rows.append(("render, cold (pixel cache -> thumbnails)", cold))
    warm = [timed(render_gallery, paths.root, per_sheet=args.per_sheet) for _ in range(2)]
    rows.append(("render, warm (thumbnails cached)", min(warm)))
    if not args.no_files:
        px = paths.pixels(32, "squash")
        px.rename(px.with_suffix(".off"))
        shutil.rmtree(paths.gallery_dir, ignore_errors=True)
        rows.append(("render, cold from files (load_rgb, no pixel cache)",
                     timed(render_gallery, paths.root, per_sheet=args.per_sheet)))
        px.with_suffix(".off").rename(px)
    size = sum(p.stat().st_size for p in paths.gallery_dir.rglob("*") if p.is_file())
    if not args.no_browser:
        opens, thumbs, filt = open_times(paths.gallery.as_uri(), 3)
        rows.append(("page open in Chromium (load + first tiles), median of 3", (statistics.median(opens), None)))
        rows.append(("... until every sprite sheet of the first page has loaded", (statistics.median(thumbs), None)))
        rows.append(("one class filter on all rows (counts + first page)", (filt, None)))
    load = os.getloadavg()
    print(f"\n{args.rows:,} ledger rows x {args.epochs} epochs; gallery folder {size / 2**20:.0f} MiB; "
          f"{args.per_sheet} thumbnails per sheet; load average at the end {load[0]:.1f}\n")
    print("| step | wall s | CPU s (this process) |\n| --- | ---: | ---: |")
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.2f} | {'-' if cpu is None else f'{cpu:.2f}'} |")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
