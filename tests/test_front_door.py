"""The front door (issue 10): every user error is caught before any work starts, as one line
on stderr naming the key or file, exit code 2, no traceback; flags and overrides mix in any
order; the shipped method_args are scoped per method; preprocessing stored next to weights is
used and enforced; one relative-path rule; no progress bars off a terminal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from webkd.flows.__main__ import build_parser, main, parse_args
from webkd.pipeline.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["dress", "pants"]


@pytest.fixture(scope="module")
def web(clothing, tmp_path_factory) -> Path:
    """Six real clothing photos per class written as a folder: source (sub-folder = query)."""
    from conftest import write_query_folder

    names = list(clothing.class_names)
    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:6] for c in CLASSES])
    root = tmp_path_factory.mktemp("front") / "web"
    write_query_folder(root, clothing.images[idx], clothing.labels[idx], names)
    return root


def write_cfg(tmp_path: Path, web: Path, **sections) -> str:
    raw = {"run_dir": str(tmp_path / "run"),
           "data": {"sources": [f"folder:{web}"], "classes": CLASSES, "image_size": 32},
           "teachers": [{"key": "t", "name": "cnn_tiny"}], "student": {"key": "s", "name": "cnn_tiny"},
           "train": {"method": "kd", "epochs": 1, "batch_size": 8}, "export": {"onnx": False}}
    for k, v in sections.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def user_error(capsys, tmp_path: Path, argv: list[str], *names: str) -> str:
    """main(argv) fails as a user error: exit 2, one stderr line naming `names`, nothing written."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in names:
        assert n in err, err
    assert not (tmp_path / "run").exists(), "work started before the error"
    return err


# ---- flags and overrides ------------------------------------------------------------------
def test_flags_and_overrides_mix_in_any_order():
    p = build_parser()
    for argv in (["distill", "c.yaml", "--no-flow", "train.epochs=1", "seed=3"],
                 ["distill", "--no-flow", "c.yaml", "train.epochs=1", "seed=3"],
                 ["distill", "c.yaml", "train.epochs=1", "--no-flow", "seed=3"]):
        args = parse_args(p, argv)
        assert args.config == "c.yaml" and args.no_flow and args.overrides == ["train.epochs=1", "seed=3"], argv
    with pytest.raises(SystemExit):
        parse_args(p, ["distill", "c.yaml", "--no-such-flag"])


