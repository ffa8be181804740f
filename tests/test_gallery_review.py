"""The review page fixes curation (issue 14 part 2), driven in headless Chromium on real photos:
relabel, the likely-label-error sort (confident learning), the web query x pseudo-label matrix,
the large view with "more like this" from a real FAISS index, and the served write path
(`webkd inspect --serve` in a subprocess) whose decisions a later reselect and a real
`webkd distill` run use."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from test_gallery import TEACHER, make_run, open_page, text
from test_gallery import browser, shirts  # noqa: F401 (the fixtures, shared)
from webkd.pipeline.index import brute_force_knn, build_index, save_index
from webkd.pipeline.config import IndexConfig
from webkd.selection.gallery import render_gallery
from webkd.selection.label_errors import confident_learning, softmax
from webkd.selection.overrides import import_overrides_file, load_entries, load_labels

ROOT = Path(__file__).resolve().parent.parent
K_NB = 8


def _reference_label_errors(p: np.ndarray, y: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Confident learning written as loops (the rule of selection/label_errors.py): flagged rows,
    best first, and the suggested class of each row."""
    n, k = p.shape
    thr = [np.mean([p[i, j] for i in range(n) if y[i] == j]) if (y == j).any() else np.inf for j in range(k)]
    flagged, sugg = [], np.full(n, -1)
    for i in range(n):
        if y[i] < 0:
            continue
        above = [j for j in range(k) if p[i, j] >= thr[j]]
        if above:
            c = max(above, key=lambda j: p[i, j])
            if c != y[i]:
                flagged.append(i)
                sugg[i] = c
    margin = {i: max(p[i, j] for j in range(k) if j != y[i]) - p[i, y[i]] for i in flagged}
    return sorted(flagged, key=lambda i: -margin[i]), sugg


def _margins(p, y, rows):
    return [max(p[i, j] for j in range(p.shape[1]) if j != y[i]) - p[i, y[i]] for i in rows]


def test_confident_learning_finds_flipped_labels():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 400)
    logits = rng.normal(0, 1, (400, 4))
    logits[np.arange(400), y_true] += 6.0                 # a teacher right on (almost) every row
    y = y_true.copy()
    flip = rng.choice(400, 30, replace=False)
    y[flip] = (y[flip] + 1) % 4                            # 30 wrong web labels
    y[:5] = -1                                             # off-class rows have no label to doubt
    flip = flip[flip >= 5]
    le = confident_learning(softmax(logits), y)
    found = set(np.flatnonzero(le.flagged))
    # rows whose true class is just under its threshold are missed (confident learning counts
    # only confident rows); none of the correctly labelled rows are flagged here
    assert len(found & set(flip)) >= 0.8 * len(flip) and len(found - set(flip)) <= 2
    assert (le.suggested[list(found & set(flip))] == y_true[list(found & set(flip))]).all()
    assert not le.flagged[:5].any() and np.isnan(le.score[~le.flagged]).all()
    order, sugg = _reference_label_errors(softmax(logits), y)
    assert order == sorted(found, key=lambda i: -le.score[i])   # the same rows, the same ranking
    assert (sugg == le.suggested).all()


