"""The review page (selection/gallery.py): a run made from real photos, driven in headless
Chromium (Playwright), counts checked against the ledger, the override round trip, hostile
web strings, the thumbnail cache, and `webkd inspect`."""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from webkd.pipeline.config import RunPaths
from webkd.pipeline.records import QuarantineRow, Record, save_manifest, save_quarantine
from webkd.pipeline.storage import atomic_write_table
from webkd.selection.gallery import js_json, render_gallery
from webkd.selection.run_data import load_run, summarize_run
from webkd.selection.overrides import apply_overrides, import_overrides_file, load_overrides, record_overrides
from webkd.selection.thumbnails import build_thumbnails

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TEACHER = ["t-shirt", "pants", "longsleeve", "dress", "outwear", "shirt", "shoes"]   # clothing classes
HOSTILE_LABEL = "<script>alert(1)</script>"
HOSTILE_FILE = "\"'><img src=x onerror=alert(1)>&amp; Ünïcødé ✓ 漢字\u2028end"
HOSTILE_CAPTION = "cap \"'><img src=x onerror=alert(2)> &amp; <script>alert(3)</script> Ünïcødé ✓ 漢字 \u2028 \u2029 line"
HOSTILE_CLASS = "<b>bold</b> & \"q\""

# The documented ledger columns (ARCHITECTURE.md), written with exactly these types.
LEDGER_SCHEMA = pa.schema([
    ("id", pa.string()), ("row", pa.int64()), ("epoch", pa.int32()), ("split", pa.string()),
    ("kept", pa.bool_()), ("weight", pa.float32()), ("reason", pa.string()),
    ("pseudo_label", pa.int32()), ("confidence", pa.float32()), ("threshold", pa.float32()),
    ("teacher_share", pa.float32()), ("teacher_top1", pa.int32()), ("teacher_top2", pa.int32()),
    ("teacher_p1", pa.float32()), ("teacher_p2", pa.float32()), ("student_pred", pa.int32()),
    ("student_conf", pa.float32()), ("web_label", pa.string()), ("web_class", pa.int32()),
    ("knn_agree", pa.float32()),
])


def write_ledger(path: Path, cols: dict) -> None:
    table = pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in LEDGER_SCHEMA}, schema=LEDGER_SCHEMA)
    try:  # the policy's writer checks the table against its own schema: the contract holds
        from webkd.selection.policy import write_ledger as policy_write
    except ImportError:
        atomic_write_table(path, table)
    else:
        policy_write(path, table)


