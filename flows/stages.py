"""Config -> library calls, one function per stage. The CLI verbs and the Prefect tasks both call
these, so a stage behaves the same with or without the Prefect engine (this module does not
import Prefect). Stages hand each other run-directory paths, never tensors.
"""
import hashlib
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from webkd.pipeline.config import Config, RunPaths, dump_config, save_resolved_config
from webkd.pipeline.features import build_pixel_cache, extract_features, load_features, resolve_device
from webkd.pipeline.index import index_run, index_vectors, load_index, load_index_center, search
from webkd.pipeline.ingest import IngestReport, run_ingest
from webkd.pipeline.records import Record, class_index, load_manifest
from webkd.pipeline.storage import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# curation stages
# --------------------------------------------------------------------------------------------
def ingest(cfg: Config) -> IngestReport:
    save_resolved_config(cfg)
    if not cfg.data.sources:
        raise ValueError("data.sources is empty: give at least one folder:, manifest: or wds: source")
    return run_ingest(cfg.data.sources, cfg.paths, cfg.ingest)


def pixels(cfg: Config, paths: RunPaths | None = None) -> np.ndarray:
    """The run's decoded pixel cache, (N, S, S, 3) uint8, row-aligned with the manifest."""
    paths = paths or cfg.paths
    records = load_manifest(paths.manifest)
    return build_pixel_cache(records, paths.pixels(cfg.data.image_size, cfg.data.fit),
                             cfg.data.image_size, cfg.data.fit)


def build_teachers(cfg: Config, device: str = "cpu") -> list[tuple[str, Any, str]]:
    """[(cache key, frozen model, fingerprint)] for every configured teacher."""
    from webkd.training.models import build_model, fingerprint, freeze

    out = []
    for spec in cfg.teachers:
        model = freeze(build_model(spec, num_classes=len(cfg.data.classes) or None, class_names=cfg.data.classes))
        out.append((spec.cache_key, model.to(device), fingerprint(model, spec)))
    return out


@dataclass
class FeatureSummary:
    """One encoder's feature cache after `features`: `computed` rows were encoded by that call."""

    rows: int
    dim: int
    num_classes: int
    computed: int

    def __str__(self) -> str:
        return f"{self.rows} rows x {self.dim} dims, {self.num_classes} classes ({self.computed} computed now)"


def features(cfg: Config, teachers: list | None = None) -> dict[str, FeatureSummary]:
    """Cached embeddings + logits of every teacher (and the student when configured)."""
    from webkd.training.models import build_model, fingerprint

    if not cfg.teachers and "student" not in cfg.features.encoders:
        raise ValueError("no encoder to run: configure `teachers:` (or features.encoders: [student])")
    device = resolve_device(cfg.device)
    pix = pixels(cfg)
    ids = [r.id for r in load_manifest(cfg.paths.manifest)]
    encoders = []
    if "teachers" in cfg.features.encoders:
        encoders += teachers if teachers is not None else build_teachers(cfg, device)
    if "student" in cfg.features.encoders:
        s = build_model(cfg.student, num_classes=len(cfg.data.classes) or None, class_names=cfg.data.classes)
        encoders.append(("student", s, fingerprint(s, cfg.student)))
    out = {}
    for key, model, fp in encoders:
        cache = extract_features(model, pix, key, fp, cfg.paths, batch_size=cfg.features.batch_size,
                                 device=device, row_ids=ids)
        out[key] = FeatureSummary(cache.rows, cache.dim, cache.num_classes, cache.computed)
    return out


def index_key(cfg: Config) -> str:
    if cfg.index.encoder:
        return cfg.index.encoder
    if not cfg.teachers:
        raise ValueError("index.encoder is not set and there is no teacher to index")
    return cfg.teachers[0].cache_key


def index(cfg: Config):
    pix = pixels(cfg) if cfg.index.near_dup_space == "pixels" and cfg.index.near_dup_threshold is not None else None
    return index_run(cfg.paths, index_key(cfg), cfg.index, pixels=pix)


# --------------------------------------------------------------------------------------------
# the pool the training loop sees
# --------------------------------------------------------------------------------------------
def split_of(record_id: str, val_fraction: float) -> str:
    """Deterministic train/val split from the content hash: stable when the pool grows."""
    return "val" if int(record_id[:8], 16) / 16 ** 8 < val_fraction else "train"


