"""Curation stages, Config -> library calls: ingest, features, index, refine, the teacher's
selection and the gallery. The CLI verbs and the Prefect tasks (flows/curate.py) both call these,
so a stage behaves the same with or without the Prefect engine (no Prefect here). Stages hand
each other run-directory paths, never tensors.
"""
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from webkd.pipeline.config import Config, save_resolved_config
from webkd.pipeline.features import (encode_shard, feature_shards, load_features, merge_features, plan_features,
                                     resolve_device)
from webkd.pipeline.index_stage import index_run
from webkd.pipeline.ingest import IngestPlan, IngestReport, ingest_shard, merge_ingest, plan_ingest
from webkd.pipeline.pixels import pixel_cache
from webkd.pipeline.records import OVERRIDE, class_index, load_manifest
from webkd.pipeline.shards import Shard, local_map
from webkd.training.pool import NeighborSearch, Pool, build_pool, splits_of

log = logging.getLogger(__name__)


def ingest(cfg: Config, run_shards: Callable[[IngestPlan], list[Path]] | None = None) -> IngestReport:
    """One ingest round: plan (list, cut into shards), the shards (here one after the other, or
    `run_shards(plan)` -> shard files, a task runner's map), merge."""
    save_resolved_config(cfg)
    if not cfg.data.sources:
        raise ValueError("data.sources is empty: give at least one folder:, manifest: or wds: source")
    plan = plan_ingest(cfg.data.sources, cfg.paths, cfg.ingest, cfg.flows.shard_size)
    if run_shards is None:
        files = local_map(lambda s: ingest_shard(plan.entries(s), s, cfg.paths.root, cfg.ingest), plan.shards)
    else:
        files = run_shards(plan) if plan.shards else []
    return merge_ingest(plan, cfg.paths, files)


def pixels(cfg: Config, records: list | None = None) -> np.ndarray:
    """The run's decoded pixel cache, (N, S, S, 3) uint8, row-aligned with the manifest (rows
    whose source file is gone are quarantined, `source_missing`)."""
    records = load_manifest(cfg.paths.manifest) if records is None else records
    return pixel_cache(cfg.paths, records, cfg.data.image_size, cfg.data.fit)


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


def features(cfg: Config, teachers: list | None = None,
             run_shards: Callable[[str, list[Shard]], list[Path]] | None = None) -> dict[str, FeatureSummary]:
    """Cached embeddings + logits of every teacher (and the student when configured): per
    encoder, plan the rows to encode, encode their shards (here, or `run_shards(key, shards)`
    -> shard files, a task runner's map, see `encode_feature_shard`), merge."""
    from webkd.training.models import build_model, fingerprint

    if not cfg.teachers and "student" not in cfg.features.encoders:
        raise ValueError("no encoder to run: configure `teachers:` (or features.encoders: [student])")
    device = resolve_device(cfg.device)
    records = load_manifest(cfg.paths.manifest)
    pix = pixels(cfg, records)
    ids = [r.id for r in records]
    encoders = []
    if "teachers" in cfg.features.encoders:
        encoders += teachers if teachers is not None else build_teachers(cfg, device)
    if "student" in cfg.features.encoders:
        s = build_model(cfg.student, num_classes=len(cfg.data.classes) or None, class_names=cfg.data.classes)
        encoders.append(("student", s, fingerprint(s, cfg.student)))
    out = {}
    for key, model, fp in encoders:
        cached, n_old = plan_features(cfg.paths, key, fp, len(pix), ids)
        shards = feature_shards(key, fp, pix, n_old, cfg.flows.shard_size, ids)
        if run_shards is None or not shards:
            files = local_map(lambda sh: encode_shard(model, pix, sh, cfg.paths.root, cfg.features.batch_size, device),
                              shards)
        else:
            files = run_shards(key, shards)
        cache = merge_features(cfg.paths, key, fp, len(pix), cached, n_old, shards, files, ids)
        out[key] = FeatureSummary(cache.rows, cache.dim, cache.num_classes, cache.computed)
    return out


@functools.lru_cache(maxsize=4)
def _shard_encoder(config_json: str, key: str) -> tuple[Any, str]:
    """(model, device) of encoder `key` in a worker process, built once per config and key."""
    cfg = Config.model_validate_json(config_json)
    device = str(resolve_device(cfg.device))
    if key == "student":
        from webkd.training.models import build_model

        return build_model(cfg.student, num_classes=len(cfg.data.classes) or None,
                           class_names=cfg.data.classes).to(device), device
    found = [m for k, m, _ in build_teachers(cfg, device) if k == key]
    if not found:
        raise ValueError(f"no encoder {key!r} in this config")
    return found[0], device