@pytest.fixture
def indexed_run(tmp_path, shirts):
    """make_run's run plus a real teacher feature cache (a small CNN over the photos) and a real
    FAISS index of its embeddings, as the features and index stages write them."""
    import torch

    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.pipeline.features import extract_features
    from webkd.training.models import build_model

    from types import SimpleNamespace

    from webkd.pipeline.index import normalize

    images, labels, names = shirts
    run = make_run(tmp_path, images, labels, names)
    paths = run["paths"]
    (paths.root / "config.yaml").write_text(yaml.safe_dump({"data": {"classes": TEACHER},
                                                            "teachers": [{"key": "t", "name": "cnn_small"}]}))
    px = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in images])
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="cnn_small", kwargs={"width": 8}, preprocess=PreprocessSpec(size=32)),
                        num_classes=len(TEACHER))
    model.eval()
    with torch.no_grad():   # a nearest-class-mean head on the CNN's embeddings: a teacher with opinions
        emb = model(torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255).embedding.numpy()
    wc = np.asarray(run["ledgers"][0]["web_class"])
    centroids = normalize(np.stack([emb[wc == c].mean(0) if (wc == c).any() else emb.mean(0)
                                    for c in range(len(TEACHER))]) - emb.mean(0))
    mean = torch.from_numpy(emb.mean(0))
    cen = torch.from_numpy(centroids)

    def encode(x):
        e = model(x).embedding
        return SimpleNamespace(embedding=e, logits=8.0 * torch.nn.functional.normalize(e - mean, dim=1) @ cen.T)
    cache = extract_features(encode, px, "t", "test-teacher", paths, device="cpu", row_ids=run["ids"])
    emb = np.asarray(cache.embeddings, np.float32)
    save_index(build_index(emb, IndexConfig(factory="Flat")), paths.index("t"))
    run["emb"], run["logits"] = emb, np.asarray(cache.logits, np.float32)
    return run


