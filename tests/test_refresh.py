"""flows/refresh.py end to end under a temporary Prefect server, and training/registry.py.

Refresh on real photos: the first refresh trains a student from scratch (no champion yet);
after ~10% new images arrive and a human override is recorded, the next refresh reads and
embeds only the new images, trains a challenger warm-started from the champion into its own
folder, scores champion and challenger on the same validation split and applies the override
to every epoch; a refresh with nothing new trains nothing and answers every stage from the
cache. The registry: promotion only when strictly better (real exports of a trained and an
untrained network), the atomic switch and its repair after a crash, adoption of an export
written outside the flows.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_flows import CLASSES, artifact, train_teacher, write_config, write_pool  # shared scenario writers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, clothing, pacs_jpeg):
    """(config path, folder of held-back photos): ~100 web images now, ~10% more later."""
    from PIL import Image

    root = tmp_path_factory.mktemp("refresh")
    used = write_pool(root, clothing, pacs_jpeg, per_class=15, pacs=10, seed=3)
    rng = np.random.default_rng(4)
    for name in CLASSES:
        k = clothing.class_names.index(name)
        pick = [i for i in np.flatnonzero((clothing.labels == k) & (clothing.split != "train")) if i not in used]
        for i in rng.choice(pick, 2, replace=False):
            p = root / "extra" / name / f"c{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(clothing.images[i]).save(p, quality=90)
            used.add(int(i))
    train_teacher(clothing, root / "teacher.safetensors")
    return write_config(root, "Refresh Test"), root / "extra"


def _ledger(path: Path) -> dict:
    return pq.read_table(path).to_pydict()


def test_refresh_trains_challenger_on_new_data_and_skips_when_nothing_new(prefect_server, scenario):
    from webkd.flows.stages import refresh as refresh_stages
    from webkd.flows.refresh import refresh_flow
    from webkd.pipeline.config import load_config
    from webkd.selection.overrides import record_overrides
    from webkd.training import registry

    cfg_path, extra = scenario
    cfg = load_config(cfg_path)
    paths = cfg.paths

    # ---- first refresh: no champion, a student is trained from scratch and promoted -----------
    r0 = refresh_flow(str(cfg_path))
    n0 = r0["records"]
    assert r0["trained"] and r0["version"] == "v0001" and r0["warm_start"] is None and r0["promoted"]
    assert r0["champion_now"] == "v0001" and r0["computed"] == {"t": n0}
    assert (paths.students_dir / "v0001" / "checkpoints" / "best.pt").exists()
    assert not paths.checkpoints_dir.exists(), "a challenger never trains in the run directory itself"
    assert [e for e, _ in paths.ledgers()] == [0, 1]
    assert registry.weights_sha256(paths.export_dir) == registry.weights_sha256(paths.students_dir / "v0001" / "export")

    # ---- a human override and ~10% new images arrive --------------------------------------------
    last = _ledger(paths.ledger(1))
    victim = next(i for i, k, s in zip(last["id"], last["kept"], last["split"]) if k and s == "train")
    record_overrides(paths.overrides, reject=[victim], note="wrong garment")
    new_files = sorted(extra.rglob("*.jpg"))
    for f in new_files:
        dst = cfg_path.parent / "web" / f.parent.name / f.name
        shutil.copyfile(f, dst)
    assert 0.08 <= len(new_files) / n0 <= 0.12
    champion_sha = registry.weights_sha256(paths.export_dir)

    r1 = refresh_flow(str(cfg_path))
    # only the new images were read and embedded (the feature cache computed exactly those rows)
    assert r1["new_records"] == len(new_files) and r1["computed"] == {"t": len(new_files)}
    assert r1["records"] == n0 + len(new_files)
    assert json.loads(paths.features_meta("t").read_text())["rows"] == n0 + len(new_files)
    # a challenger warm-started from the champion's archived export, with the refresh epochs
    assert r1["trained"] and r1["version"] == "v0002" and r1["champion"] == "v0001"
    assert Path(r1["warm_start"]) == paths.students_dir / "v0001" / "export"
    ccfg = yaml.safe_load((paths.students_dir / "v0002" / "config.yaml").read_text())
    assert ccfg["train"]["warm_start"] == r1["warm_start"] and ccfg["train"]["epochs"] == 1
    assert ccfg["train"]["lr"] == pytest.approx(cfg.train.lr * cfg.flows.refresh_lr_scale)   # fine-tuning
    assert yaml.safe_load(paths.config.read_text())["train"]["warm_start"] is None   # run config untouched
    # champion and challenger were scored on the same validation rows (recomputed here)
    v = refresh_stages.validation_split(cfg)
    reg = registry.load_registry(paths.registry)
    entry = reg.entry("v0002")
    assert entry["parent"] == "v0001" and entry["kind"] == "refresh"
    assert entry["validation"]["rows"] == r1["validation_rows"] == len(v.rows) > 0
    assert entry["validation"]["ids_sha256"] == registry.ids_sha256(v.ids)
    assert r1["metric"] == entry["validation"]["metric"] == "val_agreement"
    champ = registry.evaluate_export(paths.students_dir / "v0001" / "export", v.pixels, v.rows, v.targets, v.class_group)
    chal = registry.evaluate_export(paths.students_dir / "v0002" / "export", v.pixels, v.rows, v.targets, v.class_group)
    assert (r1["champion_score"], r1["challenger_score"]) == pytest.approx((champ, chal))
    # the decision follows the rule, and export/ follows the decision
    assert r1["promoted"] == (chal > champ)
    if r1["promoted"]:
        assert reg.champion == "v0002" and registry.weights_sha256(paths.export_dir) == entry["weights_sha256"]
        assert _ledger(paths.ledger(0))["id"] == _ledger(registry.student_dir(paths, "v0002").ledger(0))["id"]
    else:
        assert reg.champion == "v0001" and registry.weights_sha256(paths.export_dir) == champion_sha
        assert entry["status"] == "rejected" and "kept champion" in entry["decision"]
    # the override held in the teacher selection and in every epoch of the challenger's training
    for ledger in [paths.ledger(0), *(p for _, p in registry.student_dir(paths, "v0002").ledgers())]:
        t = _ledger(ledger)
        j = t["id"].index(victim)
        assert (t["kept"][j], t["reason"][j]) == (False, "override"), ledger.name
    assert len(_ledger(paths.ledger(0))["id"]) == n0 + len(new_files)
    assert "| trained a challenger | yes |" in artifact("refresh-test-refresh").data

    # ---- nothing new: no training, every stage from the cache ---------------------------------
    r2 = refresh_flow(str(cfg_path))
    assert not r2["trained"] and "nothing new" in r2["reason"] and r2["version"] is None
    assert r2["new_records"] == 0 and r2["computed"] == {"t": 0}
    assert set(r2["up_to_date"]) == {"ingest", "features", "index", "selection", "gallery"}
    assert not (paths.students_dir / "v0003").exists()
    assert len(registry.load_registry(paths.registry).entries) == 2
    assert "| trained a challenger | no |" in artifact("refresh-test-refresh").data
    assert r2["seconds"] < r1["seconds"]


# --------------------------------------------------------------------------------------------
# registry (library level, no Prefect)
# --------------------------------------------------------------------------------------------
def test_decide_promotes_only_when_strictly_better():
    from webkd.training.registry import decide

    assert decide(None, 0.3)[0]                       # no champion yet
    assert decide(0.5, 0.51)[0]
    assert not decide(0.5, 0.5)[0]                    # tie: the champion stays
    assert not decide(0.5, 0.49)[0]
    assert not decide(0.5, 0.52, min_delta=0.05)[0]
    assert decide(0.5, 0.56, min_delta=0.05)[0]
    assert not decide(0.5, float("nan"))[0]           # cannot score the challenger
    assert "kept champion" in decide(0.5, 0.5)[1] and "promoted" in decide(0.5, 0.51)[1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, scenario, clothing):
    """Two real exports of the same architecture: the trained teacher network and an untrained
    one, plus real held-out photos (pixels, labels) to score them on."""
    from PIL import Image

    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.training.export import save_export
    from webkd.training.methods import LogitsOnly
    from webkd.training.models import build_model, load_weights

    cfg_path, _ = scenario
    root = tmp_path_factory.mktemp("exports")
    spec = ModelSpec(name="cnn_small", kwargs={"width": 8}, preprocess=PreprocessSpec(size=32))
    ks = [clothing.class_names.index(c) for c in CLASSES]
    idx = np.flatnonzero(np.isin(clothing.labels, ks) & (clothing.split != "train"))[::2]   # unseen by the teacher
    pix = np.stack([np.asarray(Image.fromarray(clothing.images[i]).resize((32, 32), Image.LANCZOS)) for i in idx])
    labels = np.array([CLASSES.index(clothing.class_names[clothing.labels[i]]) for i in idx])
    sample = torch.from_numpy(pix[:4]).permute(0, 3, 1, 2).float() / 255
    out = {}
    for name, weights in (("good", cfg_path.parent / "teacher.safetensors"), ("random", None)):
        torch.manual_seed(5)
        model = build_model(spec, 5)
        if weights is not None:
            load_weights(model, weights)
        meta = {"name": name, "method": "ce", "classes": CLASSES, "student_spec": spec.model_dump(mode="json"),
                "student_num_classes": 5, "deploy": {"head": "student"}, "metrics": {"val_acc": 0.0}}
        save_export(LogitsOnly(model), root / name, meta, sample, onnx=False)
        (root / name / "model_card.md").write_text(f"# Model card: {name}\n")
        out[name] = root / name
    return out, pix, np.arange(len(labels)), labels


def _install_version(paths, version: str, src: Path) -> None:
    from webkd.training import registry

    registry.archive_export(paths, version, src)


def test_promote_only_if_better_on_the_same_split(tmp_path, exports):
    from webkd.pipeline.config import RunPaths
    from webkd.training import registry

    (ex, pix, rows, labels) = exports
    paths = RunPaths(tmp_path / "run")
    good = registry.evaluate_export(ex["good"], pix, rows, labels)
    bad = registry.evaluate_export(ex["random"], pix, rows, labels)
    assert good > bad + 0.1, (good, bad)

    # v0001: the untrained network is the first champion (no champion to beat)
    _install_version(paths, "v0001", ex["random"])
    ok, why = registry.decide(None, bad)
    registry.register(paths, "v0001", kind="refresh", metrics={}, trained_on={"rows": 1}, decision=why,
                      validation={"metric": "val_acc", "rows": len(rows), "score": bad, "champion": None,
                                  "champion_score": None})
    registry.promote(paths, "v0001")
    assert registry.weights_sha256(paths.export_dir) == registry.weights_sha256(ex["random"])

    # v0002: the trained network beats it on the same rows -> promoted, export swapped
    _install_version(paths, "v0002", ex["good"])
    champ = registry.evaluate_export(paths.export_dir, pix, rows, labels)
    chal = registry.evaluate_export(registry.student_dir(paths, "v0002").export_dir, pix, rows, labels)
    ok, why = registry.decide(champ, chal)
    assert ok and champ == pytest.approx(bad) and chal == pytest.approx(good)
    registry.register(paths, "v0002", kind="refresh", metrics={}, trained_on={"rows": 2}, parent="v0001", decision=why,
                      validation={"metric": "val_acc", "rows": len(rows), "score": chal, "champion": "v0001",
                                  "champion_score": champ})
    registry.promote(paths, "v0002")
    reg = registry.load_registry(paths.registry)
    assert reg.champion == "v0002" and reg.entry("v0001")["status"] == "retired"
    assert registry.weights_sha256(paths.export_dir) == registry.weights_sha256(ex["good"])
    assert json.loads((paths.export_dir / registry.MARKER).read_text())["version"] == "v0002"
    card = (paths.export_dir / "model_card.md").read_text()
    assert "## Registry" in card and "v0002 (refresh)" in card and "warm-started from: v0001" in card
    assert f"val_acc on it: this student {100 * good:.2f}%, champion before it v0001 {100 * bad:.2f}%" in card
    assert [e["version"] for e in reg.history()] == ["v0001", "v0002"]

    # v0003: the untrained network again -> worse, registered as rejected, export untouched
    _install_version(paths, "v0003", ex["random"])
    chal = registry.evaluate_export(registry.student_dir(paths, "v0003").export_dir, pix, rows, labels)
    ok, why = registry.decide(registry.evaluate_export(paths.export_dir, pix, rows, labels), chal)
    assert not ok and "kept champion" in why
    registry.register(paths, "v0003", kind="refresh", metrics={}, trained_on={"rows": 3}, parent="v0002", decision=why)
    reg = registry.load_registry(paths.registry)
    assert reg.champion == "v0002" and reg.entry("v0003")["status"] == "rejected"
    assert registry.weights_sha256(paths.export_dir) == registry.weights_sha256(ex["good"])
    assert registry.needs_training(reg, {"rows": 3}) == (False, "nothing new since v0003 (same pool, overrides and config)")
    assert registry.needs_training(reg, {"rows": 4})[0]
    with pytest.raises(registry.RegistryError, match="champion"):
        registry.register(paths, "v0002", kind="refresh", metrics={}, trained_on=None)


def test_interrupted_promotion_is_repaired_and_foreign_exports_adopted(tmp_path, exports):
    from webkd.pipeline.config import RunPaths
    from webkd.training import registry

    ex = exports[0]
    paths = RunPaths(tmp_path / "run")
    # a library-level distill wrote export/ with no registry: adopted as the champion
    shutil.copytree(ex["random"], paths.export_dir)
    assert registry.adopt_export(paths) == "v0001"
    assert registry.adopt_export(paths) is None                        # known: nothing to adopt
    reg = registry.load_registry(paths.registry)
    assert reg.champion == "v0001" and reg.champion_entry["kind"] == "adopted"
    assert reg.champion_entry["trained_on"] is None and registry.needs_training(reg, {"rows": 1})[0]

    # crash after the pointer switch, before the folder swap: export/ still holds v0001
    registry.archive_export(paths, "v0002", ex["good"])
    registry.register(paths, "v0002", kind="refresh", metrics={}, trained_on={"rows": 2}, parent="v0001")
    reg = registry.load_registry(paths.registry)
    reg.champion = "v0002"
    registry.save_registry(paths.registry, reg)
    (paths.root / ".export.new-v0002-999").mkdir()                     # the half-made copy
    assert registry.sync_export(paths)
    assert registry.weights_sha256(paths.export_dir) == registry.weights_sha256(ex["good"])
    assert not list(paths.root.glob(".export.*"))
    assert not registry.sync_export(paths)                             # in sync now

    # export/ gone altogether (crash between the two renames): restored
    shutil.rmtree(paths.export_dir)
    assert registry.sync_export(paths) and (paths.export_dir / "student.safetensors").exists()

    # a library distill rewrites export/ in place (stale marker, other weights): adopted
    shutil.copyfile(ex["random"] / "student.safetensors", paths.export_dir / "student.safetensors")
    assert registry.adopt_export(paths) == "v0003"
    assert registry.load_registry(paths.registry).champion == "v0003"

    # versions: an unregistered folder left by an interrupted challenger is reused
    (paths.students_dir / "v0004" / "checkpoints").mkdir(parents=True)
    assert registry.allocate_version(paths) == "v0004"
    assert registry.allocate_version(paths, reuse=False) == "v0005"
    (paths.registry).write_text('{"version": 1, "champion": "v0009", "entries": []}')
    with pytest.raises(registry.RegistryError, match="champion"):
        registry.load_registry(paths.registry)
