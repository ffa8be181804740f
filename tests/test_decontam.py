"""Decontamination on real images: a pool holding exact, resized, cropped and JPEG re-encoded
copies of evaluation images (real clothing photos) plus distinct real photos; the copies become
`eval_duplicate`, the distinct ones stay `ok`; a distill with data.decontaminate set never trains
on or scores a flagged row; a bad evaluation source is one line."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from webkd.pipeline.config import build_config
from webkd.pipeline.records import EVAL_DUPLICATE, OK, load_manifest, load_quarantine

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "longsleeve", "pants", "shoes", "t-shirt"]
TEACHER = ROOT / "flows" / "assets" / "cifar_teacher.safetensors"


def _jpeg(img: Image.Image, q: int) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=q)
    return b.getvalue()


def _crop(img: Image.Image, share: float) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * share), round(h * share)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


COPIES = {   # how a pool copy of an evaluation image is made (the web re-uploads a benchmark image)
    "exact": lambda path, img: path.read_bytes(),
    "resized": lambda path, img: _jpeg(img.resize((44, 44), Image.Resampling.BICUBIC), 90),
    "cropped": lambda path, img: _jpeg(_crop(img, 0.9), 90),
    "jpeg_q40": lambda path, img: _jpeg(img, 40),
}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, clothing):
    """eval/<class>/: 24 real clothing photos; web/<class>/: 4 copies of each kind (16) of those,
    plus 80 distinct clothing photos; a config with the shipped CIFAR teacher."""
    root = tmp_path_factory.mktemp("decontam")
    rng = np.random.default_rng(0)
    rows = rng.permutation(np.flatnonzero(np.isin(clothing.labels, [clothing.class_names.index(c) for c in CLASSES])))
    ev, distinct = rows[:24], rows[24:104]
    eval_files = []
    for i in ev:
        p = root / "eval" / clothing.class_names[int(clothing.labels[i])] / f"e{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_jpeg(Image.fromarray(clothing.images[i]), 90))
        eval_files.append(p)
    copies = {}                                     # pool file name -> (kind, eval file)
    for k, (kind, make) in enumerate(COPIES.items()):
        for p in eval_files[4 * k:4 * k + 4]:
            out = root / "web" / p.parent.name / f"{kind}_{p.stem}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(make(p, Image.open(p).convert("RGB")))
            copies[out.name] = (kind, p)
    for i in distinct:
        p = root / "web" / clothing.class_names[int(clothing.labels[i])] / f"d{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_jpeg(Image.fromarray(clothing.images[i]), 90))
    raw = {"name": "decontam", "seed": 0,
           "data": {"sources": [f"folder:{root / 'web'}"], "decontaminate": [f"folder:{root / 'eval'}"],
                    "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"], "image_size": 32, "val_fraction": 0.3},
           "teachers": [{"key": "cifar_teacher", "name": "resnet_narrow", "kwargs": {"width": 16},
                         "weights": str(TEACHER)}],
           "student": {"name": "cnn_tiny", "preprocess": {"size": 32}},
           "selection": {"mode": "none"},
           "train": {"method": "kd", "epochs": 1, "batch_size": 32},
           "export": {"onnx": False},
           "device": "cpu"}
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return root, raw, copies


def _cfg(raw, run, *overrides):
    return build_config(raw, [f"run_dir={run}", *overrides])


def test_phash_search_matches_brute_force(clothing):
    """The FAISS binary search finds the same nearest Hamming distances as numpy."""
    from webkd.pipeline.decontam import phash
    from webkd.pipeline.features import fit_square
    from webkd.pipeline.index import hamming_knn

    pix = np.stack([fit_square(Image.fromarray(im), 32) for im in clothing.images[:300]])
    codes, valid = phash(pix)
    assert codes.shape == (300, 8) and valid.all()
    d, j = hamming_knn(codes[:200], codes[200:], 1)
    bits = np.unpackbits(codes, axis=1).astype(np.int32)
    ref = (bits[200:, None, :] != bits[None, :200, :]).sum(-1)          # (100, 200)
    assert (d[:, 0] == ref.min(1)).all()
    assert (ref[np.arange(100), j[:, 0]] == ref.min(1)).all()
    flat, ok = phash(np.zeros((2, 32, 32, 3), np.uint8))
    assert not ok.any()                                                 # a black row matches nothing


def test_copies_of_eval_images_are_eval_duplicates(scenario, one_thread):
    from webkd.flows.stages import curate as stages
    from webkd.selection.run_data import load_run, summarize

    root, raw, copies = scenario
    run = root / "run_lib"
    cfg = _cfg(raw, run)
    stages.ingest(cfg)
    stages.features(cfg)
    report = stages.index(cfg)
    assert report.decontam is not None and "eval_duplicate" in str(report)
    records = load_manifest(cfg.paths.manifest)
    eval_ids = {p.name: r.id for r in load_manifest(cfg.paths.eval_set(cfg.data.decontaminate[0]) / "manifest.parquet")
                for p in [Path(r.uri)]}
    status = {Path(r.uri).name: r for r in records}
    missed = [n for n in copies if status[n].status != EVAL_DUPLICATE]
    assert not missed, f"copies not flagged: {missed}"
    for name, (kind, evfile) in copies.items():
        assert status[name].dup_of == eval_ids[evfile.name], (name, kind)   # the right evaluation image
    false = [n for n, r in status.items() if n not in copies and r.status != OK]
    assert not false, f"distinct photos flagged: {false}"

    quarantine = [q for q in load_quarantine(cfg.paths.quarantine) if q.reason == EVAL_DUPLICATE]
    assert len(quarantine) == len(copies)
    q_exact = next(q for q in quarantine if Path(q.uri).name.startswith("exact_"))
    assert "exact same bytes" in q_exact.detail and "eval" in q_exact.detail
    evidence = pq.read_table(cfg.paths.eval_duplicates).to_pydict()
    assert set(evidence["method"]) <= {"exact", "phash", "embedding"}
    assert all(s > 0 for s in evidence["similarity"])
    assert {Path(u).name for u in evidence["uri"]} == set(copies)

    # the review surfaces count them: `webkd inspect` / the gallery read the manifest status and ledgers
    stages.teacher_selection(cfg)
    summary = summarize(load_run(cfg.paths.root))
    assert summary.status[EVAL_DUPLICATE] == len(copies)
    assert f"eval_duplicate {len(copies)}" in summary.text()

    # a second run changes nothing; dropping the evaluation source clears every mark
    again = stages.index(cfg)
    assert again.decontam.changed == 0 and again.decontam.flagged == len(copies)
    off = stages.index(_cfg(raw, run, "data.decontaminate=[]"))
    assert off.decontam.changed == len(copies)
    assert not [q for q in load_quarantine(cfg.paths.quarantine) if q.reason == EVAL_DUPLICATE]
    assert EVAL_DUPLICATE not in {r.status for r in load_manifest(cfg.paths.manifest)}


def test_distill_never_trains_on_or_validates_with_eval_duplicates(scenario, one_thread):
    from webkd.flows.stages import curate as stages
    from webkd.flows.stages.distill import distill
    from webkd.pipeline.paths import ledgers_in
    from webkd.selection.counts import count_run
    from webkd.selection.overrides import record_overrides

    root, raw, copies = scenario
    run = root / "run_e2e"
    cfg = _cfg(raw, run)
    stages.ingest(cfg)
    stages.features(cfg)
    stages.index(cfg)
    flagged = {r.id for r in load_manifest(cfg.paths.manifest) if r.status == EVAL_DUPLICATE}
    assert len(flagged) == len(copies)
    record_overrides(cfg.paths.overrides, accept=sorted(flagged))   # a human accept does not bring them back
    distill(cfg)
    ledgers = ledgers_in(cfg.paths.selection_dir)
    assert ledgers
    for _, path in ledgers:
        t = pq.read_table(path).to_pydict()
        rows = [(k, r, s) for i, k, r, s in zip(t["id"], t["kept"], t["reason"], t["split"]) if i in flagged]
        assert len(rows) == len(flagged)
        assert not any(k for k, _, _ in rows), "an eval duplicate was trained on"
        assert {r for _, r, s in rows if s == "train"} <= {EVAL_DUPLICATE}
    c = count_run(cfg.paths)
    status = {r.id: r.status for r in load_manifest(cfg.paths.manifest)}
    val_ids = [i for i, s in zip(t["id"], t["split"]) if s == "val"]
    assert any(i in flagged for i in val_ids), "the scenario should put some flagged rows in validation"
    assert c.validation_scored == sum(status[i] == OK for i in val_ids)   # flagged validation rows are not scored


def test_bad_eval_source_is_one_line(scenario, tmp_path):
    root, raw, _ = scenario
    cfg = root / "cfg.yaml"
    r = subprocess.run([sys.executable, "-m", "webkd.flows", "curate", "--no-flow", str(cfg), f"run_dir={tmp_path / 'r'}",
                        f"data.decontaminate=[folder:{tmp_path / 'nope'}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.decontaminate.0" in lines[0] and "folder not found" in lines[0], r.stderr
    # a folder that exists but holds no image: one line from the stage, after ingest listed it
    (tmp_path / "empty").mkdir()
    from webkd.flows.stages import curate as stages
    from webkd.pipeline.config_io import ConfigError

    c = _cfg(raw, tmp_path / "r2", f"data.decontaminate=[folder:{tmp_path / 'empty'}]",
             "decontam.methods=[exact,phash]")
    stages.ingest(c)
    with pytest.raises(ConfigError, match=r"data.decontaminate.0: .*no readable image"):
        stages.decontaminate(c)
    with pytest.raises(ConfigError, match="decontam.test_source"):
        _cfg(raw, tmp_path / "r3", "decontam.test_source=true")
