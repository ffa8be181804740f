"""Champion / challenger stages: what a student would be trained on now (`pool_state`), whether a
refresh trains (`refresh_plan`), the challenger's config and training, and the comparison of
champion and challenger on the same validation rows (`judge_challenger`); `register_distilled`
versions an explicit distill. Used by flows/refresh.py and flows/distill.py (no Prefect here).
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from webkd.flows.stages.curate import load_overrides_for, pool
from webkd.flows.stages.distill import DistillResult, distill, training_fingerprint  # noqa: F401 (refresh_stages.training_fingerprint)
from webkd.pipeline.config import Config
from webkd.pipeline.features import resolve_device
from webkd.pipeline.records import load_manifest
from webkd.pipeline.storage import read_json
from webkd.training.pool import Pool

log = logging.getLogger(__name__)


def pool_state(cfg: Config) -> dict[str, Any]:
    """What a student trained now would be trained on (pool ids, overrides, training config)."""
    from webkd.selection.overrides import load_labels
    from webkd.training.pool import pool_state as state

    return state([r.id for r in load_manifest(cfg.paths.manifest)], load_overrides_for(cfg),
                 training_fingerprint(cfg), load_labels(cfg.paths.overrides))


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


def validation_split(cfg: Config, p: Pool | None = None) -> ValidationSplit:
    from webkd.training.loop import val_metric_name, validation_targets
    from webkd.training.methods import METHODS

    p = p if p is not None else pool(cfg, with_neighbors=False)
    metric = val_metric_name(cfg.train.val_metric, METHODS[cfg.train.method], p)
    rows, targets, groups = validation_targets(p, metric)      # the rows and targets fit() scores
    return ValidationSplit(p.pixels, rows, targets, groups, [p.ids[i] for i in rows], metric)


def _compare(cfg: Config, export_dir: Path, champion: str | None, p: Pool | None = None) -> dict[str, Any]:
    """Score of `export_dir` and of the champion's export on the same validation rows, with the
    metric training selects checkpoints by."""
    from webkd.training import registry

    v = validation_split(cfg, p)
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


def judge_challenger(cfg: Config, plan: dict[str, Any], result: DistillResult, p: Pool | None = None) -> dict[str, Any]:
    """Evaluate champion and challenger on the same validation split, register the challenger,
    and promote it only if it is better (tie: the champion stays); a promoted challenger's
    ledgers become the run's selection."""
    from webkd.training import registry

    paths = cfg.paths
    version = plan["version"]
    validation = _compare(cfg, result.export_dir, plan["champion"], p)
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


def _registered_distill(reg, sha: str | None, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The newest registry entry when it is an explicit distill of these weights and this training
    state: the same student, registered by a run killed before it had finished promoting it
    (an older entry with the same weights is left alone: a re-run after a refresh is a new version)."""
    e = reg.entries[-1] if reg.entries else None
    if e is not None and sha is not None and e.get("kind") == "distill" and e.get("weights_sha256") == sha \
            and meta.get("trained_on") is not None and e.get("trained_on") == meta["trained_on"]:
        return e
    return None


def register_distilled(cfg: Config, result: DistillResult, p: Pool | None = None) -> dict[str, Any]:
    """Version a student trained in the run directory (`distill`): archive its export under
    `students/<version>/`, compare it with the previous champion on the same validation split
    (recorded, not gating: an explicit distill is the user's choice) and make it the champion.
    Ledgers of epochs beyond this training are removed from `selection/`. The same student
    registered last (a re-run after a kill during registration) is promoted again, not copied
    into a new version."""
    from webkd.training import registry

    paths = cfg.paths
    reg = registry.load_registry(paths.registry)
    sha = registry.weights_sha256(result.export_dir)
    done = _registered_distill(reg, sha, read_json(result.export_dir / "student.json", default={}) or {})
    if done is not None:   # this very student is registered: a re-run (after a kill before its promotion
        log.info("%s is already registered as %s: making it the champion again", result.export_dir,
                 done["version"])                # was complete) finishes that version, no duplicate
        registry.promote(paths, done["version"])
        registry.publish_selection(paths.selection_dir, paths.selection_dir, cfg.train.epochs)
        return {"version": done["version"], "promoted": True, "decision": done["decision"],
                **(done.get("validation") or {}), "champion_now": done["version"]}
    # an archive left by a run killed before it registered this very student is reused, not orphaned
    version = registry.unregistered_version(paths, sha)
    if version is None:
        version = registry.allocate_version(paths, reuse=False)
        registry.archive_export(paths, version, result.export_dir)
    export = registry.student_dir(paths, version).export_dir
    validation = _compare(cfg, export, reg.champion, p)
    prev = "" if reg.champion is None else f", previous champion {reg.champion}: " + \
        ("not comparable" if validation["champion_score"] is None else f"{validation['champion_score']:.4f}")
    decision = f"promoted: explicit distill ({validation['metric']} {validation['score']:.4f}{prev})"
    meta = read_json(export / "student.json", default={}) or {}
    registry.register(paths, version, kind="distill", metrics=meta.get("metrics", {}),   # the pool it used
                      trained_on=meta.get("trained_on") or pool_state(cfg),
                      validation=validation, decision=decision,
                      extra={"epochs": cfg.train.epochs, "warm_start": cfg.train.warm_start})
    registry.promote(paths, version)
    registry.publish_selection(paths.selection_dir, paths.selection_dir, cfg.train.epochs)
    return {"version": version, "promoted": True, "decision": decision, **validation, "champion_now": version}