def class_groups(cfg: Config) -> np.ndarray | None:
    if not cfg.data.class_groups:
        return None
    lookup = {c: i for i, c in enumerate(cfg.data.classes)}
    group = np.arange(len(cfg.data.classes))
    for members in cfg.data.class_groups:
        idx = [lookup[m] for m in members if m in lookup]
        if len(idx) != len(members):
            raise ValueError(f"data.class_groups entry {members} names classes not in data.classes")
        group[idx] = min(idx)
    return group


def refined_labels(paths: RunPaths, ids: list[str]) -> np.ndarray:
    """Refined labels (PLL two-hot curation) aligned to ids; -1 where none."""
    import pyarrow.parquet as pq

    if not paths.labels.exists():
        raise FileNotFoundError(f"train.label_source=refined but {paths.labels} does not exist: run `webkd refine` first")
    t = pq.read_table(paths.labels, columns=["id", "refined_label"]).to_pydict()
    lookup = dict(zip(t["id"], t["refined_label"]))
    return np.array([lookup.get(i, -1) if lookup.get(i) is not None else -1 for i in ids], np.int64)


def build_pool(cfg: Config, with_neighbors: bool | None = None):
    from webkd.training.loop import Pool

    paths = cfg.paths
    records = load_manifest(paths.manifest)
    if not records:
        raise ValueError(f"{paths.manifest} has no records: run ingest first")
    pix = pixels(cfg)
    ids = [r.id for r in records]
    web_class = np.array(class_index(records, cfg.data.classes, cfg.data.label_map), np.int64)
    split = np.array([split_of(i, cfg.data.val_fraction) for i in ids], dtype=object)
    labels = refined_labels(paths, ids) if cfg.train.label_source == "refined" else web_class.copy()
    teacher_logits = None
    if cfg.teachers:
        caches = [load_features(paths, t.cache_key) for t in cfg.teachers]
        if all(c is not None and c.rows == len(records) for c in caches):
            # teachers of other tasks (UNIC: other class counts) do not take part in curation
            same = [c for c in caches if c.num_classes == len(cfg.data.classes)]
            if same:
                teacher_logits = np.mean([np.asarray(c.logits, np.float32) for c in same], axis=0)
    neighbors = None
    if with_neighbors if with_neighbors is not None else cfg.selection.knn.enabled:
        key = index_key(cfg)
        cache = load_features(paths, key)
        idx = load_index(paths.index(key), nprobe=cfg.index.nprobe)
        queries = index_vectors(cache.embeddings, load_index_center(paths.index(key)))
        _, nb = search(idx, queries, cfg.selection.knn.k + 1, cfg.index.block_size)
        neighbors = np.array([[j for j in row if j != i][: cfg.selection.knn.k] for i, row in enumerate(nb)], np.int64)
    pool = Pool(pixels=pix, ids=ids, split=split, status=np.array([r.status for r in records], dtype=object),
                labels=labels, web_labels=[r.web_label for r in records], web_class=web_class,
                val_labels=np.where(split == "val", web_class, -1), teacher_logits=teacher_logits,
                neighbors=neighbors, class_group=class_groups(cfg))
    if cfg.train.label_source == "refined":  # the ledger shows the refined labels (selection/refine.py)
        from webkd.selection.refine import label_columns

        pool.label_columns = label_columns(paths.labels, ids)
    return pool


# --------------------------------------------------------------------------------------------
# PLL two-hot label refinement (curation step for hard-label consumers)
# --------------------------------------------------------------------------------------------
def refine(cfg: Config):
    """Refine the web query labels with one PLL two-hot round on cached teacher embeddings and
    write labels.parquet (used by `train.label_source=refined`). Computes missing features first."""
    from webkd.selection.refine import refine_labels, write_labels

    paths = cfg.paths
    records = load_manifest(paths.manifest)
    if not records:
        raise ValueError(f"{paths.manifest} has no records: run `webkd ingest` first")
    key = cfg.refine.encoder or (cfg.teachers[0].cache_key if cfg.teachers else None)
    if key is None:
        raise ValueError("refine needs a frozen encoder: configure `teachers:` or refine.encoder")
    cache = load_features(paths, key)
    if cache is None or cache.rows != len(records):
        if key not in {t.cache_key for t in cfg.teachers}:
            raise ValueError(f"refine.encoder={key!r}: no feature cache with {len(records)} rows; run `webkd features`")
        features(cfg)
        cache = load_features(paths, key)
    ids = [r.id for r in records]
    web_class = np.array(class_index(records, cfg.data.classes, cfg.data.label_map), np.int64)
    split = np.array([split_of(i, cfg.data.val_fraction) for i in ids], dtype=object)
    ok = np.array([r.status == "ok" for r in records])
    result = refine_labels(np.asarray(cache.embeddings, np.float32), web_class, (split == "train") & ok,
                           split == "val", len(cfg.data.classes), cfg.refine, seed=cfg.seed)
    write_labels(paths.labels, ids, result, extra={"encoder": key, "encoder_fingerprint": cache.fingerprint})
    return result


