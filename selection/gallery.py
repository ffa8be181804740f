"""The review page of a run: kept vs rejected images, why, and human overrides.

`render_gallery(run_dir)` writes `gallery/` in the run directory (`RunPaths.gallery`):

    gallery/index.html              static page (no data in it), opens from disk (file://)
    gallery/app.js                  the page's vanilla JS (no network, no CDN)
    gallery/data/meta.js            classes, reasons, summary tables, thumbnail layout
    gallery/data/rows_<k>.js        the images, columnar, CHUNK_ROWS per file
    gallery/thumbs<S>/sheet_<k>.jpg sprite sheets, `per_sheet` thumbnails each
    gallery/thumbs<S>/index.json    id -> slot of every thumbnail already made (the cache)

Data reaches the page as `<script src>` files because Chrome blocks fetching local JSON from
a file:// page. Every string from the web (file names, labels, captions, urls, ids) is JSON
with `<`, `>`, `&` and all non-ASCII escaped (so no `</script>` and no U+2028 can break out),
and the page builds its DOM with `textContent` / attributes only; a Content-Security-Policy
without 'unsafe-inline' blocks inline handlers as a second line of defence.

The static parts are real files shipped as package data in `selection/gallery_assets/`
(`index.html` template, `style.css` inlined into it, `app.js` copied beside it), read with
`importlib.resources`, so an installed (non-editable) package finds them too.

Thumbnails (`selection.thumbnails`) are made once per content id (ids are content hashes, so a
thumbnail never goes stale) from the pixel cache when present, else by decoding the original
with `pipeline.ingest.load_rgb`; a re-render only makes thumbnails for new ids.

The run's data and summary come from `selection.run_data` (`load_run`, `summarize`); which
decision a tile shows is its newest ledger row, its history every epoch's decision (the large
view lists each epoch's pseudo-label, confidence, threshold and weight). Each row also carries
its likely-label-error score and suggested class (`selection.label_errors`, confident learning)
and its NEIGHBOURS nearest page rows in the run's FAISS index with their cosine similarity
(`selection.similar`), so the page needs no server for "more like this". `webkd inspect --serve`
(`selection.gallery_server`) serves the same files and writes the page's decisions into the
overrides store.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import re
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from webkd.pipeline.paths import RunPaths
from webkd.pipeline.records import REASONS as RECORD_REASONS
from webkd.pipeline.storage import atomic_write_json, atomic_write_text, read_json
from webkd.selection.label_errors import LabelErrors, confident_learning, probs_from_top2
from webkd.selection.run_data import REASONS, RunData, load_run, summarize
from webkd.selection.similar import page_neighbours, teacher_probs
from webkd.selection.thumbnails import ThumbIndex, build_thumbnails

log = logging.getLogger(__name__)

CHUNK_ROWS = 10_000   # images per rows_<k>.js data file

def page_asset(name: str) -> str:
    """A static page part from `selection/gallery_assets/` (`index.html`, `style.css`, `app.js`).

    Read through `importlib.resources` from the installed package (package data in
    pyproject.toml), not from the source tree, so a wheel install renders the same page.
    """
    return (resources.files("webkd.selection") / "gallery_assets" / name).read_text(encoding="utf-8")


def js_json(obj: Any) -> str:
    """JSON that is safe inside a <script> element or a .js file.

    ASCII only (so U+2028/U+2029 and lone surrogates become \\u escapes), and `<`, `>`, `&`
    as \\u escapes, so no string can close the script, open a comment or form an entity.
    Quotes and unicode round-trip exactly through JSON.parse / the JS parser.
    """
    s = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _floats(a: np.ndarray, nd: int = 4) -> list[float | None]:
    a = np.asarray(a, dtype=np.float64)
    r = np.round(a, nd)
    return [None if math.isnan(v) else v for v in r.tolist()]


def label_errors(data: RunData) -> LabelErrors:
    """Likely label errors of the page rows: the teachers' cached probabilities when they cover
    the manifest, else the ledger's teacher top-2 (`selection.label_errors`)."""
    it = data.items
    k = max(len(data.classes), int(np.max(it["teacher_top1"], initial=-1)) + 1)
    rows = np.array([data.manifest_rows.get(i, -1) for i in it["id"].tolist()], np.int64)
    probs = None
    if len(data.manifest_rows) and (rows >= 0).all():
        probs = teacher_probs(RunPaths(data.root), rows, k, len(data.manifest_rows))
    if probs is not None:
        return confident_learning(probs, it["web_class"], "teacher logits")
    return confident_learning(probs_from_top2(it["teacher_top1"], it["teacher_p1"], it["teacher_top2"],
                                              it["teacher_p2"], max(k, 1)), it["web_class"], "ledger top-2")