def test_distill_with_flag_before_override_runs(web, tmp_path, capsys):
    cfg = write_cfg(tmp_path, web)
    assert main(["distill", cfg, "--no-flow", "train.epochs=1", f"run_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr()
    assert "validation accuracy" in out.out
    assert (tmp_path / "run" / "manifest.parquet").exists()


# ---- each user error: one line, exit 2, before any work -----------------------------------
def test_missing_teacher_weights(web, tmp_path, capsys):
    cfg = write_cfg(tmp_path, web, teachers=[{"key": "t", "name": "cnn_tiny", "weights": "nope.safetensors"}])
    user_error(capsys, tmp_path, ["distill", cfg, "--no-flow"], "teachers.0.weights", str(tmp_path / "nope.safetensors"),
               "config file")


def test_weights_that_do_not_fit(web, tmp_path, capsys):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = write_cfg(tmp_path, web, teachers=[{"key": "t", "name": "cnn_tiny", "weights": str(bad)}])
    user_error(capsys, tmp_path, ["curate", cfg, "--no-flow"], "teachers.0.weights", "junk.pt")


def test_data_classes_shorter_than_the_teacher(web, tmp_path, capsys):
    """A teacher predicting 3 classes with data.classes listing 2 would have its logits read
    against the wrong names (issue 12): refused at load, whether the weights or num_classes say so."""
    from webkd.pipeline.config import ModelSpec
    from webkd.training.models import build_model, save_weights

    w = tmp_path / "three.safetensors"
    save_weights(build_model(ModelSpec(name="cnn_tiny"), num_classes=3), w)
    cfg = write_cfg(tmp_path, web, teachers=[{"key": "t", "name": "cnn_tiny", "weights": str(w)}])
    err = user_error(capsys, tmp_path, ["distill", cfg, "--no-flow"], "data.classes", "teachers.0", "predicts 3",
                     "three.safetensors")
    assert "lists 2" in err and "class names" in err
    cfg = write_cfg(tmp_path, web, teachers=[{"key": "t", "name": "cnn_tiny", "num_classes": 3}])
    user_error(capsys, tmp_path, ["ingest", cfg], "data.classes", "teachers.0", "num_classes=3")


def test_unknown_method_and_arch(web, tmp_path, capsys):
    cfg = write_cfg(tmp_path, web)
    err = user_error(capsys, tmp_path, ["distill", cfg, "--no-flow", "train.method=kd33"], "train.method", "kd3")
    assert "did you mean" in err
    user_error(capsys, tmp_path, ["ingest", cfg, "teachers.0.name=cnn_tinyy"], "teachers.0.name", "cnn_tiny")
    user_error(capsys, tmp_path, ["ingest", cfg, "student.library=torchvision", "student.name=resnet180"],
               "student.name", "resnet18")


def test_open_clip_tag_offline(web, tmp_path, capsys, monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = write_cfg(tmp_path, web, teachers=[{"key": "clip", "library": "open_clip", "name": "ViT-B-32",
                                             "pretrained": "laion2b_s34b_b79k"}])
    user_error(capsys, tmp_path, ["curate", cfg, "--no-flow"], "teachers.0.pretrained", "offline")


def test_missing_source_folder(web, tmp_path, capsys):
    cfg = write_cfg(tmp_path, web, data={"sources": ["folder:no_such_dir"]})
    user_error(capsys, tmp_path, ["curate", cfg, "--no-flow"], "data.sources.0", str(tmp_path / "no_such_dir"))
    user_error(capsys, tmp_path, ["ingest", cfg, "data.sources=[folder:" + str(web) + "]",
                                  "data.test_source=manifest:gone.csv"], "data.test_source", "gone.csv")


def test_label_map_value_must_be_a_class(web, tmp_path, capsys):
    cfg = write_cfg(tmp_path, web, data={"label_map": {"trousers": "pant"}})
    user_error(capsys, tmp_path, ["ingest", cfg], "data.label_map.trousers", "'pants'")
    assert load_config(cfg, ["data.label_map={trousers: pants, hat: null}"]).data.label_map["hat"] is None


def test_unknown_key_suggests_the_closest(web, tmp_path, capsys):
    cfg = write_cfg(tmp_path, web)
    user_error(capsys, tmp_path, ["distill", cfg, "--no-flow", "train.epoch=2"], "train.epoch", "train.epochs")


def test_debug_shows_the_traceback(web, tmp_path):
    cfg = write_cfg(tmp_path, web)
    with pytest.raises(ConfigError, match="train.method"):
        main(["--debug", "distill", cfg, "--no-flow", "train.method=nope"])


# ---- method_args scoped per method ---------------------------------------------------------
def test_method_args_do_not_leak_into_another_method(web, tmp_path, capsys):
    cfg = write_cfg(tmp_path, web, train={"method": "kd3", "method_args": {"kd3": {"kd_weight": 1.0}}})
    assert load_config(cfg).train.args == {"kd_weight": 1.0}
    assert load_config(cfg, ["train.method=kd"]).train.args == {}      # KD keeps its own default 0.9
    assert load_config(cfg, ["train.method=ce"]).train.args == {}
    assert load_config(cfg, ["train.method=kd", "train.method_args.kd.kd_weight=0.5"]).train.args == {"kd_weight": 0.5}
    user_error(capsys, tmp_path, ["distill", cfg, "--no-flow", "train.method_args.ce.kd_weight=1"],
               "train.method_args.ce.kd_weight")
    user_error(capsys, tmp_path, ["distill", cfg, "--no-flow", "train.method_args.kd3.kd_wieght=1"],
               "train.method_args.kd3.kd_wieght", "kd_weight")
    # the old flat form is refused with the keyed form spelled out
    flat = write_cfg(tmp_path, web, train={"method": "kd", "method_args": {"kd_weight": 1.0}})
    user_error(capsys, tmp_path, ["distill", flat, "--no-flow"], "train.method_args", "{kd: {kd_weight: 1.0}}")


def test_shipped_configs_scope_method_args():
    root = Path(__file__).resolve().parent.parent / "flows" / "configs"
    for path in root.glob("*.yaml"):
        cfg = load_config(path, ["train.method=kd"])
        assert cfg.train.args == {}, path


# ---- preprocessing stored with the weights ------------------------------------------------
def test_preprocess_sidecar_is_used_and_enforced(web, tmp_path, capsys):
    from webkd.flows.checks import check_run
    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.pipeline.config_io import write_sidecar
    from webkd.training.models import build_model, save_weights

    pre = PreprocessSpec(size=24, channels=1, mean=[0.3], std=[0.4], background="border")
    w = save_weights(build_model(ModelSpec(name="cnn_tiny", preprocess=pre), 2), tmp_path / "teacher.safetensors")
    write_sidecar(w, pre.model_dump(), arch={"library": "project", "name": "cnn_tiny"}, what="test teacher")
    cfg = write_cfg(tmp_path, web, teachers=[{"key": "t", "name": "cnn_tiny", "weights": "teacher.safetensors"}])
    loaded = check_run(load_config(cfg))
    assert loaded.teachers[0].preprocess == pre                     # none given: the stored one
    same = write_cfg(tmp_path, web, teachers=[{"key": "t", "name": "cnn_tiny", "weights": str(w),
                                              "preprocess": pre.model_dump()}])
    assert load_config(same).teachers[0].preprocess == pre
    user_error(capsys, tmp_path, ["curate", cfg, "--no-flow", "teachers.0.preprocess.size=32"],
               "teachers.0.preprocess", "teacher.json", "size 32 vs stored 24")
    user_error(capsys, tmp_path, ["curate", cfg, "--no-flow", "teachers.0.name=cnn_small"],
               "teachers.0.name", "teacher.json")


def test_shipped_teacher_sidecar_agrees_with_fashion_web():
    root = Path(__file__).resolve().parent.parent / "flows"
    cfg = load_config(root / "configs" / "fashion_web.yaml")
    stored = json.loads((root / "assets" / "fmnist_teacher.json").read_text())["preprocess"]
    assert cfg.teachers[0].preprocess.model_dump() == {**cfg.teachers[0].preprocess.model_dump(), **stored}


# ---- one path rule ------------------------------------------------------------------------
def test_paths_yaml_relative_to_its_folder_overrides_to_cwd(tmp_path, monkeypatch):
    conf, cwd = tmp_path / "conf", tmp_path / "cwd"
    for d in (conf / "web", cwd / "web", cwd / "other"):
        d.mkdir(parents=True)
    (conf / "c.yaml").write_text(yaml.safe_dump({"data": {"sources": ["folder:web"]}}))
    monkeypatch.chdir(cwd)
    assert load_config(conf / "c.yaml").data.sources == [f"folder:{conf / 'web'}"]      # even though cwd/web exists
    assert load_config(conf / "c.yaml", ["data.sources=[folder:other]"]).data.sources == [f"folder:{cwd / 'other'}"]
    # a file that does not exist yet is still resolved by the same rule (and named when checked)
    assert load_config(conf / "c.yaml", ["teachers=[{name: cnn_tiny, weights: w.pt}]"]).teachers[0].weights == str(cwd / "w.pt")


# ---- console output -----------------------------------------------------------------------
def test_redirected_output_has_no_progress_bars_or_library_noise(web, tmp_path):
    cfg = write_cfg(tmp_path, web)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, "-m", "webkd.flows", "curate", cfg, "--no-flow", "index.k=3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\r" not in r.stdout
    assert "faiss.loader" not in r.stderr
    assert r.stdout.count("kept (new records)") == 1 and "ingest round 0:" in r.stderr   # table once, log one line
    assert "epoch" not in r.stderr or "it/s" not in r.stderr
    bad = subprocess.run([sys.executable, "-m", "webkd.flows", "ingest", cfg, "data.sources=[folder:gone]"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