# --------------------------------------------------------------------------------------------
# labelled test set, read once at the end
# --------------------------------------------------------------------------------------------
def test_set(cfg: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """(pixels, labels) of `data.test_source`, ingested into <run>/test (labels from folder names)."""
    if not cfg.data.test_source:
        return None
    from webkd.pipeline.config import IngestConfig

    tpaths = RunPaths(cfg.paths.root / "test")
    run_ingest([cfg.data.test_source], tpaths, IngestConfig(min_side=1))
    records = load_manifest(tpaths.manifest)
    pix = build_pixel_cache(records, tpaths.pixels(cfg.data.image_size, cfg.data.fit), cfg.data.image_size, cfg.data.fit)
    labels = np.array(class_index(records, cfg.data.classes, cfg.data.label_map), np.int64)
    if (labels < 0).all():
        raise ValueError(f"test source {cfg.data.test_source}: no folder name maps to a class in data.classes")
    return pix, labels


# --------------------------------------------------------------------------------------------
# distillation
# --------------------------------------------------------------------------------------------
def pct(v: float | None, digits: int = 2) -> str:
    """A fraction as a percentage for reports; '-' for a missing or NaN value."""
    return "-" if v is None or v != v else f"{100 * v:.{digits}f}%"


@dataclass
class DistillResult:
    run_dir: Path
    method: str
    best_epoch: int
    val_acc: float                      # accuracy on the query labels of validation rows
    teacher_val_acc: float | None
    test_acc: float | None
    teacher_test_acc: float | None
    parameters: int
    export_dir: Path
    model_card: Path
    kept: int
    candidates: int
    seconds: float
    resumed_from: int | None = None
    val_agreement: float | None = None  # top-1 agreement with the teacher on validation rows
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [("method", self.method), ("student parameters", f"{self.parameters:,}"),
                ("kept at last epoch", f"{self.kept} / {self.candidates}"),
                ("best epoch (validation)", str(self.best_epoch)),
                ("validation accuracy: student / teacher", f"{pct(self.val_acc)} / {pct(self.teacher_val_acc)}"),
                ("validation agreement with the teacher", pct(self.val_agreement)),
                ("test accuracy: student / teacher", f"{pct(self.test_acc)} / {pct(self.teacher_test_acc)}"),
                ("model card", str(self.model_card)), ("time", f"{self.seconds:.0f}s")]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def command_line() -> str:
    """The command that made this run (`python -m webkd.flows ...` is the same program as `webkd ...`)."""
    return " ".join(shlex.quote(a) for a in ["webkd"] + sys.argv[1:])


def load_overrides_for(cfg: Config) -> dict[str, str]:
    from webkd.selection.overrides import load_overrides

    return load_overrides(cfg.paths.overrides)


def _lineage(cfg: Config, records: list[Record], final_epoch: int, out: RunPaths | None = None) -> dict[str, Any]:
    from webkd.pipeline.records import load_quarantine
    from webkd.selection.policy import read_ledger

    table = read_ledger((out or cfg.paths).ledger(final_epoch)).to_pydict()
    kept = np.array(table["kept"])
    reason = np.array(table["reason"], dtype=object)
    pseudo = np.array(table["pseudo_label"])
    train = np.array(table["split"]) == "train"
    per_class = []
    for k, name in enumerate(cfg.data.classes):
        m = train & (pseudo == k)
        rej = reason[m & ~kept]
        top = max(set(rej.tolist()), key=rej.tolist().count) if len(rej) else ""
        per_class.append({"class": name, "kept": int((m & kept).sum()), "rejected": int((m & ~kept).sum()),
                          "top_reason": top})
    return {"pool": len(records), "quarantined": len(load_quarantine(cfg.paths.quarantine)),
            "near_duplicates": int(sum(r.status == "near_duplicate" for r in records)),
            "validation": int((np.array(table["split"]) == "val").sum()), "sources": list(cfg.data.sources),
            "epoch": final_epoch, "kept": int((kept & train).sum()), "rejected": int((~kept & train).sum()),
            "per_class": per_class}


def build_student_and_method(cfg: Config, teachers: list, sample):
    """The student (warm-started when configured) and the method with its model-derived args."""
    import torch

    from webkd.training.methods import method_from_models
    from webkd.training.models import build_model

    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, num_classes=len(cfg.data.classes) or None, class_names=cfg.data.classes)
    method = method_from_models(cfg.train.method, student, teachers, sample, **cfg.train.method_args)
    if cfg.train.warm_start:
        warm_start(student, method, cfg.train.warm_start)
    return student, method