def make_run(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], *,
             epochs: int = 3, seed: int = 0, names: list[str] | None = None,
             captions: list[str | None] | None = None, urls: list[str | None] | None = None,
             queries: list[str] | None = None, n_dups: int = 3, val_every: int = 10,
             classes: list[str] = TEACHER, collapse: int | None = None) -> dict:
    """A run directory from real photos: files on disk, manifest (sha256 ids), ledgers.

    Queries are the clothing class names (some off-class for the teacher). Decisions are a
    deterministic mix of selected / below_class_threshold / low_confidence / off_class /
    near_duplicate / validation over `epochs` epochs. `collapse`: a pseudo-label whose train
    rows are all rejected after epoch 0 (a class that loses its kept images).
    """
    rng = np.random.default_rng(seed)
    web = root / "web"
    records = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        q = queries[i] if queries else class_names[int(lab)]
        d = web / (class_names[int(lab)])
        d.mkdir(parents=True, exist_ok=True)
        p = d / (f"{names[i]}.jpg" if names else f"img_{i:04d}.jpg")
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        p.write_bytes(data)
        records.append(Record(id=hashlib.sha256(data).hexdigest(), uri=str(p), source=f"folder:{web}",
                              web_label=q, web_labels=[q], caption=captions[i] if captions else None,
                              url=urls[i] if urls else None, length=len(data), width=img.shape[1],
                              height=img.shape[0], format="JPEG", mode="RGB"))
    ids = [r.id for r in records]
    assert len(set(ids)) == len(ids), "duplicate images in the fixture slice"
    n = len(records)
    # near duplicates: members point at the representative (another image of the same query)
    dups: dict[int, int] = {}
    for m in range(n - 1, 0, -1):
        if len(dups) >= n_dups:
            break
        rep = next((r for r in range(m) if records[r].web_label == records[m].web_label
                    and r not in dups and r not in dups.values()), None)
        if rep is not None and m not in dups.values():
            dups[m] = rep
            records[m].status, records[m].dup_of = "near_duplicate", ids[rep]
    paths = RunPaths(root / "run")
    paths.root.mkdir(parents=True)
    save_manifest(paths.manifest, records)
    (paths.root / "config.yaml").write_text(json.dumps({"data": {"classes": classes}}))

    lookup = {c: k for k, c in enumerate(classes)}
    web_class = np.array([lookup.get(r.web_label, -1) for r in records])
    split = np.array(["val" if (val_every and i % val_every == val_every - 1) else "train" for i in range(n)])
    K = len(classes)
    ledgers = []
    for e in range(epochs):
        noisy = rng.random(n) < 0.3
        pl = np.where((web_class >= 0) & ~noisy, web_class, rng.integers(0, K, n)).astype(np.int32)
        conf = rng.uniform(0.15, 1.0, n).astype(np.float32)
        thr = (0.45 + 0.05 * (pl % 4)).astype(np.float32)
        top2 = ((pl + 1 + rng.integers(0, K - 1, n)) % K).astype(np.int32)
        p2 = (rng.random(n) * (1 - conf)).astype(np.float32)
        reason = np.where(conf < 0.3, "low_confidence", np.where(conf < thr, "below_class_threshold", "selected"))
        reason = np.where(web_class < 0, "off_class", reason)
        reason = np.where([i in dups for i in range(n)], "near_duplicate", reason)
        if collapse is not None and e > 0:
            reason = np.where((pl == collapse) & (reason == "selected"), "below_class_threshold", reason)
        reason = np.where(split == "val", "validation", reason).astype(object)
        kept = reason == "selected"
        cols = {
            "id": ids, "row": np.arange(n), "epoch": np.full(n, e), "split": split, "kept": kept,
            "weight": kept.astype(np.float32), "reason": reason, "pseudo_label": pl, "confidence": conf,
            "threshold": thr, "teacher_share": np.full(n, max(0.0, 1 - e / 2)), "teacher_top1": pl,
            "teacher_top2": top2, "teacher_p1": conf, "teacher_p2": p2,
            "student_pred": np.full(n, -1) if e == 0 else pl,
            "student_conf": np.full(n, np.nan) if e == 0 else conf * 0.9,
            "web_label": [r.web_label for r in records], "web_class": web_class,
            "knn_agree": np.full(n, np.nan),
        }
        write_ledger(paths.ledger(e), cols)
        ledgers.append(cols)
    return {"paths": paths, "records": records, "ids": ids, "ledgers": ledgers, "dups": dups,
            "classes": classes}


@pytest.fixture(scope="module")
def shirts(clothing):
    """250 real clothing photos from several classes (shuffled, deterministic)."""
    rng = np.random.default_rng(1)
    idx = rng.permutation(len(clothing.labels))[:250]
    return clothing.images[idx], clothing.labels[idx], clothing.class_names


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright; skipped (with the reason) only if it cannot start."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        print(f"SKIP reason: playwright not importable: {exc}")
        pytest.skip(f"playwright not importable: {exc}")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as exc:
        pw.stop()
        print(f"SKIP reason: Chromium cannot be launched from {CHROMIUM}: {exc}")
        pytest.skip(f"Chromium cannot be launched from {CHROMIUM}: {str(exc)[:300]}")
    yield b
    b.close()
    pw.stop()


def open_page(browser, url: str, dialogs: list | None = None):
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    if dialogs is not None:
        def on_dialog(d):
            dialogs.append(d.message)
            d.dismiss()
        page.on("dialog", on_dialog)
    t0 = time.perf_counter()
    page.goto(url, wait_until="load")
    page.wait_for_selector(".tile", state="visible", timeout=10_000)
    return ctx, page, time.perf_counter() - t0, errors


def text(page, sel: str) -> str:
    return page.text_content(sel) or ""


