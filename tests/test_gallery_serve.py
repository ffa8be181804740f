"""The served write path of the review page (issue 14 part 2): `webkd inspect RUN --serve` in a
subprocess on a real curated run, decisions clicked in headless Chromium land in overrides.json
(through the store's file lock and the run lock), a later reselect uses them and a real
`webkd distill` run trains and validates with the corrected labels."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import clothing_web, tiny_teacher
from test_gallery import text
from test_gallery import browser  # noqa: F401 (the fixture, shared)
from webkd.selection.overrides import load_entries, load_labels

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "longsleeve", "pants", "shoes", "t-shirt"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WEBKD_CACHE", None)
    return env


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, clothing):
    """A real `webkd curate --no-flow` run (ingest, teacher features, FAISS index, teacher selection,
    gallery) on 72 real photos (5 classes + an off-class query)."""
    root = tmp_path_factory.mktemp("review")
    clothing_web(root, clothing, {name: 12 for name in CLASSES + ["hat"]}, seed=0)
    tiny_teacher(root, len(CLASSES))
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
    p = subprocess.run([sys.executable, "-m", "webkd.flows", "curate", "--no-flow", str(root / "cfg.yaml"),
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
