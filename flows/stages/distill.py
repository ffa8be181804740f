"""Distillation stages: fit -> evaluate (validation, then the test set once) -> export + model card.

`distill` is the library-level `webkd distill --no-flow` and the body of the distill flow's
training task (flows/distill.py); a refresh challenger (flows/stages/refresh.py) runs it into
`students/<version>/`. The pool is built once (`training.pool.build_pool`) and handed to each step.
"""
import logging
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from webkd.flows.stages.curate import build_teachers, features, index, ingest, load_overrides_for, pool
from webkd.pipeline.config import Config, IngestConfig, RunPaths, dump_config, save_resolved_config
from webkd.pipeline.features import resolve_device
from webkd.pipeline.ingest import run_ingest
from webkd.pipeline.pixels import pixel_cache
from webkd.pipeline.records import OK, class_index, load_manifest
from webkd.pipeline.report import pct
from webkd.pipeline.storage import atomic_write_json, atomic_write_text, read_json, replace_dir
from webkd.training.pool import Pool, sample_batch

log = logging.getLogger(__name__)


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


def training_fingerprint(cfg: Config) -> str:
    """Hash of the config parts that change what a student learns. Left out: names and paths
    (name, run_dir, data sources: the pool ids stand for the data), device, flows, export,
    the test set and train.warm_start (a refresh sets it)."""
    import hashlib
    import json

    d = cfg.model_dump(mode="json")
    for k in ("name", "run_dir", "device", "flows", "export"):
        d.pop(k, None)
    for k in ("sources", "test_source", "val_source"):
        d["data"].pop(k, None)
    d["train"].pop("warm_start", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def command_line() -> str:
    """The command that made this run (`python -m webkd.flows ...` is the same program as `webkd ...`)."""
    return " ".join(shlex.quote(a) for a in ["webkd"] + sys.argv[1:])


def test_set(cfg: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """(pixels, labels) of `data.test_source`, ingested into <run>/test (labels from folder names)."""
    if not cfg.data.test_source:
        return None
    tpaths = RunPaths(cfg.paths.test_dir)
    run_ingest([cfg.data.test_source], tpaths, IngestConfig(min_side=1))
    records = load_manifest(tpaths.manifest)
    pix = pixel_cache(tpaths, records, cfg.data.image_size, cfg.data.fit)
    labels = np.array(class_index(records, cfg.data.classes, cfg.data.label_map), np.int64)
    labels[np.array([r.status != OK for r in records], bool)] = -1   # a file gone since ingest is not scored
    if (labels < 0).all():
        raise ValueError(f"test source {cfg.data.test_source}: no folder name maps to a class in data.classes")
    return pix, labels


def prepare(cfg: Config) -> list[str]:
    """What a distill reads, computed (incrementally) ahead of it: ingest, features, index and the
    test set; the bench scripts prepare one curated pool and train many students on it.
    Returns the stages' report lines."""
    report = ingest(cfg)
    lines = [report.summary(), *(f"features {k}: {v}" for k, v in features(cfg).items())]
    if cfg.teachers:
        lines.append(str(index(cfg)))
    test_set(cfg)
    return lines


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------
def build_student_and_method(cfg: Config, teachers: list, sample):
    """The student (warm-started when configured) and the method, built from the models."""
    import torch

    from webkd.training.export import warm_start
    from webkd.training.methods import method_from_models
    from webkd.training.models import build_model

    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, num_classes=len(cfg.data.classes) or None, class_names=cfg.data.classes)
    method = method_from_models(cfg.train.method, student, teachers, sample, **cfg.train.args)
    if cfg.train.warm_start:
        warm_start(student, method, cfg.train.warm_start)
    return student, method


@dataclass
class Trained:
    """A fitted student at its best validation checkpoint, and the module that ships."""

    student: Any
    method: Any
    deployed: Any
    fit: Any                            # training.loop.FitResult
    best_val: dict[str, float]          # validation scores of the chosen checkpoint
    trained_on: dict[str, Any] = field(default_factory=dict)  # training.pool.pool_state of the pool it used
    prior: Any = None                   # training.prior.Choice when export.prior_correction is on
    uncorrected: Any = None             # the deployed module before the prior correction


def correct_prior(cfg: Config, p: Pool, trained: Trained, out: RunPaths, device) -> Trained:
    """Apply `export.prior_correction` (training/prior.py) to the chosen checkpoint's deployed module:
    the prior from the run's ledgers, tau chosen on validation (the test set is not read here)."""
    from webkd.training import prior

    # the chosen checkpoint trained on the ledgers of epochs 0 .. best_epoch
    ledgers = [out.ledger(e) for e in range(trained.fit.best_epoch + 1) if out.ledger(e).exists()]
    deployed, choice = prior.correct(trained.deployed, p, ledgers, cfg.export.prior_correction, device,
                                     cfg.train.eval_batch_size)
    if choice is not None:
        scores = choice.scores
        log.info("prior correction: tau %g (class-balanced validation agreement %.4f, %.4f at tau 0)",
                 choice.tau, scores[choice.tau][1], scores[0.0][1])
    trained.uncorrected, trained.deployed, trained.prior = trained.deployed, deployed, choice
    return trained


def _fit(cfg: Config, p: Pool, teacher_models: list, out: RunPaths, device, dist):
    """`training.loop.fit` with this config: (student, method, FitResult)."""
    from webkd.training.loop import fit

    student, method = build_student_and_method(cfg, teacher_models, sample_batch(p))
    result = fit(student, teacher_models, method, p, cfg.train, cfg.selection, out, seed=cfg.seed,
                 device=device, overrides=load_overrides_for(cfg), run_fingerprint=cfg.fingerprint(),
                 class_names=list(cfg.data.classes) or None, dist=dist)
    return student, method, result


def fit_worker(dist, cfg: Config, out: RunPaths):
    """One DDP training process (a `--nproc` worker, or a torchrun rank past 0): waits for rank
    0's pool (`fit_student` holds the same barrier), builds teachers, pool and student, fits."""
    dist.barrier()
    teachers = [m for _, m, _ in build_teachers(cfg, str(dist.device))]
    return _fit(cfg, pool(cfg), teachers, out, dist.device, dist)[2]


def fit_student(cfg: Config, p: Pool, teachers: list, out: RunPaths, device, dist=None) -> Trained:
    """Train with the configured method (resumable), then reload the best validation checkpoint.
    With `train.nproc` > 1, `train.nproc` spawned processes train (DDP, training/distributed.py)
    and this one reads their best checkpoint; `dist`: this is rank 0 of a torchrun group."""
    from webkd.training import distributed
    from webkd.training.loop import load_checkpoint
    from webkd.training.pool import pool_state

    teacher_models = [m for _, m, _ in teachers]
    overrides = load_overrides_for(cfg)
    nproc = dist.world if dist is not None else cfg.train.nproc
    distributed.check_rows(nproc, int(p.candidates.sum()))   # candidates: train split, status ok
    if dist is None and nproc > 1:
        result = distributed.launch(fit_worker, nproc, (cfg, out), cfg.device)
        student, method = build_student_and_method(cfg, teacher_models, sample_batch(p))
    else:
        if dist is not None:
            dist.barrier()      # the pool is ready: the other ranks build theirs (fit_worker)
        student, method, result = _fit(cfg, p, teacher_models, out, device, dist or distributed.LOCAL)
    best = load_checkpoint(out.best_checkpoint, device)
    student.load_state_dict(best["student"])
    method.load_state_dict(best["method"])
    student.eval()
    method.eval()
    return Trained(student, method, method.deploy(student, teacher_models).eval(), result, best.get("val", {}),
                   trained_on=pool_state(list(p.ids), overrides, training_fingerprint(cfg), p.relabels))


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
def evaluate(cfg: Config, p: Pool, trained: Trained, teachers: list, device) -> dict[str, Any]:
    """Validation scores of the chosen checkpoint, the teacher's validation accuracy, and the
    test set, read once here, after the checkpoint is chosen."""
    import torch

    from webkd.training.loop import accuracy, predict_logits, validation_targets

    teacher_models = [m for _, m, _ in teachers]
    metrics: dict[str, Any] = {"val_acc": trained.best_val.get("val_acc", float("nan")),
                               "val_agreement": trained.best_val.get("val_agreement", float("nan")),
                               "val_metric": trained.fit.history[-1]["val_metric"] if trained.fit.history else None,
                               "best_epoch": trained.fit.best_epoch}
    val_rows, val_targets, groups = validation_targets(p, "val_acc")   # the rows fit() scores val_acc on
    if p.teacher_logits is not None and len(val_rows):
        metrics["teacher_val_acc"] = accuracy(p.teacher_logits[val_rows], val_targets, groups)
    if trained.prior is not None:   # chosen on validation; the uncorrected student's test score is reported beside it
        tau = trained.prior.tau
        metrics.update(prior_tau=tau, val_balanced_agreement=trained.prior.scores[tau][1],
                       val_balanced_agreement_uncorrected=trained.prior.scores[0.0][1])
    test = test_set(cfg)
    if test is not None:
        tpix, tlab = test
        rows = np.arange(len(tlab))
        with torch.no_grad():
            metrics["test_acc"] = accuracy(predict_logits(lambda x: trained.deployed(x), tpix, rows, device), tlab)
            if trained.prior is not None and trained.prior.tau != 0:
                metrics["test_acc_uncorrected"] = accuracy(
                    predict_logits(lambda x: trained.uncorrected(x), tpix, rows, device), tlab)
            metrics["teacher_test_acc"] = accuracy(predict_logits(
                lambda x: torch.stack([t(x).logits.float() for t in teacher_models]).mean(0), tpix, rows, device),
                tlab) if teacher_models else None
    return metrics


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def _lineage(cfg: Config, final_epoch: int, out: RunPaths | None = None) -> dict[str, Any]:
    """The model card's data lineage: the run's counts (selection.counts) at the final epoch."""
    from webkd.selection.counts import count_run, query_shares_line

    c = count_run(cfg.paths, (out or cfg.paths).selection_dir, last_epoch=final_epoch)
    names = list(cfg.data.classes)
    per_class = [{"class": names[t.pseudo_label] if 0 <= t.pseudo_label < len(names) else f"class {t.pseudo_label}",
                  "kept": t.kept, "rejected": t.rejected, "top_reason": t.top_reason} for t in c.per_class]
    def name(k: int) -> str:
        return names[k] if 0 <= k < len(names) else f"class {k}"
    return {"pool": c.records, "quarantined": c.quarantined, "near_duplicates": c.near_duplicates,
            "validation": c.validation, "validation_scored": c.validation_scored, "sources": list(cfg.data.sources),
            "epoch": final_epoch, "kept": c.kept, "rejected": c.rejected, "per_class": per_class,
            "query_shares": query_shares_line(c.in_class, c.off_class),
            "collapsed": [x.line(name(x.pseudo_label)) for x in c.collapsed]}


def _curation_settings(cfg: Config) -> dict[str, Any]:
    """What decided which web images trained the student (the model card's curation settings)."""
    data = cfg.data.model_dump(mode="json", include={"classes", "label_map", "class_groups", "image_size", "fit",
                                                     "val_fraction"})
    return {"data": data, "ingest": cfg.ingest.model_dump(mode="json", exclude={"extensions"}),
            "index": cfg.index.model_dump(mode="json"), "selection": cfg.selection.model_dump(mode="json"),
            "train": {"method": cfg.train.method, "args": cfg.train.args, "label_source": cfg.train.label_source,
                      "epochs": cfg.train.epochs, "val_metric": cfg.train.val_metric}}


def export_student(cfg: Config, p: Pool, trained: Trained, teachers: list, metrics: dict[str, Any],
                   out: RunPaths):
    """Export the deployed student (safetensors, ONNX, metadata, int8 ONNX when configured),
    write the model card and the final metrics. Returns (ExportResult, model card path)."""
    import torch

    from webkd.pipeline.storage import ids_sha256
    from webkd.training.card import write_model_card
    from webkd.training.export import (META, pixel_preprocessing, quantize_int8, save_example,
                                       save_export, save_student_predictions)
    from webkd.training.loop import predict_logits
    from webkd.training.models import fingerprint as model_fingerprint

    specs = {t.cache_key: t for t in cfg.teachers}
    meta = {"name": cfg.name, "method": cfg.train.method, "classes": list(cfg.data.classes),
            "label_map": dict(cfg.data.label_map),
            "preprocess": pixel_preprocessing(cfg.data.image_size, cfg.data.fit,
                                              cfg.student.preprocess.model_dump(mode="json")),
            "student_spec": cfg.student.model_dump(mode="json"),
            "student_num_classes": cfg.student.num_classes or len(cfg.data.classes),
            "deploy": trained.method.deploy_info(), "teachers": [k for k, _, _ in teachers],
            "teacher_models": [{"key": k, "library": specs[k].library, "name": specs[k].name,
                                "pretrained": specs[k].pretrained} if k in specs else {"key": k}
                               for k, _, _ in teachers],
            "teacher_fingerprints": [fp for _, _, fp in teachers], "metrics": metrics,
            "student_fingerprint": model_fingerprint(trained.student, cfg.student),
            "config_fingerprint": cfg.fingerprint(), "command": command_line(), "torch_version": torch.__version__,
            "trained_on": trained.trained_on}
    if trained.prior is not None:
        meta["prior_correction"] = trained.prior.info()
    # built in a hidden folder and renamed to export/ when complete: an export is whole or absent
    stage = out.export_stage
    shutil.rmtree(stage, ignore_errors=True)           # left by a killed export (we hold the run lock)
    exp = save_export(trained.deployed.cpu(), stage, meta, sample_batch(p), onnx=cfg.export.onnx,
                      opset=cfg.export.opset, atol=cfg.export.atol)
    meta = read_json(stage / META)
    val_rows = p.validation_rows
    save_example(stage, p.pixels[val_rows[0] if len(val_rows) else 0])
    if cfg.export.int8:
        info = quantize_int8(stage, p.pixels[val_rows[:cfg.export.int8_calibration]], test_set(cfg))
        metrics = {**metrics, "int8_size_ratio": info["size_ratio"]}
        if "test_acc_change" in info:
            metrics.update(int8_test_acc=info["test_acc_int8"], int8_test_acc_change=info["test_acc_change"])
        meta.update(int8=info, metrics=metrics)
        atomic_write_json(stage / META, meta)
    with torch.no_grad():   # one pass over the pool: the page shows the exported student's predictions
        logits = predict_logits(lambda x: trained.deployed(x), p.pixels, np.arange(len(p)), torch.device("cpu"),
                                cfg.train.eval_batch_size, desc="student predictions")
    save_student_predictions(stage, p.ids, logits, f"{cfg.name}: {out.root.name}")
    final_epoch = max(e for e in range(cfg.train.epochs) if out.ledger(e).exists())
    lineage = {**_lineage(cfg, final_epoch, out), "test_source": cfg.data.test_source,
               "pool_ids_sha256": ids_sha256(p.ids), "curation": _curation_settings(cfg)}
    card = write_model_card(stage, meta, metrics, lineage, command_line(), license=cfg.export.license)
    replace_dir(stage, out.export_dir)
    exp.export_dir, exp.files = out.export_dir, [out.export_dir / f.name for f in exp.files]
    from webkd.training.loop import read_metrics

    atomic_write_json(out.metrics, {**(read_metrics(out.metrics) or {}), "final": metrics})
    return exp, out.export_dir / card.name


def distill(cfg: Config, curate_first: bool = True, out: RunPaths | None = None, p: Pool | None = None,
            dist=None) -> DistillResult:
    """ingest -> features -> index (all incremental) -> fit -> evaluate (test once) -> export.

    `out`: where the resolved config, checkpoints, ledgers, metrics and export go (default: the
    run directory; a refresh challenger uses `students/<version>/`). The pool is always read
    from the run directory (or given as `p`, already built). `dist`: this process is rank 0 of
    a torchrun group whose other ranks run `fit_worker` (fit only)."""
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
        index(cfg, teachers)
    p = p if p is not None else pool(cfg)
    trained = correct_prior(cfg, p, fit_student(cfg, p, teachers, out, device, dist), out, device)
    metrics = evaluate(cfg, p, trained, teachers, device)
    exp, card = export_student(cfg, p, trained, teachers, metrics, out)
    last = trained.fit.history[-1] if trained.fit.history else {}
    return DistillResult(run_dir=cfg.paths.root, method=cfg.train.method, best_epoch=trained.fit.best_epoch,
                         val_acc=metrics["val_acc"], teacher_val_acc=metrics.get("teacher_val_acc"),
                         test_acc=metrics.get("test_acc"), teacher_test_acc=metrics.get("teacher_test_acc"),
                         parameters=exp.parameters, export_dir=exp.export_dir, model_card=card,
                         kept=int(last.get("kept", 0)), candidates=int(last.get("candidates", 0)),
                         seconds=time.time() - t0, resumed_from=trained.fit.resumed_from,
                         val_agreement=metrics["val_agreement"])
