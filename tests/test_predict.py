"""A student people can use: `webkd predict`, the ONNX metadata, the int8 export and the model card,
on one tiny real run (60 clothing photos in query folders, a test folder, a saved teacher,
`export.int8: true`), distilled once in-process for the module."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from webkd.flows.__main__ import main
from webkd.pipeline.report import pct

CLASSES = ["dress", "pants", "shoes"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, clothing, one_thread):
    """(run dir, test folder): 20 web + 8 test photos per class, distinct images, 4 epochs of ce."""
    import torch
    from PIL import Image

    from webkd.flows.stages.distill import distill
    from webkd.pipeline.config import ModelSpec, PreprocessSpec, build_config
    from webkd.training.models import build_model, save_weights

    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        rows = rng.choice(np.flatnonzero(clothing.labels == clothing.class_names.index(name)), 28, replace=False)
        for split, part in (("web", rows[:20]), ("test", rows[20:])):
            for i in part:
                p = root / split / name / f"{split}{i}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(clothing.images[i]).save(p, quality=90)
    torch.manual_seed(0)
    spec = ModelSpec(name="cnn_small", kwargs={"width": 8}, preprocess=PreprocessSpec(size=32))
    save_weights(build_model(spec, num_classes=len(CLASSES)), root / "teacher.safetensors")
    cfg = build_config({
        "name": "tiny-predict", "seed": 0, "run_dir": str(root / "run"),
        "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32, "val_fraction": 0.25,
                 "test_source": f"folder:{root / 'test'}"},
        "teachers": [{"key": "t", "name": "cnn_small", "kwargs": {"width": 8},
                      "weights": str(root / "teacher.safetensors"), "preprocess": {"size": 32}}],
        "student": {"name": "cnn_tiny", "preprocess": {"size": 32}},
        "selection": {"mode": "none"},
        "train": {"method": "ce", "epochs": 4, "batch_size": 16, "lr": 0.05},
        "export": {"int8": True, "int8_calibration": 8, "license": "apache-2.0"},
    })
    distill(cfg)
    return root / "run", root / "test"


def _meta(run: Path) -> dict:
    return json.loads((run / "export" / "student.json").read_text())


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _code_block(card: str, heading: str) -> str:
    """The first ```python block after `heading` in the card."""
    after = card[card.index(heading):]
    return re.search(r"```python\n(.*?)\n```", after, re.S).group(1)


def test_onnx_metadata_props(run):
    import onnxruntime as ort

    run_dir, _ = run
    meta = _meta(run_dir)
    for name in ("student.onnx", "student.int8.onnx"):
        props = ort.InferenceSession(str(run_dir / "export" / name)).get_modelmeta().custom_metadata_map
        assert json.loads(props["classes"]) == CLASSES, name
        pre = json.loads(props["preprocess"])
        assert pre == meta["preprocess"] and (pre["size"], pre["fit"]) == (32, "squash")
        assert props["teacher_fingerprint"] == meta["teacher_fingerprints"][0] and len(props["teacher_fingerprint"]) == 64


def test_model_card_metadata_and_portability(run):
    from huggingface_hub import ModelCard

    run_dir, _ = run
    meta = _meta(run_dir)
    path = run_dir / "export" / "model_card.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.license == "apache-2.0" and data.base_model == "cnn_small" and data.library_name == "onnx"
    assert "image-classification" in data.tags and data.metrics == ["accuracy"] and data.datasets == ["folder:web"]
    (test,) = [r for r in data.eval_results if r.metric_name == "test accuracy"]
    assert (test.metric_type, test.dataset_split, test.task_type) == ("accuracy", "test", "image-classification")
    assert test.metric_value == meta["metrics"]["test_acc"]
    assert "model-index" in path.read_text().split("---")[1]
    text = path.read_text()
    assert str(run_dir.parent) not in text and not re.search(r"(?:^|[\s=:'\"(])~?/[\w.-]+/", text, re.M), \
        "absolute path in the card"
    host = platform.node()
    assert not host or len(host) < 4 or host not in text
    # the numeric metrics table holds only numbers (as percentages)
    table = text[text.index("| metric | value |"):].split("\n\n")[0].splitlines()[2:]
    assert table and all(re.fullmatch(r"\| [^|]+ \| \d+\.\d\d% \|", row) for row in table), table
    # intended use, limitations, curation settings and pool provenance are there
    for part in ("## Intended use and limitations", "## Curation settings", "## Data lineage", "pool record ids",
                 "selection:\n  mode: none", "sources: folder:web"):
        assert part in text, part


def test_card_snippets_run_from_the_export_folder(run, tmp_path):
    """The onnxruntime and PyTorch snippets, copied from the card, run in fresh interpreters
    inside the export folder and agree with `webkd predict` on the same image."""
    run_dir, _ = run
    export = run_dir / "export"
    text = (export / "model_card.md").read_text()
    outputs = []
    for heading in ("### onnxruntime", "### PyTorch"):
        r = subprocess.run([sys.executable, "-c", _code_block(text, heading)], cwd=export, env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{heading}:\n{r.stderr[-2000:]}"
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 3 and all(line.split(":")[0] in CLASSES for line in lines), r.stdout
        outputs.append(lines)
    assert [x.split(":")[0] for x in outputs[0]] == [x.split(":")[0] for x in outputs[1]]
    assert main(["predict", str(export), str(export / "example.png"), "--out", str(tmp_path / "one.parquet")]) == 0
    row = pq.read_table(tmp_path / "one.parquet").to_pylist()[0]
    assert row["class"] == outputs[0][0].split(":")[0]
    assert f"{row['probability']:.3f}" == outputs[0][0].split(": ")[1]


def test_int8_export_measured(run):
    run_dir, _ = run
    export = run_dir / "export"
    info = _meta(run_dir)["int8"]
    assert info["file"] == "student.int8.onnx" and info["calibration_images"] == 8
    assert info["size_ratio"] == (export / "student.int8.onnx").stat().st_size / (export / "student.onnx").stat().st_size
    assert info["size_ratio"] < 1
    assert info["test_rows"] == 24 and info["test_acc_change"] == info["test_acc_int8"] - info["test_acc_fp32"]
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["int8_test_acc_change"] == info["test_acc_change"] and final["int8_size_ratio"] == info["size_ratio"]
    card = (export / "model_card.md").read_text()
    assert f"| file size, int8 / fp32 | {info['size_ratio']:.3f} |" in card
    assert f"| test accuracy change, int8 - fp32 (points) | {100 * info['test_acc_change']:+.2f} |" in card


def test_predict_reproduces_the_card_test_accuracy(run, tmp_path, capsys):
    run_dir, test_dir = run
    meta = _meta(run_dir)
    acc = meta["metrics"]["test_acc"]
    card = (run_dir / "export" / "model_card.md").read_text()
    assert f"| test accuracy | {pct(acc)} |" in card
    for backend, out in (("onnx", tmp_path / "p.parquet"), ("torch", tmp_path / "p.csv")):
        capsys.readouterr()
        assert main(["predict", str(run_dir), str(test_dir), "--out", str(out), "--backend", backend,
                     "--top-k", "2", "--batch-size", "5"]) == 0
        printed = capsys.readouterr().out
        assert f"accuracy against the source's labels: {pct(acc)} ({round(acc * 24)} of 24 unique labelled images)" \
            in printed, printed
        if out.suffix == ".csv":
            import pyarrow.csv as pacsv

            t = pacsv.read_csv(out).to_pydict()
        else:
            t = pq.read_table(out).to_pydict()
        assert len(t["id"]) == 24 and not any(t["error"])
        assert sum(c == lab for c, lab in zip(t["class"], t["label"])) / 24 == acc
        assert t["top1_class"] == t["class"] and "top3_class" not in t
        assert all(p1 >= p2 for p1, p2 in zip(t["top1_prob"], t["top2_prob"]))
    assert len(set(pq.read_table(tmp_path / "p.parquet")["class"].to_pylist())) > 1, "a degenerate student proves little"


def test_predict_manifest_shards_and_broken_files(run, tmp_path, capsys):
    """The ingest readers list the source: a CSV manifest and a tar shard give the folder's
    predictions; an unreadable file is a row with its reason, not a crash."""
    run_dir, test_dir = run
    files = sorted(test_dir.rglob("*.jpg"))
    assert main(["predict", str(run_dir), str(test_dir), "--out", str(tmp_path / "folder.parquet")]) == 0
    by_id = {r["id"]: r["class"] for r in pq.read_table(tmp_path / "folder.parquet").to_pylist()}
    (tmp_path / "m").mkdir()
    lines = ["path,label"]
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for k, f in enumerate(files):
            (tmp_path / "m" / f"{k}.jpg").write_bytes(f.read_bytes())
            lines.append(f"{k}.jpg,{f.parent.name}")
            tar.add(f, arcname=f"{k:05d}.jpg")
    (tmp_path / "m" / "bad.jpg").write_bytes(b"<html>not an image</html>")
    (tmp_path / "m" / "cut.jpg").write_bytes(files[0].read_bytes()[:200])
    lines += ["bad.jpg,dress", "cut.jpg,dress", "gone.jpg,dress"]
    (tmp_path / "m" / "list.csv").write_text("\n".join(lines) + "\n")
    assert main(["predict", str(run_dir), str(tmp_path / "m" / "list.csv"), "--out", str(tmp_path / "m.csv")]) == 0
    printed = capsys.readouterr().out
    assert "predicted 24 of 27 images" in printed and "unreadable: 3 (not_an_image 1, not_found 1, truncated 1)" in printed
    import pyarrow.csv as pacsv

    rows = pacsv.read_csv(tmp_path / "m.csv").to_pylist()
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert errors["bad.jpg"].startswith("not_an_image") and errors["cut.jpg"].startswith("truncated")
    assert errors["gone.jpg"].startswith("not_found")
    assert all(not r["class"] and r["probability"] is None for r in rows if r["error"])   # empty CSV cells
    assert {r["id"]: r["class"] for r in rows if not r["error"]} == by_id
    assert main(["predict", str(run_dir / "export"), str(tmp_path / "shard.tar"), "--out", str(tmp_path / "s.parquet")]) == 0
    assert {r["id"]: r["class"] for r in pq.read_table(tmp_path / "s.parquet").to_pylist()} == by_id


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere", "{test}"], "no such folder; give a run directory"),
    (["{tmp}", "{test}"], "no student.json here or in"),
    (["{run}", "{tmp}/nothing"], "no such file or folder; give a folder of images"),
    (["{run}", "{tmp}", "--out", "{tmp}/p.parquet"], "no images found (file names ending in .jpg"),
    (["{run}", "{test}", "--out", "{tmp}/p.txt"], "write .parquet or .csv"),
    (["{run}", "{test}", "--top-k", "0"], "--top-k 0: must be >= 1"),
    (["{run}", "{test}", "--int8", "--backend", "torch"], "--int8 runs student.int8.onnx"),
])
def test_predict_user_errors_are_one_line(run, tmp_path, capsys, args, message):
    run_dir, test_dir = run
    argv = [a.format(tmp=tmp_path, run=run_dir, test=test_dir) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "p.parquet")]
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("webkd predict: ") and message in err, err
    assert not (tmp_path / "p.parquet").exists()


def test_portable_keeps_file_names_only():
    from webkd.training.card import portable

    assert portable("folder:/data/web/shirts") == "folder:shirts"
    assert portable("webkd distill --no-flow /home/ann/cfg.yaml run_dir=/tmp/r1 'x=/a b'") == \
        "webkd distill --no-flow cfg.yaml run_dir=r1 'x=a b'"
    assert portable("wds:/srv/shards/{00000..00009}.tar") == "wds:{00000..00009}.tar"
    assert portable("see https://host.example/path/file.jpg") == "see https:file.jpg"
    assert portable("/abs/x.yaml, http://host.example/") == "x.yaml, http:."
    assert portable("uint8 / 255 and int8 / fp32, [0, 1], ~/x/y.yaml") == "uint8 / 255 and int8 / fp32, [0, 1], y.yaml"


def test_int8_needs_onnx_at_config_load():
    from webkd.pipeline.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="export.int8=true quantizes student.onnx: set export.onnx=true"):
        build_config({"export": {"int8": True, "onnx": False}})