def _columns(data: RunData, slots: dict[str, int], errors: LabelErrors,
             neighbours: tuple[np.ndarray, np.ndarray, str] | None) -> dict[str, list]:
    """The page's per-image columns (names as app.js reads them), manifest order."""
    it = data.items
    ids = it["id"].tolist()
    web = ["" if w is None else str(w) for w in it["web_label"].tolist()]
    labels = sorted(set(web))
    wl = {w: k for k, w in enumerate(labels)}
    so = {"accept": 1, "reject": 2, "relabel": 3}
    cls = {c: k for k, c in enumerate(data.classes)}

    def stored_label(i: str) -> int:   # -2 no correction, -1 off-class, k a class
        if i not in data.labels:
            return -2
        lab = data.labels[i]
        return -1 if lab is None else cls.get(lab, -3)   # -3: a class the run no longer has
    nb = neighbours[0].tolist() if neighbours else [[] for _ in ids]
    ns = [_floats(r, 3) for r in neighbours[1]] if neighbours else [[] for _ in ids]
    return {
        "id": ids,
        "row": [data.manifest_rows.get(i, int(r)) for i, r in zip(ids, it["row"].tolist())],
        "epoch": it["epoch"].tolist(),
        "val": [int(s == "val") for s in it["split"].tolist()],
        "kept": it["kept"].astype(int).tolist(),
        "weight": _floats(it["weight"], 3),
        "reason": it["reason_idx"].tolist(),
        "pl": it["pseudo_label"].tolist(),
        "conf": _floats(it["confidence"]),
        "thr": _floats(it["threshold"]),
        "alpha": _floats(it["teacher_share"], 3),
        "t1": it["teacher_top1"].tolist(), "t2": it["teacher_top2"].tolist(),
        "p1": _floats(it["teacher_p1"], 3), "p2": _floats(it["teacher_p2"], 3),
        "sp": it["student_pred"].tolist(), "sc": _floats(it["student_conf"], 3), "se": it["student_epoch"].tolist(),
        "wl": [wl[w] if w else -1 for w in web], "wc": it["web_class"].tolist(),
        "knn": _floats(it["knn_agree"], 3),
        "uri": [data.uri.get(i) for i in ids],
        "cap": [data.caption.get(i) for i in ids],
        "url": [data.url.get(i) for i in ids],
        "dup": [data.dup_of.get(i) for i in ids],
        "g": [slots.get(i, -1) for i in ids],
        "h": [data.history.get(i, []) for i in ids],
        "so": [so.get(data.overrides.get(i, ""), 0) for i in ids],
        "sl": [stored_label(i) for i in ids],
        "hx": [data.detail.get(i, []) for i in ids],
        "le": _floats(errors.score, 3), "sg": errors.suggested.tolist(),
        "nb": [[j for j in r if j >= 0] for r in nb], "ns": [[v for v in r if v is not None] for r in ns],
        "_labels": labels,
    }


RENDER_DEFAULTS = {"thumb_size": 64, "page_size": 100, "per_sheet": 256}
ASSETS = ("index.html", "style.css", "app.js", "review.js")


def _inputs_path(paths: RunPaths) -> Path:
    return paths.gallery_dir / "data" / "inputs.json"


def gallery_inputs(run_dir: str | Path, classes: list[str] | None = None, **render_args: Any) -> str:
    """Digest of everything the page is rendered from: the ledgers, manifest, quarantine,
    overrides and the exported student's predictions (by content), the class names, the render
    settings and the page assets."""
    paths = RunPaths(Path(run_dir))
    h = hashlib.sha256(json.dumps([classes, sorted({**RENDER_DEFAULTS, **render_args}.items())]).encode())
    files = [*(p for _, p in paths.ledgers()), paths.manifest, paths.quarantine,
             paths.overrides, paths.config, paths.student_predictions,
             *sorted(paths.index_dir.glob("*.faiss") if paths.index_dir.is_dir() else []),
             *sorted(paths.features_dir.glob("*.json") if paths.features_dir.is_dir() else [])]
    for f in files:
        h.update(f.name.encode())
        if f.is_file():
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    for asset in ASSETS:
        h.update(page_asset(asset).encode())
    return h.hexdigest()


def gallery_up_to_date(run_dir: str | Path, classes: list[str] | None = None, **render_args: Any) -> bool:
    """True when the page exists and was rendered from exactly the current inputs."""
    paths = RunPaths(Path(run_dir))
    saved = read_json(_inputs_path(paths), default=None) or {}
    return paths.gallery.exists() and (paths.gallery_dir / "data" / "meta.js").exists() and \
        saved.get("inputs") == gallery_inputs(run_dir, classes, **render_args)