# --------------------------------------------------------------------------------------------
def test_browser_filters_counts_and_override_round_trip(tmp_path, shirts, browser):
    images, labels, names = shirts
    collapse = TEACHER.index("t-shirt")
    run = make_run(tmp_path, images, labels, names, collapse=collapse)
    paths = run["paths"]
    from webkd.training.export import save_student_predictions
    exported_ids = run["ids"][:5]                      # the exported student's predictions (class 3)
    save_student_predictions(paths.export_dir, exported_ids, np.eye(len(TEACHER))[[3] * 5] * 4, "web: v0001")
    out = render_gallery(paths.root)
    assert out == paths.gallery and out.exists()
    last = run["ledgers"][-1]
    kept, reason = np.asarray(last["kept"]), np.asarray(last["reason"]).astype(str)
    pl, conf = np.asarray(last["pseudo_label"]), np.asarray(last["confidence"]).astype(np.float64)
    wlab = np.array([r.web_label for r in run["records"]])
    train = np.asarray(last["split"]) != "val"

    ctx, page, dt, errors = open_page(browser, out.as_uri())
    assert dt < 5.0, f"page took {dt:.2f} s to load and show tiles"
    # every sprite sheet the first page uses has really loaded (a decoded image, not a 404)
    sheets = page.evaluate("""() => Array.from(new Set(Array.from(document.querySelectorAll('.tile .thumb'))
        .map(d => d.style.backgroundImage.slice(5, -2))))""")
    assert sheets
    sizes = page.evaluate("""async (urls) => Promise.all(urls.map(u => new Promise(ok => {
        const im = new Image(); im.onload = () => ok(im.naturalWidth); im.onerror = () => ok(-1); im.src = u; })))""", sheets)
    assert all(s > 0 for s in sizes), sizes

    # default view: kept tab, all classes
    assert int(text(page, "#n-kept")) == kept.sum()
    assert int(text(page, "#n-rejected")) == (~kept & train).sum()     # validation rows are not rejections
    assert int(text(page, "#n-val")) == (~train).sum() > 0
    assert int(text(page, "#n-shown")) == kept.sum()
    # tiles are sorted by score (confidence), highest first
    scores = [float(s) for s in page.eval_on_selector_all(".tile .f-score", "els => els.map(e => e.textContent)")]
    assert scores == sorted(scores, reverse=True)

    # filter by pseudo-label class
    k = int(np.bincount(pl[~kept]).argmax())
    page.select_option("#f-class", str(k))
    assert int(text(page, "#n-kept")) == (kept & (pl == k)).sum()
    assert int(text(page, "#n-rejected")) == (~kept & train & (pl == k)).sum()
    # ... and by reason (rejected tab)
    page.click("button[data-tab=rejected]")
    r_idx = page.evaluate("WEBKD_META.reasons.indexOf('below_class_threshold')")
    page.select_option("#f-reason", str(r_idx))
    want = (~kept & (pl == k) & (reason == "below_class_threshold")).sum()
    assert want > 0
    assert int(text(page, "#n-rejected")) == want
    assert int(text(page, "#n-shown")) == want
    assert page.locator(".tile").count() == want      # none of these are folded near-duplicates
    assert all(t == "below_class_threshold" for t in page.eval_on_selector_all(".tile .f-reason", "els => els.map(e => e.textContent)"))
    # ... and by score range (whole classes again)
    page.select_option("#f-class", "*")
    page.fill("#f-smin", "0.4")
    page.fill("#f-smax", "0.55")
    c4 = np.round(conf, 4)
    assert int(text(page, "#n-rejected")) == (~kept & (reason == "below_class_threshold") & (c4 >= 0.4) & (c4 <= 0.55)).sum()
    page.click("#b-reset")
    # web-query view
    page.select_option("#f-view", "query")
    q = "hat"                                          # off-class for this teacher
    w_idx = page.evaluate("(q) => WEBKD_META.web_labels.indexOf(q)", q)
    page.select_option("#f-class", str(w_idx))
    page.click("button[data-tab=all]")
    assert int(text(page, "#n-all")) == (wlab == q).sum() > 0
    assert int(text(page, "#n-kept")) == 0           # off-class queries are never kept
    assert int(text(page, "#n-rejected")) == ((wlab == q) & train).sum()
    page.click("#b-reset")
    # the validation tab: every held-out row, tiles marked "validation", never "rejected"
    page.click("button[data-tab=validation]")
    assert int(text(page, "#n-shown")) == (~train).sum()
    assert set(page.eval_on_selector_all(".tile .f-reason", "els => els.map(e => e.textContent)")) == {"validation"}
    assert page.locator(".tile.rejected").count() == 0 and page.locator(".tile.validation").count() > 0
    page.click("#b-reset")

    # the student's prediction: the exported student's where it has one, else the newest ledger's
    page.click("button[data-tab=all]")
    page.fill("#f-q", exported_ids[0])
    st = page.locator(f".tile[data-id='{exported_ids[0]}'] .f-student")
    assert st.text_content().startswith(f"student: {TEACHER[3]} 0.9") and "exported student (web: v0001)" in st.get_attribute("title")
    other = run["ids"][7]
    page.fill("#f-q", other)
    st = page.locator(f".tile[data-id='{other}'] .f-student")
    assert st.text_content() == f"student: {TEACHER[int(pl[7])]} {last['student_conf'][7]:.2f}" and "epoch-2" in st.get_attribute("title")
    page.click("#b-reset")

    # summary: in-class vs off-class query shares and the collapsed class, as `webkd inspect` says
    s = summarize_run(paths.root)
    inq = train & (np.asarray(last["web_class"]) >= 0)
    assert (s.in_class.images, s.in_class.kept) == (inq.sum(), (kept & inq).sum())
    assert (s.off_class.images, s.off_class.kept) == ((train & ~inq).sum(), 0)
    assert text(page, "p.shares") == "Web queries (train rows): " + s.to_json()["shares_line"]
    assert f"off-class queries: kept 0 / {(train & ~inq).sum()} (0.00%)" in text(page, "p.shares")
    assert [c.pseudo_label for c in s.collapsed] == [collapse] and s.collapsed[0].epoch == 1
    assert page.locator("#collapse").is_visible()
    assert text(page, "#collapse p.collapsed") == s.collapse_lines()[0]
    assert f"class t-shirt lost (nearly) all its kept images at epoch 1" in s.collapse_lines()[0]
    assert f"warning: {s.collapse_lines()[0]}" in s.text() and s.to_json()["shares_line"] in s.text()

    # summary table: kept / rejected per pseudo-label class (train rows: validation is not a rejection)
    rows = page.eval_on_selector_all("table.sum:first-of-type tr", "rs => rs.slice(1).map(r => Array.from(r.cells).map(c => c.textContent))")
    for name, nk, nr, _ in rows:
        c = run["classes"].index(name)
        assert (int(nk), int(nr)) == ((kept & (pl == c)).sum(), (~kept & train & (pl == c)).sum())

    # a tile shows the decision history over every epoch
    first = page.locator(".tile").first
    fid = first.get_attribute("data-id")
    chips = first.locator(".chip").all_text_contents()
    assert len(chips) == 3 and chips[0].startswith("0")

    # near-duplicate groups: one representative tile per group in the All tab
    page.click("button[data-tab=all]")
    n_all, n_tiles = int(text(page, "#n-shown")), int(text(page, "#n-tiles"))
    assert n_tiles == n_all - len(run["dups"])
    rep_id = run["ids"][next(iter(run["dups"].values()))]
    page.fill("#f-q", rep_id[:20])
    page.locator(f".tile[data-id='{rep_id}'] button.grp").click()
    assert page.locator(f".tile[data-id='{rep_id}'] .group .member").count() >= 1
    page.click("#b-reset")

    # reject a kept image, export the overrides (a real download)
    assert reason[run["ids"].index(fid)] == "selected"
    first = page.locator(f".tile[data-id='{fid}']")
    first.locator("button.rej").click()
    assert text(page, "#n-ov") == "1"
    with page.expect_download() as dl:
        page.click("#b-export")
    exported = tmp_path / "export.json"
    dl.value.save_as(exported)
    doc = json.loads(exported.read_text())
    assert doc["version"] == 1 and doc["entries"][fid]["action"] == "reject"
    # the page keeps its overrides across a reload (localStorage on file://)
    page.reload(wait_until="load")
    page.wait_for_selector(".tile")
    assert text(page, "#n-ov") == "1"
    # bulk accept of a filtered set, then clear it again
    page.click("button[data-tab=rejected]")
    page.select_option("#f-reason", str(r_idx))
    n_set = int(text(page, "#n-shown"))
    page.click("#b-accept-all")
    assert int(text(page, "#n-ov")) == 1 + n_set
    page.click("#b-clear-filter")
    assert text(page, "#n-ov") == "1"
    assert not errors, errors
    ctx.close()

    # import into the store: the next selection's ledger rejects it with reason "override"
    ch = import_overrides_file(paths.overrides, exported)
    assert ch.added == {fid: "reject"}
    ov = load_overrides(paths.overrides)
    keep2, reason2 = apply_overrides(kept, reason, run["ids"], ov)
    j = run["ids"].index(fid)
    assert kept[j] and not keep2[j] and reason2[j] == "override"
    assert (keep2 != kept).sum() == 1
    # the re-rendered page shows the stored override on the tile
    render_gallery(paths.root)
    ctx, page, _, _ = open_page(browser, paths.gallery.as_uri())
    page.fill("#f-q", fid)
    page.click("button[data-tab=all]")
    assert "stored: reject" in text(page, f".tile[data-id='{fid}'] .ovstate") or \
        "page: reject" in text(page, f".tile[data-id='{fid}'] .ovstate")
    ctx.close()