def encode_feature_shard(cfg: Config, key: str, shard: Shard) -> Path:
    """One features shard on whichever process runs it (a task runner's worker): the encoder is
    built from the config (once per process), the run's pixel cache read memory-mapped."""
    model, device = _shard_encoder(cfg.model_dump_json(), key)
    pix = np.load(cfg.paths.pixels(cfg.data.image_size, cfg.data.fit), mmap_mode="r")
    return encode_shard(model, pix, shard, cfg.paths.root, cfg.features.batch_size, device)


def index_key(cfg: Config) -> str:
    if cfg.index.encoder:
        return cfg.index.encoder
    if not cfg.teachers:
        raise ValueError("index.encoder is not set and there is no teacher to index")
    return cfg.teachers[0].cache_key


def index(cfg: Config, teachers: list | None = None):
    """Decontamination first (eval duplicates leave the candidates), then the FAISS index and
    the near-duplicate groups of what is left."""
    records = load_manifest(cfg.paths.manifest)      # read once for the three steps (1.1M rows: ~12 s a read)
    dec = decontaminate(cfg, teachers, records)
    if dec is not None:                                # it rewrote the manifest (eval_duplicate marks)
        records = load_manifest(cfg.paths.manifest)
    pix = pixels(cfg, records) if cfg.index.near_dup_space == "pixels" and cfg.index.near_dup_threshold is not None \
        else None
    report = index_run(cfg.paths, index_key(cfg), cfg.index, pixels=pix, records=records)
    report.decontam = dec
    return report


def eval_sources(cfg: Config) -> list[tuple[str, str, Path]]:
    """(config key, source, folder it is ingested into) of every evaluation source to decontaminate
    against: data.decontaminate, then data.test_source when decontam.test_source."""
    out = [(f"data.decontaminate.{i}", s, cfg.paths.eval_set(s)) for i, s in enumerate(cfg.data.decontaminate)]
    if cfg.decontam.test_source and cfg.data.test_source not in cfg.data.decontaminate:
        out.append(("data.test_source", cfg.data.test_source, cfg.paths.test_dir))
    return out


def decontaminate(cfg: Config, teachers: list | None = None, records: list | None = None):
    """Mark the pool's exact and near duplicates of evaluation images `eval_duplicate`
    (pipeline/decontam.py); with no evaluation source, clear old marks. None when there is
    nothing to do. `records`: the manifest as on disk, when the caller has read it already."""
    from webkd.pipeline.decontam import decontaminate_run, load_eval_set
    from webkd.pipeline.records import EVAL_DUPLICATE

    sources = eval_sources(cfg)
    records = load_manifest(cfg.paths.manifest) if records is None else records
    if not sources:
        if any(r.status == EVAL_DUPLICATE for r in records):
            return decontaminate_run(cfg.paths, [], None, None, cfg.decontam)
        return None
    device = resolve_device(cfg.device)
    encoder = emb = None
    if "embedding" in cfg.decontam.methods:
        key = cfg.decontam.encoder or index_key(cfg)
        found = [t for t in (teachers if teachers is not None else build_teachers(cfg, str(device))) if t[0] == key]
        if not found:
            raise ValueError(f"decontam.encoder: {key!r} is not a teacher key ({[t.cache_key for t in cfg.teachers]}); "
                             "the embedding method embeds the evaluation images with a teacher "
                             "(or drop embedding from decontam.methods)")
        encoder = found[0]
        cache = load_features(cfg.paths, key)
        if cache is None or cache.rows != len(records):
            raise ValueError(f"decontamination needs the {key} feature cache of every manifest row: run `webkd features`")
        emb = cache.embeddings
    evals = [load_eval_set(src, root, cfg.data.image_size, cfg.data.fit, encoder, cfg.features.batch_size, device,
                           where=where) for where, src, root in sources]
    return decontaminate_run(cfg.paths, evals, pixels(cfg, records), emb, cfg.decontam)