def test_relabel_label_errors_matrix_and_more_like_this(indexed_run, browser, tmp_path):
    run = indexed_run
    paths, ids = run["paths"], run["ids"]
    page_path = render_gallery(paths.root)
    meta = json.loads(re.fullmatch(r"window\.WEBKD_META = (.*);\n", (page_path.parent / "data" / "meta.js").read_text(), re.S).group(1))
    assert meta["label_errors"]["source"] == "teacher logits" and meta["label_errors"]["flagged"] > 0
    assert meta["neighbours"] == {"encoder": "t", "k": K_NB}
    last = run["ledgers"][-1]
    web_class = np.asarray(last["web_class"])
    order, sugg = _reference_label_errors(softmax(run["logits"]), web_class)
    assert len(order) == meta["label_errors"]["flagged"]
    sims, nbs = brute_force_knn(run["emb"], run["emb"], K_NB + 1)          # numpy reference, self first

    ctx, page, _, errors = open_page(browser, page_path.as_uri())
    # ---- likely label errors first: the reference ranking, each with its suggested class ----
    page.click("button[data-tab=all]")
    page.uncheck("#f-group")
    page.select_option("#f-sort", "le")
    tiles = page.eval_on_selector_all(".tile", "ts => ts.map(t => t.dataset.id)")
    n_flag = len(order)
    assert n_flag >= 5
    if n_flag > 100:                                   # the first page shows the first 100 tiles
        n_flag = 100
    le_page = page.evaluate("(ids) => ids.map(i => WEBKD_APP.D.le[WEBKD_APP.byId.get(i)])", tiles)
    assert all(v is not None for v in le_page[:n_flag]) and all(v is None for v in le_page[n_flag:])
    assert le_page[:n_flag] == sorted(le_page[:n_flag], reverse=True)     # ranked by the teacher's margin
    ref = dict(zip(order, _margins(softmax(run["logits"]), web_class, order)))
    assert {ids.index(i) for i in tiles[:n_flag]} <= set(order)
    assert all(abs(le_page[k] - ref[ids.index(i)]) < 1.5e-3 for k, i in enumerate(tiles[:n_flag]))
    top = tiles[:2]
    order = [ids.index(i) for i in tiles[:2]]
    first = page.locator(f".tile[data-id='{top[0]}']")
    assert f"suggest {TEACHER[sugg[order[0]]]}" in first.locator(".f-le").text_content()

    # ---- relabel: one click on the suggestion, another image to off-class through the menu ----
    first.locator("button.fix").click()
    assert text(page, f".tile[data-id='{top[0]}'] .ovstate") == f"page: label {TEACHER[sugg[order[0]]]}"
    second = page.locator(f".tile[data-id='{top[1]}']")
    second.locator("select.relabel").select_option(label="off-class")
    second.locator("button.acc").click()                                    # label and decision together
    assert text(page, f".tile[data-id='{top[1]}'] .ovstate") == "page: accept, label off-class"
    assert text(page, "#n-ov") == "2"
    with page.expect_download() as dl:
        page.click("#b-export")
    exported = tmp_path / "export.json"
    dl.value.save_as(exported)
    doc = json.loads(exported.read_text())
    assert doc["entries"][top[0]] == {"action": "relabel", "label": TEACHER[sugg[order[0]]], "note": "gallery",
                                      "time": doc["entries"][top[0]]["time"]}
    assert doc["entries"][top[1]]["action"] == "accept" and doc["entries"][top[1]]["label"] is None
    import_overrides_file(paths.overrides, exported)
    assert load_labels(paths.overrides) == {top[0]: TEACHER[sugg[order[0]]], top[1]: None}

    # ---- the matrix: a cell shows exactly the images of that query with that pseudo-label ----
    page.click("#b-reset")
    page.click("#matrix summary")
    wlab = np.array([r.web_label for r in run["records"]])
    pl = np.asarray(last["pseudo_label"])
    w_name = "pants"
    w = page.evaluate("(q) => WEBKD_META.web_labels.indexOf(q)", w_name)
    p = int(np.bincount(pl[wlab == w_name]).argmax())
    page.click(f"#matrix a.cell[data-w='{w}'][data-p='{p}']")
    want = int(((wlab == w_name) & (pl == p)).sum())
    assert want > 0 and int(text(page, "#n-shown")) == want == int(page.text_content(f"#matrix a.cell[data-w='{w}'][data-p='{p}']"))
    assert "web query pants" in text(page, "#f-note")
    shown = page.eval_on_selector_all(".tile", "ts => ts.map(t => t.dataset.id)")
    assert {ids.index(i) for i in shown} <= set(np.flatnonzero((wlab == w_name) & (pl == p)))
    page.click("#f-note button.clear")
    assert text(page, "#n-shown") != str(want) or want == len(ids)

    # ---- large view: history of every epoch, neighbours from the index with their similarity ----
    page.click("button[data-tab=all]")
    j = ids.index(shown[0])
    page.fill("#f-q", ids[j])
    page.click(f".tile[data-id='{ids[j]}'] .thumb")
    assert page.locator("#viewer").is_visible()
    rows = page.eval_on_selector_all("#viewer .hist-table tr", "rs => rs.slice(1).map(r => Array.from(r.cells).map(c => c.textContent))")
    assert [r[0] for r in rows] == ["0", "1", "2"]
    for e, r in enumerate(rows):
        assert r[2] == str(run["ledgers"][e]["reason"][j]) and r[3] == TEACHER[int(run["ledgers"][e]["pseudo_label"][j])]
        assert r[4] == f"{run['ledgers'][e]['confidence'][j]:.3f}"
    like_ids = page.eval_on_selector_all("#viewer .likeitem", "ls => ls.map(l => l.dataset.id)")
    like_sims = [float(s) for s in page.eval_on_selector_all("#viewer .likeitem .sim", "ls => ls.map(l => l.textContent)")]
    ref = [(int(b), float(s)) for b, s in zip(nbs[j], sims[j]) if b != j][:K_NB]
    assert len(like_ids) == K_NB
    assert np.allclose(like_sims, [s for _, s in ref], atol=2e-3)        # the index's cosine similarity
    assert like_sims == sorted(like_sims, reverse=True)
    exact = [ids[b] for b, _ in ref]
    assert like_ids[:4] == exact[:4] or set(like_ids) == set(exact)       # ties may swap places
    page.click("#viewer button.like-grid")
    assert page.locator("#viewer").is_hidden()
    page.fill("#f-q", "")
    assert int(text(page, "#n-shown")) == K_NB + 1 and "more like" in text(page, "#f-note")
    grid = page.eval_on_selector_all(".tile", "ts => ts.map(t => t.dataset.id)")
    assert grid[0] == ids[j] and set(grid[1:]) == set(like_ids)
    assert not errors, errors
    ctx.close()