def _hostile_run(tmp_path, shirts) -> dict:
    images, labels, names = shirts
    n = 12
    fnames = [f"img_{i}" for i in range(n)]
    fnames[0] = HOSTILE_FILE
    fnames[1] = "quote\"and'apos &lt;not-an-entity&gt;"
    queries = [names[int(l)] for l in labels[:n]]
    queries[0] = HOSTILE_LABEL
    queries[2] = "Ünïcødé ✓ 漢字 \u2028 query"
    caps = [None] * n
    caps[0] = HOSTILE_CAPTION
    urls = [None] * n
    urls[0] = "javascript:alert(4)"
    urls[1] = "https://example.com/?q=<script>alert(5)</script>&x=\"y\""
    classes = [HOSTILE_CLASS] + TEACHER[1:]
    return make_run(tmp_path, images[:n], labels[:n], names, names=fnames, captions=caps, urls=urls,
                    queries=queries, n_dups=1, val_every=0, classes=classes, epochs=2)


def _page_data(gdir: Path) -> tuple[dict, list[dict]]:
    meta = (gdir / "data" / "meta.js").read_text()
    m = re.fullmatch(r"window\.WEBKD_META = (.*);\n", meta, re.S)
    chunks = []
    for p in sorted((gdir / "data").glob("rows_*.js")):
        c = re.fullmatch(r"\(window\.WEBKD_CHUNKS = window\.WEBKD_CHUNKS \|\| \[\]\)\.push\((.*)\);\n",
                         p.read_text(), re.S)
        chunks.append(json.loads(c.group(1)))
    return json.loads(m.group(1)), chunks