def pool(cfg: Config, with_neighbors: bool | None = None) -> Pool:
    """The run's training pool (`training.pool.build_pool`) with this config's settings."""
    wants = cfg.selection.knn.enabled or (cfg.selection.mode in ("balanced", "soft")
                                          and cfg.selection.relevance.knn_weight > 0)
    knn = wants if with_neighbors is None else with_neighbors
    search = NeighborSearch(index_key(cfg), cfg.selection.knn.k, cfg.index.nprobe, cfg.index.block_size,
                                cfg.index.mmap_budget_mb) if knn else None
    return build_pool(cfg.paths, cfg.data, [t.cache_key for t in cfg.teachers], cfg.train.label_source, search)


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
    split = splits_of(ids, cfg.data.val_fraction)
    ok = np.array([r.status == "ok" for r in records])
    result = refine_labels(np.asarray(cache.embeddings, np.float32), web_class, (split == "train") & ok,
                           split == "val", len(cfg.data.classes), cfg.refine, seed=cfg.seed)
    write_labels(paths.labels, ids, result, extra={"encoder": key, "encoder_fingerprint": cache.fingerprint})
    return result


def load_overrides_for(cfg: Config) -> dict[str, str]:
    """The overrides store, less the `accept` of an eval duplicate (a human accept never puts an
    evaluation image's copy into training; the ledger keeps its reason eval_duplicate)."""
    from webkd.pipeline.records import EVAL_DUPLICATE
    from webkd.selection.overrides import load_overrides

    ov = load_overrides(cfg.paths.overrides)
    if ov and cfg.paths.manifest.exists():
        import pyarrow.parquet as pq

        t = pq.read_table(cfg.paths.manifest, columns=["id", "status"]).to_pydict()
        evald = {i for i, s in zip(t["id"], t["status"]) if s == EVAL_DUPLICATE}
        dropped = [i for i, a in ov.items() if a == "accept" and i in evald]
        if dropped:
            log.warning("%d accept override(s) ignored: those images duplicate an evaluation image (eval_duplicate)",
                        len(dropped))
            ov = {i: a for i, a in ov.items() if i not in set(dropped)}
    return ov


def teacher_selection(cfg: Config) -> dict[str, Any]:
    """The epoch-0 decision over the whole pool (teacher alone, then the overrides store) ->
    `selection/epoch_000.parquet`; the same decision `fit` makes before its first epoch."""
    import torch

    from webkd.selection.policy import ledger_table, ledger_unchanged, write_ledger
    from webkd.training.loop import reselect

    p = pool(cfg)
    if p.teacher_logits is None:
        raise ValueError("no cached teacher logits for every manifest row: run `webkd features` first")
    sel, _ = reselect(0, 1 / cfg.train.epochs, p, None, None, [], cfg.selection, torch.device("cpu"), None,
                      load_overrides_for(cfg), cfg.train.eval_batch_size)
    table = ledger_table(sel, p.ids, np.arange(len(p)), 0, p.split, p.web_labels, p.web_class,
                         label_columns=p.label_columns)
    path = cfg.paths.ledger(0)
    unchanged = ledger_unchanged(path, table)
    if not unchanged:  # the same decision again is not rewritten
        write_ledger(path, table)
    return {"ledger": str(path), "rows": len(p), "kept": int(sel.keep.sum()),
            "overridden": int((sel.reason == OVERRIDE).sum()), "up_to_date": unchanged}


def gallery_current(cfg: Config) -> bool:
    """The review page exists and was rendered from the run's current ledgers, manifest,
    quarantine and overrides."""
    from webkd.selection.gallery import gallery_up_to_date

    return gallery_up_to_date(cfg.paths.root, list(cfg.data.classes) or None)


def gallery(cfg: Config, force: bool = False) -> Path:
    """Render the run's review page from its ledgers, manifest and overrides, unless it is
    current (`force`: always)."""
    from webkd.selection.gallery import render_gallery

    if not force and gallery_current(cfg):
        return cfg.paths.gallery
    return render_gallery(cfg.paths.root, classes=list(cfg.data.classes) or None)


def curate(cfg: Config) -> dict[str, Any]:
    """ingest -> features -> index -> teacher-only selection -> gallery, all incremental."""
    report = ingest(cfg)
    feats = features(cfg)
    idx = index(cfg) if cfg.teachers else None
    sel = teacher_selection(cfg)
    return {"ingest": report, "features": feats, "index": idx, "selection": sel, "gallery": gallery(cfg)}