def warm_start(student, method, source: str) -> None:
    """Initialise from a previous export folder (`training.export.warm_start`)."""
    from webkd.training.export import warm_start as warm_start_from_export

    warm_start_from_export(student, method, source)


def distill(cfg: Config, curate_first: bool = True, out: RunPaths | None = None) -> DistillResult:
    """ingest -> features -> index (all incremental) -> fit -> export -> model card -> test once.

    `out`: where the resolved config, checkpoints, ledgers, metrics and export go (default: the
    run directory; a refresh challenger uses `students/<version>/`). The pool is always read
    from the run directory."""
    import torch

    from webkd.training.export import save_export, write_model_card
    from webkd.training.loop import accuracy, fit, load_checkpoint, predict_logits

    t0 = time.time()
    out = out or cfg.paths
    if out == cfg.paths:
        save_resolved_config(cfg)
    else:  # a challenger's own config (warm start, epochs) goes beside its outputs
        atomic_write_text(out.config, dump_config(cfg))
    device = resolve_device(cfg.device)
    if curate_first:
        ingest(cfg)
    teachers = build_teachers(cfg, str(device))
    if curate_first and cfg.teachers:
        features(cfg, teachers=teachers)
        index(cfg)
    pool = build_pool(cfg)
    sample = torch.from_numpy(np.array(pool.pixels[:8])).permute(0, 3, 1, 2).float() / 255
    teacher_models = [m for _, m, _ in teachers]
    student, method = build_student_and_method(cfg, teacher_models, sample)
    result = fit(student, teacher_models, method, pool, cfg.train, cfg.selection, out, seed=cfg.seed,
                 device=device, overrides=load_overrides_for(cfg), run_fingerprint=cfg.fingerprint())
    best = load_checkpoint(out.best_checkpoint, device)
    student.load_state_dict(best["student"])
    method.load_state_dict(best["method"])
    student.eval()
    method.eval()
    deployed = method.deploy(student, teacher_models).eval()

    val_rows = np.flatnonzero((pool.split == "val") & (pool.val_labels >= 0))
    teacher_val = None
    if pool.teacher_logits is not None and len(val_rows):
        teacher_val = accuracy(pool.teacher_logits[val_rows], pool.val_labels[val_rows], pool.class_group)
    test = test_set(cfg)
    test_acc = teacher_test = None
    if test is not None:  # the test set is read once, here, after the checkpoint is chosen
        tpix, tlab = test
        rows = np.arange(len(tlab))
        with torch.no_grad():
            test_acc = accuracy(predict_logits(lambda x: deployed(x), tpix, rows, device), tlab)
            if teacher_models:
                teacher_test = accuracy(predict_logits(
                    lambda x: torch.stack([t(x).logits.float() for t in teacher_models]).mean(0), tpix, rows, device), tlab)

    best_scores = best.get("val", {})
    metrics = {"val_acc": best_scores.get("val_acc", float("nan")),
               "val_agreement": best_scores.get("val_agreement", float("nan")),
               "val_metric": result.history[-1]["val_metric"] if result.history else None,
               "best_epoch": result.best_epoch}
    if teacher_val is not None:
        metrics["teacher_val_acc"] = teacher_val
    if test_acc is not None:
        metrics["test_acc"] = test_acc
        metrics["teacher_test_acc"] = teacher_test
    from webkd.training.models import fingerprint as model_fingerprint

    meta = {"name": cfg.name, "method": cfg.train.method, "classes": list(cfg.data.classes),
            "student_spec": cfg.student.model_dump(mode="json"),
            "student_num_classes": cfg.student.num_classes or len(cfg.data.classes),
            "deploy": method.deploy_info(), "teachers": [k for k, _, _ in teachers],
            "teacher_fingerprints": [fp for _, _, fp in teachers], "metrics": metrics,
            "student_fingerprint": model_fingerprint(student, cfg.student),
            "config_fingerprint": cfg.fingerprint(), "command": command_line()}
    exp = save_export(deployed.cpu(), out.export_dir, meta, sample.cpu(), onnx=cfg.export.onnx,
                      opset=cfg.export.opset, atol=cfg.export.atol)
    meta = read_json(out.export_dir / "student.json")
    records = load_manifest(cfg.paths.manifest)
    final_epoch = max(e for e in range(cfg.train.epochs) if out.ledger(e).exists())
    card = write_model_card(out.export_dir, meta, metrics, _lineage(cfg, records, final_epoch, out),
                            command_line())
    atomic_write_json(out.metrics, {**read_json(out.metrics, {}), "final": metrics})
    last = result.history[-1] if result.history else {}
    return DistillResult(run_dir=cfg.paths.root, method=cfg.train.method, best_epoch=result.best_epoch,
                         val_acc=metrics["val_acc"], teacher_val_acc=teacher_val, test_acc=test_acc,
                         teacher_test_acc=teacher_test, parameters=exp.parameters, export_dir=exp.export_dir,
                         model_card=card, kept=int(last.get("kept", 0)), candidates=int(last.get("candidates", 0)),
                         seconds=time.time() - t0, resumed_from=result.resumed_from, val_agreement=metrics["val_agreement"])