def test_hostile_names_are_escaped_in_files(tmp_path, shirts):
    run = _hostile_run(tmp_path, shirts)
    page = render_gallery(run["paths"].root)
    gdir = page.parent
    html = page.read_text(encoding="utf-8")
    assert "alert" not in html and "<img" not in html and "onerror" not in html
    for p in (gdir / "data").glob("*.js"):
        raw = p.read_bytes()
        assert raw.isascii(), f"{p.name}: non-ASCII bytes (U+2028 etc. must be \\u escapes)"
        s = raw.decode()
        for bad in ("<", ">", "&", "\u2028", "\u2029"):
            assert bad not in s, f"{p.name} contains a raw {bad!r}"
    # ... and the values decode back exactly (quotes and unicode preserved for display)
    meta, chunks = _page_data(gdir)
    rows = chunks[0]
    i0 = rows["id"].index(run["ids"][0])
    assert Path(rows["uri"][i0]).name == HOSTILE_FILE + ".jpg"
    assert rows["cap"][i0] == HOSTILE_CAPTION
    assert meta["web_labels"][rows["wl"][i0]] == HOSTILE_LABEL
    assert HOSTILE_CLASS in meta["classes"]
    assert "Ünïcødé ✓ 漢字 \u2028 query" in meta["web_labels"]
    # the page code itself never feeds data to innerHTML / document.write / eval
    app = (gdir / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in app
    # the helper escapes what it must and nothing else
    s = js_json({"k": "</script><!-- & \u2028 é"})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s and s.isascii()
    assert json.loads(s) == {"k": "</script><!-- & \u2028 é"}


def test_hostile_names_show_literally_in_browser(tmp_path, shirts, browser):
    run = _hostile_run(tmp_path, shirts)
    page_path = render_gallery(run["paths"].root)
    dialogs: list[str] = []
    ctx, page, _, errors = open_page(browser, page_path.as_uri(), dialogs)
    page.click("button[data-tab=all]")
    page.select_option("#f-view", "query")               # class options now carry the hostile query
    hid = run["ids"][0]
    tile = page.locator(f".tile[data-id='{hid}']")
    assert tile.count() == 1
    assert tile.locator(".f-web .v").text_content() == HOSTILE_LABEL
    assert tile.locator(".f-file .v").text_content() == HOSTILE_FILE + ".jpg"
    assert tile.locator(".f-cap .v").text_content() == HOSTILE_CAPTION
    assert tile.locator(".f-url .v").text_content() == "javascript:alert(4)"   # text, not a link
    t1 = page.locator(f".tile[data-id='{run['ids'][1]}']")
    assert t1.locator(".f-file .v").text_content() == "quote\"and'apos &lt;not-an-entity&gt;.jpg"
    assert t1.locator(".f-url a").get_attribute("href") == "https://example.com/?q=<script>alert(5)</script>&x=\"y\""
    opts = page.eval_on_selector_all("#f-class option", "os => os.map(o => o.textContent)")
    assert any(o.startswith(HOSTILE_LABEL + " (") for o in opts)
    page.select_option("#f-view", "pseudo")
    opts = page.eval_on_selector_all("#f-class option", "os => os.map(o => o.textContent)")
    assert any(o.startswith(HOSTILE_CLASS) for o in opts)
    assert HOSTILE_CLASS in page.text_content("#summary-body")
    # nothing was injected: no dialog, no <img>, no extra <script>, no javascript: link
    page.wait_for_timeout(200)
    assert dialogs == []
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("document.querySelectorAll('script').length") == 4      # meta, 1 chunk, app, review
    assert page.evaluate("document.querySelectorAll('a[href^=\"javascript\"]').length") == 0
    assert page.evaluate("document.querySelectorAll('b').length") == page.evaluate(
        "document.querySelectorAll('#actions b').length")                          # only the page's own
    assert not errors, errors
    ctx.close()


def test_thumbnails_cached_and_taken_from_pixel_cache(tmp_path, shirts):
    images, labels, names = shirts
    run = make_run(tmp_path, images[:40], labels[:40], names, n_dups=2)
    paths = run["paths"]
    # a pixel cache of *inverted* images, row-aligned: the thumbnails must come from it
    px = paths.pixels(32, "squash")
    px.parent.mkdir(parents=True)
    small = np.stack([np.asarray(Image.fromarray(im).resize((32, 32))) for im in images[:40]])
    np.save(px, 255 - small)                                  # (N, 32, 32, 3) uint8
    idx = build_thumbnails(paths.root, run["ids"][:30], thumb_size=32, per_sheet=16)
    assert idx.generated == 30 and idx.n_sheets == 2 and idx.failed == 0
    sheet = np.asarray(Image.open(idx.dir / idx.sheet_name(0)).convert("RGB"), dtype=np.float64)
    cell = sheet[:32, :32]                                    # slot 0 = ids[0]
    assert np.abs(cell - (255 - small[0])).mean() < 12       # inverted = from the cache
    assert np.abs(cell - small[0]).mean() > 30
    mtimes = {p.name: p.stat().st_mtime_ns for p in idx.dir.glob("sheet_*.jpg")}
    # re-run: nothing regenerated; new ids extend the last partial sheet, then a new one
    again = build_thumbnails(paths.root, run["ids"][:30], thumb_size=32, per_sheet=16)
    assert again.generated == 0 and again.ids == idx.ids
    assert {p.name: p.stat().st_mtime_ns for p in idx.dir.glob("sheet_*.jpg")} == mtimes
    # rows beyond the pixel cache decode the original file (load_rgb): not inverted
    np.save(px, (255 - small)[:35])
    more = build_thumbnails(paths.root, run["ids"], thumb_size=32, per_sheet=16)
    assert more.generated == 10 and more.n_sheets == 3
    slot = more.slots()[run["ids"][39]]
    sheet = np.asarray(Image.open(more.dir / more.sheet_name(slot // 16)).convert("RGB"), dtype=np.float64)
    r, c = divmod(slot % 16, 4)
    cell = sheet[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
    orig = np.asarray(Image.fromarray(images[39]).resize((32, 32), Image.BICUBIC), dtype=np.float64)
    assert np.abs(cell - orig).mean() < 12
    # earlier cells of the extended sheet survived the rewrite
    s1 = np.asarray(Image.open(more.dir / more.sheet_name(1)).convert("RGB"), dtype=np.float64)
    assert np.abs(s1[:32, :32] - (255 - small[16])).mean() < 14
    # a whole render reuses the cache (the page's own 64 px size is a separate cache)
    render_gallery(paths.root, thumb_size=32, per_sheet=16)
    assert build_thumbnails(paths.root, run["ids"], thumb_size=32, per_sheet=16).generated == 0
    # an image that vanished gets a placeholder, not a crash
    Path(run["records"][0].uri).unlink()
    px.unlink()
    fresh = build_thumbnails(paths.root, run["ids"][:3], thumb_size=48, per_sheet=16)
    assert fresh.generated == 3 and fresh.failed == 1


def test_render_empty_and_partial_runs(tmp_path, shirts):
    images, labels, names = shirts
    run = make_run(tmp_path, images[:8], labels[:8], names, epochs=1, n_dups=0)
    for e in range(1):
        run["paths"].ledger(e).unlink()
    page = render_gallery(run["paths"].root)             # manifest, no ledger yet: still a page
    meta, chunks = _page_data(page.parent)
    assert meta["n"] == 0 and meta["summary"]["records"] == 8
    with pytest.raises(ValueError, match="no such run directory"):
        render_gallery(tmp_path / "nope")


def test_inspect_and_override_cli(tmp_path, shirts, capsys):
    from webkd.flows.__main__ import main

    images, labels, names = shirts
    run = make_run(tmp_path, images[:60], labels[:60], names)
    paths = run["paths"]
    save_quarantine(paths.quarantine, [QuarantineRow(uri=f"/web/bad{i}.jpg", source="folder:/web", reason=r)
                                       for i, r in enumerate(["truncated", "truncated", "not_an_image"])])
    last = run["ledgers"][-1]
    s = summarize_run(paths.root)
    assert s.images == 60 and s.kept == int(np.sum(last["kept"]))
    val = np.asarray(last["split"]) == "val"
    assert s.validation == int(val.sum()) > 0 and s.rejected == int((~np.asarray(last["kept"]) & ~val).sum())
    assert s.kept + s.rejected + s.validation == s.images
    assert "validation" not in dict(s.reasons)                   # validation rows are not rejections
    assert s.quarantine == {"truncated": 2, "not_an_image": 1}
    assert s.groups == len(set(run["dups"].values())) and s.group_members == len(run["dups"])

    assert main(["inspect", str(paths.root)]) == 0
    out = capsys.readouterr().out
    assert "records: 60 (near_duplicate 3, ok 57)" in out and f"kept {s.kept}" in out
    assert "quarantined at ingest: 3 (truncated 2, not_an_image 1)" in out
    assert f"rejected {s.rejected}, validation {s.validation}" in out
    top = ", ".join(f"{r} {n}" for r, n in s.reasons[:6])
    assert f"top rejection reasons: {top}" in out
    assert f"gallery: {paths.gallery}" in out and paths.gallery.exists()
    for c in s.by_pseudo:
        assert re.search(rf"^\s+{re.escape(c.name)}\s+{c.kept}\s+{c.rejected}\s", out, re.M)

    a, b = run["ids"][0], run["ids"][1]
    assert main(["override", str(paths.root), "--reject", a, "--accept", b, "--note", "looked at it"]) == 0
    out = capsys.readouterr().out
    assert f"+ reject {a}" in out and f"+ accept {b}" in out
    assert load_overrides(paths.overrides) == {a: "reject", b: "accept"}
    assert main(["override", str(paths.root), "--remove", a, "--accept", "f" * 64]) == 0
    out = capsys.readouterr().out
    assert f"- reject {a}" in out and "not in the manifest" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "entries": {a: {"action": "keep"}}}))
    assert main(["override", str(paths.root), str(bad)]) == 2
    assert "unknown action 'keep'" in capsys.readouterr().err
    assert main(["inspect", str(paths.root)]) == 0
    out = capsys.readouterr().out
    assert "overrides: 2 (accept 2)" in out and "re-rendered" in out     # the store is newer
    assert main(["inspect", str(paths.root)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(str(paths.gallery))  # up to date: not rendered
    # a record_overrides call from the library shows in the next inspect
    record_overrides(paths.overrides, reject=[b])
    assert "overrides: 2 (accept 1, reject 1)" in summarize_run(paths.root).text()
    assert load_run(paths.root).overrides[b] == "reject"
