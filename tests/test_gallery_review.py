"""The review page fixes curation (issue 14 part 2), driven in headless Chromium on real photos:
relabel, the likely-label-error sort (confident learning), the web query x pseudo-label matrix,
the large view with "more like this" from a real FAISS index. The served write path is
tests/test_gallery_serve.py."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from test_gallery import TEACHER, make_run, open_page, text
from test_gallery import browser, shirts  # noqa: F401 (the fixtures, shared)
from webkd.pipeline.index import brute_force_knn, build_index, save_index
from webkd.pipeline.config import IndexConfig
from webkd.selection.gallery import render_gallery
from webkd.selection.label_errors import confident_learning, softmax
from webkd.selection.overrides import import_overrides_file, load_labels

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