# --------------------------------------------------------------------------------------------
# curation without training, and champion / challenger refresh (flows/curate.py, refresh.py)
# --------------------------------------------------------------------------------------------
def teacher_selection(cfg: Config) -> dict[str, Any]:
    """The epoch-0 decision over the whole pool (teacher alone, then the overrides store) ->
    `selection/epoch_000.parquet`; the same decision `fit` makes before its first epoch."""
    import torch

    from webkd.selection.policy import ledger_table, write_ledger
    from webkd.training.loop import reselect

    pool = build_pool(cfg)
    if pool.teacher_logits is None:
        raise ValueError("no cached teacher logits for every manifest row: run `webkd features` first")
    sel, _ = reselect(0, 1 / cfg.train.epochs, pool, None, None, [], cfg.selection, torch.device("cpu"), None,
                      load_overrides_for(cfg), cfg.train.eval_batch_size)
    table = ledger_table(sel, pool.ids, np.arange(len(pool)), 0, pool.split, pool.web_labels, pool.web_class)
    path = write_ledger(cfg.paths.ledger(0), table)
    return {"ledger": str(path), "rows": len(pool), "kept": int(sel.keep.sum()),
            "overridden": int((sel.reason == "override").sum())}


def gallery(cfg: Config) -> Path:
    """(Re-)render the run's review page from its ledgers, manifest and overrides."""
    from webkd.selection.gallery import render_gallery

    return render_gallery(cfg.paths.root, classes=list(cfg.data.classes) or None)


def curate(cfg: Config) -> dict[str, Any]:
    """ingest -> features -> index -> teacher-only selection -> gallery, all incremental."""
    report = ingest(cfg)
    feats = features(cfg)
    idx = index(cfg) if cfg.teachers else None
    sel = teacher_selection(cfg)
    return {"ingest": report, "features": feats, "index": idx, "selection": sel, "gallery": gallery(cfg)}