def render_gallery(run_dir: str | Path, classes: list[str] | None = None, thumb_size: int = 64,
                   page_size: int = 100, per_sheet: int = 256) -> Path:
    """Write the run's review page (`gallery/index.html`) and return its path.

    classes: teacher class names (default: `data.classes` of the run's config.yaml).
    thumb_size: thumbnail side in pixels; page_size: tiles per page; per_sheet: thumbnails
    per sprite-sheet JPEG (smaller sheets make the first page load less image data).
    """
    if thumb_size < 8 or page_size < 1 or per_sheet < 1:
        raise ValueError(f"thumb_size >= 8, page_size >= 1 and per_sheet >= 1 "
                         f"(got {thumb_size}, {page_size}, {per_sheet})")
    t0 = time.perf_counter()
    paths = RunPaths(Path(run_dir))
    data = load_run(paths.root, classes)
    summary = summarize(data)
    item_ids = data.items["id"].tolist() if data.n else []
    in_items = set(item_ids)
    extra_ids = [i for i in data.dup_of if i not in in_items]    # group members without a ledger row
    tidx = build_thumbnails(paths.root, item_ids + extra_ids, thumb_size, per_sheet)
    slots = tidx.slots()
    t_thumbs = time.perf_counter() - t0

    gdir = paths.gallery_dir
    errors = label_errors(data) if data.n else None
    neighbours = page_neighbours(paths, [data.manifest_rows.get(i, -1) for i in item_ids],
                                 len(data.manifest_rows)) if data.n else None
    cols = _columns(data, slots, errors, neighbours) if data.n else {}
    labels = cols.pop("_labels", [])
    names = [k for k in cols]
    token = hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:10]
    chunks = max(1, math.ceil(data.n / CHUNK_ROWS))
    for c in range(chunks):
        part = {k: v[c * CHUNK_ROWS:(c + 1) * CHUNK_ROWS] for k, v in cols.items()}
        atomic_write_text(gdir / "data" / f"rows_{c:03d}.js",
                          "(window.WEBKD_CHUNKS = window.WEBKD_CHUNKS || []).push(" + js_json(part) + ");\n")
    meta = {
        "run": {"name": paths.root.resolve().name, "path": str(paths.root.resolve()),
                "key": hashlib.sha256(str(paths.root.resolve()).encode()).hexdigest()[:16],
                "rendered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "epochs": data.epochs, "records": summary.records},
        "columns": names, "chunks": chunks, "n": data.n, "page_size": int(page_size),
        "classes": data.classes, "web_labels": labels, "reasons": data.reasons,
        "reason_info": {r: list(REASONS.get(r, (r[:4], RECORD_REASONS.get(r, r)))) for r in data.reasons},
        "thumbs": {"dir": tidx.dir.name, "size": thumb_size, "per_sheet": per_sheet, "cols": tidx.cols,
                   "sheets": [ThumbIndex.sheet_name(k) for k in range(tidx.n_sheets)]},
        "extra": {"id": extra_ids, "uri": [data.uri.get(i) for i in extra_ids],
                  "g": [slots.get(i, -1) for i in extra_ids], "rep": [data.dup_of[i] for i in extra_ids]},
        "summary": summary.to_json(), "stored_overrides": len(data.overrides), "student": data.student_source,
        "overrides_error": data.overrides_error,
        "label_errors": {"source": errors.source if errors else None,
                         "flagged": int(errors.flagged.sum()) if errors else 0},
        "neighbours": {"encoder": neighbours[2], "k": int(neighbours[0].shape[1])} if neighbours else None,
    }
    atomic_write_text(gdir / "data" / "meta.js", "window.WEBKD_META = " + js_json(meta) + ";\n")
    for asset in ("app.js", "review.js"):
        atomic_write_text(gdir / asset, page_asset(asset))
    scripts = "\n".join(f'<script src="data/rows_{c:03d}.js?v={token}"></script>' for c in range(chunks))
    page = (page_asset("index.html").replace("{{TITLE}}", html.escape(paths.root.resolve().name, quote=True))
            .replace("{{CSS}}", page_asset("style.css")).replace("{{TOKEN}}", token).replace("{{SCRIPTS}}", scripts))
    atomic_write_text(paths.gallery, page)
    for stale in (gdir / "data").glob("rows_*.js"):      # chunks of an earlier, larger render
        m = re.match(r"rows_(\d+)\.js$", stale.name)
        if m and int(m.group(1)) >= chunks:
            stale.unlink(missing_ok=True)
    atomic_write_json(_inputs_path(paths), {"inputs": gallery_inputs(
        paths.root, classes, thumb_size=thumb_size, page_size=page_size, per_sheet=per_sheet)})
    log.info("gallery: %d images, %d thumbnails made (%.1f s), page written in %.1f s: %s",
             data.n, tidx.generated, t_thumbs, time.perf_counter() - t0, paths.gallery)
    return paths.gallery
