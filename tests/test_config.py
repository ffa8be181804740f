from __future__ import annotations

import os

import pytest
import yaml

from webkd.pipeline.config import ConfigError, RunPaths, load_config, save_resolved_config


def _write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, {"train": {"epochs": 3}}),
                      ["train.lr=0.1", "data.classes=[a, b]", f"run_dir={tmp_path}/run", "selection.knn.enabled=true"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.1
    assert cfg.data.classes == ["a", "b"] and cfg.selection.knn.enabled is True


def test_unknown_key_in_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.epocs'"):
        load_config(_write(tmp_path, {"train": {"epocs": 3}}))


def test_unknown_key_in_override_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'selection.pcut'"):
        load_config(_write(tmp_path, {}), ["selection.pcut=0.9"])


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.epochs'"):
        load_config(_write(tmp_path, {}), ["train.epochs=zero"])
    with pytest.raises(ConfigError, match="folder:, manifest: or wds:"):
        load_config(_write(tmp_path, {"data": {"sources": ["http://x"]}}))
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(_write(tmp_path, {}), ["train.epochs"])


def test_list_item_override(tmp_path):
    cfg = load_config(_write(tmp_path, {"teachers": [{"name": "a"}, {"name": "b"}]}), ["teachers.1.weights=w.pt"])
    assert cfg.teachers[1].weights == os.path.join(os.getcwd(), "w.pt")  # overrides: relative to the cwd
    with pytest.raises(ConfigError, match="no list item"):
        load_config(_write(tmp_path, {"teachers": [{"name": "a"}]}), ["teachers.3.name=x"])


def test_relative_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "t.pt").write_bytes(b"")
    cfg = load_config(_write(tmp_path, {"data": {"sources": ["folder:web"]}, "teachers": [{"name": "a", "weights": "t.pt"}]}))
    assert cfg.data.sources == [f"folder:{tmp_path / 'web'}"]
    assert cfg.teachers[0].weights == str(tmp_path / "t.pt")


def test_resolved_config_written_and_reloads(tmp_path):
    cfg = load_config(_write(tmp_path, {"run_dir": str(tmp_path / "run"), "seed": 7}))
    path = save_resolved_config(cfg)
    assert path == RunPaths(tmp_path / "run").config
    again = load_config(path)
    assert again == cfg
    assert not list((tmp_path / "run").glob(".*"))  # no temp files left behind


def test_every_shipped_config_validates():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parent.parent / "flows" / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_config(path)
        assert cfg.data.classes and cfg.teachers, path