# --------------------------------------------------------------------------------------------
# the served write path, then a later reselect and a real distill run use the decisions
# --------------------------------------------------------------------------------------------
CLASSES = ["dress", "longsleeve", "pants", "shoes", "t-shirt"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WEBKD_CACHE", None)
    return env


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, clothing):
    """A real `webkd distill --no-flow` run on 72 real photos (5 classes + an off-class query)."""
    import torch

    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.training.models import build_model, save_weights

    root = tmp_path_factory.mktemp("review")
    rng = np.random.default_rng(0)
    for name in CLASSES + ["hat"]:
        k = clothing.class_names.index(name)
        for i in rng.choice(np.flatnonzero(clothing.labels == k), 12, replace=False):
            p = root / "web" / name / f"c{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(clothing.images[i]).save(p, quality=90)
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(name="cnn_small", kwargs={"width": 8}, preprocess=PreprocessSpec(size=32)),
                          num_classes=len(CLASSES))
    save_weights(teacher, root / "teacher.safetensors")
    cfg = {"name": "review", "seed": 3,
           "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32, "val_fraction": 0.2},
           "teachers": [{"key": "t", "name": "cnn_small", "kwargs": {"width": 8},
                         "weights": str(root / "teacher.safetensors"), "preprocess": {"size": 32}}],
           "student": {"name": "cnn_tiny", "preprocess": {"size": 32}},
           "selection": {"query_top2": True, "p_cut": 0.01},     # off-class / outside the teacher's top-2: rejected
           "train": {"method": "kd", "epochs": 2, "batch_size": 32, "lr": 0.05},
           "index": {"near_dup_threshold": 0.999}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = root / "run"
    p = subprocess.run([sys.executable, "-m", "webkd.flows", "distill", "--no-flow", str(root / "cfg.yaml"),
                        f"run_dir={run}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return root, run


def _serve(run: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "webkd.flows", "inspect", str(run), "--serve"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.time() + 60, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"serving the gallery at (http://127\.0\.0\.1:\d+/)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("server did not start: " + "".join(seen))


def test_served_decisions_reach_reselect_and_distill(distilled, browser):
    import urllib.error
    import urllib.request

    from webkd.flows.stages.curate import pool, teacher_selection
    from webkd.pipeline.config import load_config

    root, run = distilled
    ledger0 = pq.read_table(run / "selection" / "epoch_000.parquet").to_pydict()
    train = [k for k, s in enumerate(ledger0["split"]) if s == "train"]
    kept = [k for k in train if ledger0["kept"][k]]
    rej_i = kept[0]                                                  # kept now: the page rejects it
    off_i = next(k for k in kept[1:] if ledger0["web_class"][k] >= 0)   # in-class query: page -> off-class
    lab_i = next(k for k in train if ledger0["web_class"][k] < 0)    # "hat" (off-class query) -> t-shirt
    ids = ledger0["id"]
    proc, url = _serve(run)
    try:
        assert url.startswith("http://127.0.0.1:")
        # only the page's own token may write; a wrong Host is refused
        req = urllib.request.Request(url + "api/overrides", data=b'{"entries": {}}', method="POST",
                                     headers={"Content-Type": "application/json", "X-Webkd-Token": "guess"})
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(req, timeout=10)
        assert bad.value.code == 403
        ctx = browser.new_context()
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url, wait_until="load")
        page.wait_for_selector("body[data-served='1']", timeout=10_000)
        page.wait_for_selector("#serve-status:not([hidden])")
        page.click("button[data-tab=all]")
        page.uncheck("#f-group")
        page.fill("#f-q", ids[rej_i])
        page.click(f".tile[data-id='{ids[rej_i]}'] button.rej")
        page.wait_for_selector("body[data-saved='1']", timeout=10_000)
        assert json.loads((run / "overrides.json").read_text())["entries"][ids[rej_i]]["action"] == "reject"
        assert "stored: reject" in text(page, f".tile[data-id='{ids[rej_i]}'] .ovstate")
        page.fill("#f-q", ids[off_i])
        page.locator(f".tile[data-id='{ids[off_i]}'] select.relabel").select_option(label="off-class")
        page.wait_for_selector("body[data-saved='2']", timeout=10_000)
        page.fill("#f-q", ids[lab_i])
        page.locator(f".tile[data-id='{ids[lab_i]}'] select.relabel").select_option(label="t-shirt")
        page.wait_for_selector("body[data-saved='3']", timeout=10_000)
        assert "saved to the run: 3 override(s)" in text(page, "#serve-status")
        assert text(page, "#n-ov") == "0"                             # nothing left only on the page
        # a reload shows the live store (the rendered page data is older than the store)
        page.reload(wait_until="load")
        page.wait_for_selector("body[data-served='1']")
        page.wait_for_selector("#serve-status:not([hidden])")
        page.click("button[data-tab=all]")
        page.fill("#f-q", ids[lab_i])
        assert "stored: label t-shirt" in text(page, f".tile[data-id='{ids[lab_i]}'] .ovstate")
        assert not errors, errors
        ctx.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    entries = load_entries(run / "overrides.json")
    assert {i: (e["action"], e.get("label", "-")) for i, e in entries.items()} == {
        ids[rej_i]: ("reject", "-"), ids[off_i]: ("relabel", None), ids[lab_i]: ("relabel", "t-shirt")}
    assert not (run / "run.lock.json").exists()                       # the server let go of the run

    # ---- a later reselect (the curate stage's teacher selection) uses the served decisions ----
    cfg = load_config(root / "cfg.yaml", [f"run_dir={run}"])
    p = pool(cfg)
    r = {i: k for k, i in enumerate(p.ids)}
    assert p.web_class[r[ids[off_i]]] == -1 and p.labels[r[ids[off_i]]] == -1
    assert p.web_class[r[ids[lab_i]]] == CLASSES.index("t-shirt") == p.labels[r[ids[lab_i]]]
    teacher_selection(cfg)
    t = pq.read_table(run / "selection" / "epoch_000.parquet").to_pydict()
    assert not t["kept"][rej_i] and t["reason"][rej_i] == "override"
    assert t["web_class"][off_i] == -1 and t["reason"][off_i] == "off_class" and not t["kept"][off_i]
    assert t["web_class"][lab_i] == CLASSES.index("t-shirt")
    assert ledger0["reason"][lab_i] == "off_class"                  # before: an off-class query

    # ---- a real distill run trains and validates with them (every epoch's ledger) ------------
    d = subprocess.run([sys.executable, "-m", "webkd.flows", "distill", "--no-flow", str(root / "cfg.yaml"),
                        f"run_dir={run}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert d.returncode == 0, d.stdout + d.stderr
    for e in (0, 1):
        t = pq.read_table(run / "selection" / f"epoch_{e:03d}.parquet").to_pydict()
        assert t["reason"][rej_i] == "override" and not t["kept"][rej_i]
        assert t["web_class"][off_i] == -1 and t["reason"][off_i] == "off_class"
        assert t["web_class"][lab_i] == CLASSES.index("t-shirt")
    ck = json.loads((run / "metrics.json").read_text())
    assert ck  # the run finished its epochs with the new labels
    import torch

    trained_on = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["trained_on"]
    from webkd.training.pool import pool_state

    assert trained_on["overrides_sha256"] == pool_state(p.ids, {i: e["action"] for i, e in entries.items()}, "",
                                                        load_labels(run / "overrides.json"))["overrides_sha256"]