def training_fingerprint(cfg: Config) -> str:
    """Hash of the config parts that change what a student learns. Left out: names and paths
    (name, run_dir, data sources: the pool ids stand for the data), device, flows, export,
    the test set and train.warm_start (a refresh sets it)."""
    import json

    d = cfg.model_dump(mode="json")
    for k in ("name", "run_dir", "device", "flows", "export"):
        d.pop(k, None)
    for k in ("sources", "test_source", "val_source"):
        d["data"].pop(k, None)
    d["train"].pop("warm_start", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def pool_state(cfg: Config) -> dict[str, Any]:
    """What a student trained now would be trained on (pool ids, overrides, training config)."""
    from webkd.training.registry import pool_state as state

    return state([r.id for r in load_manifest(cfg.paths.manifest)], load_overrides_for(cfg),
                 training_fingerprint(cfg))


def _warm_start_source(cfg: Config, export_dir: Path) -> tuple[str | None, str]:
    """The champion's export when the configured student can start from it, with a note why not."""
    meta = read_json(export_dir / "student.json", default=None) or {}
    if meta.get("student_spec") != cfg.student.model_dump(mode="json"):
        return None, "student architecture changed since the champion: training from scratch"
    if meta.get("method") != cfg.train.method or list(meta.get("classes") or []) != list(cfg.data.classes):
        return None, "method or classes changed since the champion: training from scratch"
    return str(export_dir), f"warm start from {export_dir}"


def refresh_plan(cfg: Config) -> dict[str, Any]:
    """Decide whether a refresh trains a challenger: yes when the pool ids, the overrides or the
    training config differ from those of the newest trained student (or none exists). First
    export/ is repaired after an interrupted promotion, and an export/ written outside the flows
    (library `distill`) is registered as the champion."""
    from webkd.training import registry

    paths = cfg.paths
    registry.sync_export(paths)
    registry.adopt_export(paths)
    reg = registry.load_registry(paths.registry)
    state = pool_state(cfg)
    train, reason = registry.needs_training(reg, state)
    champ = reg.champion_entry
    warm, note = (None, "no champion yet: training from scratch")
    if champ is not None:
        warm, note = _warm_start_source(cfg, paths.root / champ["export"])
    return {"train": train, "reason": reason, "champion": reg.champion,
            "version": registry.allocate_version(paths) if train else None,
            "parent": reg.champion if warm else None, "warm_start": warm, "warm_note": note, "state": state}


def challenger_config(cfg: Config, warm_start: str | None) -> Config:
    """The config a challenger trains with. Warm-started from the champion's export it fine-tunes:
    `flows.refresh_epochs` epochs (when set) at `train.lr x flows.refresh_lr_scale`; restarting
    at the full learning rate would first undo what the champion learned. From scratch (no
    usable champion): the configured epochs and learning rate."""
    train = cfg.train.model_dump()
    train["warm_start"] = warm_start
    if warm_start:
        train["lr"] = cfg.train.lr * cfg.flows.refresh_lr_scale
        if cfg.flows.refresh_epochs:
            train["epochs"] = cfg.flows.refresh_epochs
    return Config.model_validate({**cfg.model_dump(), "train": train})


def train_challenger(cfg: Config, plan: dict[str, Any]) -> DistillResult:
    """Train the planned challenger into `students/<version>/`; the champion's export and the
    run's checkpoints, ledgers and metrics are not touched."""
    from webkd.training.registry import student_dir

    if not plan.get("version"):
        raise ValueError("the refresh plan has no challenger version (nothing to train)")
    return distill(challenger_config(cfg, plan["warm_start"]), curate_first=False,
                   out=student_dir(cfg.paths, plan["version"]))


@dataclass
class ValidationSplit:
    """What every champion / challenger comparison scores on: the validation rows of the current
    pool (content-hash split, stable as the pool grows) and the targets of the metric the
    training loop selects checkpoints by (`train.val_metric`): the teacher's top-1 on every
    validation row (`val_agreement`) or the query labels of the labelled ones (`val_acc`)."""

    pixels: np.ndarray            # (N, S, S, 3) uint8, the run's pixel cache
    rows: np.ndarray              # (n,) manifest rows scored
    targets: np.ndarray           # (n,) int64 class each row should get
    class_group: np.ndarray | None
    ids: list[str]
    metric: str                   # val_agreement | val_acc


def validation_split(cfg: Config) -> ValidationSplit:
    from webkd.training.loop import val_metric_name
    from webkd.training.methods import METHODS

    pool = build_pool(cfg, with_neighbors=False)
    metric = val_metric_name(cfg.train.val_metric, METHODS[cfg.train.method], pool)
    if metric == "val_agreement":
        rows = np.flatnonzero(pool.split == "val")
        targets = np.asarray(pool.teacher_logits, np.float32)[rows].argmax(1)
        groups = None
    else:
        rows = np.flatnonzero((pool.split == "val") & (pool.val_labels >= 0))
        targets, groups = pool.val_labels[rows], pool.class_group
    return ValidationSplit(pool.pixels, rows, np.asarray(targets, np.int64), groups, [pool.ids[i] for i in rows], metric)


def _compare(cfg: Config, export_dir: Path, champion: str | None) -> dict[str, Any]:
    """Score of `export_dir` and of the champion's export on the same validation rows, with the
    metric training selects checkpoints by."""
    from webkd.training import registry

    v = validation_split(cfg)
    device = str(resolve_device(cfg.device))
    score = registry.evaluate_export(export_dir, v.pixels, v.rows, v.targets, v.class_group, device)
    champ_score = None
    if champion is not None:
        champ_dir = cfg.paths.root / registry.load_registry(cfg.paths.registry).entry(champion)["export"]
        if registry.export_classes(champ_dir) == list(cfg.data.classes):
            champ_score = registry.evaluate_export(champ_dir, v.pixels, v.rows, v.targets, v.class_group, device)
        else:
            log.warning("champion %s predicts other classes: not comparable, the challenger wins", champion)
    return {"metric": v.metric, "rows": int(len(v.rows)), "ids_sha256": registry.ids_sha256(v.ids),
            "score": score, "champion": champion, "champion_score": champ_score}


def judge_challenger(cfg: Config, plan: dict[str, Any], result: DistillResult) -> dict[str, Any]:
    """Evaluate champion and challenger on the same validation split, register the challenger,
    and promote it only if it is better (tie: the champion stays); a promoted challenger's
    ledgers become the run's selection."""
    from webkd.training import registry

    paths = cfg.paths
    version = plan["version"]
    validation = _compare(cfg, result.export_dir, plan["champion"])
    promote, decision = registry.decide(validation["champion_score"], validation["score"],
                                        cfg.flows.promote_min_delta)
    meta = read_json(result.export_dir / "student.json", default={}) or {}
    registry.register(paths, version, kind="refresh", metrics=meta.get("metrics", {}), trained_on=plan["state"],
                      parent=plan["parent"], validation=validation, decision=decision,
                      extra={"epochs": challenger_config(cfg, plan["warm_start"]).train.epochs})
    if promote:
        registry.promote(paths, version)
        registry.publish_selection(registry.student_dir(paths, version).selection_dir, paths.selection_dir,
                                   challenger_config(cfg, plan["warm_start"]).train.epochs)
    log.info("%s: %s", version, decision)
    return {"version": version, "promoted": promote, "decision": decision, **validation,
            "champion_now": registry.load_registry(paths.registry).champion}


def register_distilled(cfg: Config, result: DistillResult) -> dict[str, Any]:
    """Version a student trained in the run directory (`distill`): archive its export under
    `students/<version>/`, compare it with the previous champion on the same validation split
    (recorded, not gating: an explicit distill is the user's choice) and make it the champion.
    Ledgers of epochs beyond this training are removed from `selection/`."""
    from webkd.training import registry

    paths = cfg.paths
    reg = registry.load_registry(paths.registry)
    version = registry.allocate_version(paths, reuse=False)
    export = registry.archive_export(paths, version, result.export_dir)
    validation = _compare(cfg, export, reg.champion)
    prev = "" if reg.champion is None else f", previous champion {reg.champion}: " + \
        ("not comparable" if validation["champion_score"] is None else f"{validation['champion_score']:.4f}")
    decision = f"promoted: explicit distill ({validation['metric']} {validation['score']:.4f}{prev})"
    meta = read_json(export / "student.json", default={}) or {}
    registry.register(paths, version, kind="distill", metrics=meta.get("metrics", {}), trained_on=pool_state(cfg),
                      validation=validation, decision=decision,
                      extra={"epochs": cfg.train.epochs, "warm_start": cfg.train.warm_start})
    registry.promote(paths, version)
    registry.publish_selection(paths.selection_dir, paths.selection_dir, cfg.train.epochs)
    return {"version": version, "promoted": True, "decision": decision, **validation, "champion_now": version}
