"""The one typed Config: pydantic v2 schema, YAML loading, dotted CLI overrides (RunPaths: pipeline/paths.py).

Every section forbids unknown keys, so a typo in a YAML file or an override fails at once with
the offending key named (and the closest valid key suggested). Library functions take one
section (or plain arguments), never the whole Config. Override parsing, the relative-path rule
and weights sidecars live in pipeline/config_io.py; the checks that need the file system
(paths that must exist) in pipeline/config_checks.py.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from webkd.pipeline.config_io import ConfigError, apply_overrides, resolve_paths
from webkd.pipeline.paths import RunPaths  # noqa: F401  (Config.paths; its home is pipeline/paths.py)


# decontamination defaults, measured by bench/decontam.py (BENCHMARKS.md, decontamination)
PHASH_MAX_BITS = 4
PHASH_CROPS = (1.0, 0.9, 0.8)
PHASH_VERIFY = 0.95
EMBEDDING_THRESHOLD = 0.99


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class PreprocessSpec(_Section):
    """How a model wants its input. Applied on tensors to the shared RGB [0, 1] pixel cache."""

    size: int = Field(32, ge=8, description="square input side in pixels")
    channels: Literal[1, 3] = 3
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    invert: bool = Field(False, description="1 - x before normalising (white-on-black domains)")
    background: Literal["none", "border"] = Field(
        "none", description="border: |x - median of the image border| (object bright on black, any backdrop)")
    border_width: int = Field(2, ge=1, description="ring width for background=border")

    @model_validator(mode="after")
    def _stats_match_channels(self) -> "PreprocessSpec":
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) not in (1, self.channels):
                raise ValueError(f"{name} has {len(v)} values for {self.channels} channels")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class ModelSpec(_Section):
    """A model from a library: `{library: open_clip, name: ViT-B-32, pretrained: <tag|file>}`."""

    key: str | None = Field(None, description="short name for caches and reports; default: name")
    library: Literal["project", "torchvision", "timm", "open_clip"] = "project"
    name: str = "cnn_small"
    weights: str | None = Field(None, description="local safetensors or torch state-dict file")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or local checkpoint")
    num_classes: int | None = Field(None, description="default: len(data.classes)")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    prompts: list[str] = Field(
        default_factory=lambda: ["a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}."],
        description="open_clip zero-shot prompt templates; {} is the class name",
    )

    @property
    def cache_key(self) -> str:
        return self.key or self.name.replace("/", "_")


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------
class DataConfig(_Section):
    sources: list[str] = Field(
        default_factory=list,
        description="web image sources, by prefix: folder:DIR, manifest:FILE.csv|.parquet, wds:SHARDS.tar",
    )
    classes: list[str] = Field(default_factory=list, description="teacher's classes, in output order")
    label_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="web query -> class name; a query not in classes and not mapped is off-class",
    )
    @model_validator(mode="after")
    def _label_map_names_classes(self) -> "DataConfig":
        for query, name in self.label_map.items():
            if self.classes and name is not None and name not in self.classes:
                near = difflib.get_close_matches(name, self.classes, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ValueError(f"label_map.{query}: {name!r} is not one of data.classes ({hint}classes: "
                                 f"{self.classes}; null marks the query off-class)")
        return self

    class_groups: list[list[str]] = Field(
        default_factory=list,
        description="classes that count as one when scoring validation (e.g. footwear for a 'shoes' query)",
    )
    image_size: int = Field(32, ge=8, description="side of the decoded pixel cache all models read")
    fit: Literal["squash", "crop", "pad"] = Field(
        "squash", description="how non-square images reach image_size"
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out slice of the pool")
    val_source: str | None = Field(None, description="optional labelled validation source")
    test_source: str | None = Field(None, description="optional labelled test source, read once")
    decontaminate: list[str] = Field(
        default_factory=list,
        description="evaluation sources (same prefixes as sources) whose exact and near duplicates are taken "
                    "out of the pool as eval_duplicate (settings: the decontam section)")

    @field_validator("sources", "decontaminate")
    @classmethod
    def _known_prefix(cls, v: list[str]) -> list[str]:
        for s in v:
            if s.split(":", 1)[0] not in ("folder", "manifest", "wds") or ":" not in s:
                raise ValueError(f"source {s!r} must start with folder:, manifest: or wds:")
        return v


class IngestConfig(_Section):
    min_side: int = Field(16, ge=1, description="smaller images are quarantined as too_small")
    max_pixels: int = Field(89_478_485, description="Pillow's decompression-bomb limit (w*h)")
    max_bytes: int = Field(50 * 2**20, description="larger files are quarantined as too_large")
    path_column: str = "path"
    label_column: str = "label"
    caption_column: str = "caption"
    url_column: str = "url"
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"],
        description="names that usually hold images (messages only: every file and tar member is "
                    "listed and decided by its content, none is skipped by its name)",
    )


class FeaturesConfig(_Section):
    batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    encoders: list[Literal["teachers", "student"]] = Field(default_factory=lambda: ["teachers"])


class IndexConfig(_Section):
    encoder: str | None = Field(None, description="feature cache key to index; default: first teacher")
    factory: str | None = Field(None, description="FAISS factory string; default: chosen by size")
    flat_max: int = Field(20_000, description="exact Flat index up to this many vectors")
    memory_budget_mb: float = Field(2048, description="past this, IVF-PQ instead of IVF-Flat")
    ivfpq_min: int = Field(500_000, ge=1, description="from this many vectors on, fast-scan IVF-PQ with exact re-ranking "
                                                       "(trained on a sample, filled in blocks; see choose_factory)")
    refine_k_factor: float = Field(4.0, ge=1.0, description="a re-ranking index (`...,RFlat`) re-scores k x this many "
                                                            "candidates by exact cosine")
    train_per_list: int = Field(128, ge=30, le=256, description="IVF training sample: vectors per inverted list "
                                                                "(FAISS guidelines: 30..256)")
    retrain_factor: float = Field(2.0, ge=1.0, description="a refresh adds only the new rows to the index; it is "
                                                           "trained again once the pool outgrew this factor of the "
                                                           "rows it was trained on")
    mmap_budget_mb: float = Field(4096, ge=0, description="an index file larger than this is memory-mapped for "
                                                          "searches (faiss.IO_FLAG_MMAP), not read into memory")
    recall_queries: int = Field(1000, ge=0, description="rows sampled to report recall@10 of an approximate index "
                                                        "against brute force after each build or extension (0: off)")
    nprobe: int | None = Field(None, ge=1, description="lists probed per search; default by index type: 16 for "
                                                        "IVF-Flat, 10 for fast-scan IVF-PQ (measured at 1M rows, "
                                                        "BENCHMARKS.md Scale)")
    k: int = Field(10, ge=1)
    block_size: int = Field(4096, ge=1, description="queries per search block")
    near_dup_threshold: float | None = Field(
        0.99, description="cosine to a group's representative; None disables (see perceptual_vectors for the choice)")
    near_dup_space: Literal["pixels", "embedding"] = Field(
        "pixels",
        description="pixels: per-image standardised colour thumbnails (teacher-independent, perceptual); "
                    "embedding: the indexed encoder's (centred) embeddings",
    )
    near_dup_side: int = Field(16, ge=4, le=64, description="thumbnail side for near_dup_space=pixels")
    near_dup_exact_max: int = Field(20_000, ge=1, description="exact (Flat) near-duplicate search up to this many "
                                                             "candidate rows; past it an IVF{~2 sqrt N},SQ8 index")
    near_dup_nprobe: int = Field(8, ge=1, description="lists probed by the IVF near-duplicate search")
    center: bool = Field(True, description="subtract the pool mean before L2-normalising (ReLU features share a direction)")
    use_gpu: Literal["auto", "never"] = "auto"


class DecontamConfig(_Section):
    """Decontamination (pipeline/decontam.py): pool images that are exact or near duplicates of an
    evaluation image (data.decontaminate, and data.test_source with test_source: true) get status
    eval_duplicate, so they are never trained on and never scored as validation. Thresholds were
    measured on real resized / cropped / JPEG re-encoded copies (bench/decontam.py, BENCHMARKS.md)."""

    test_source: bool = Field(False, description="also decontaminate against data.test_source")
    methods: list[Literal["exact", "phash", "embedding"]] = Field(
        default_factory=lambda: ["exact", "phash", "embedding"],
        description="exact: same bytes (sha256); phash: 64-bit DCT perceptual hash of the pixel cache within "
                    "phash_max_bits; embedding: cosine of the encoder's (pool-centred) embeddings through a FAISS "
                    "index, >= embedding_threshold")
    phash_max_bits: int = Field(PHASH_MAX_BITS, ge=0, le=32, description="largest Hamming distance of a pHash match")
    phash_verify: float = Field(PHASH_VERIFY, ge=-1.0, le=1.0,
                                description="a pHash match also needs this cosine of the two images' standardised "
                                            "16 px colour thumbnails (-1: no check)")
    phash_crops: list[float] = Field(
        default_factory=lambda: list(PHASH_CROPS),
        description="each evaluation image is also hashed at these centre crops (share of the side), so a cropped "
                    "copy in the pool matches; 1.0 = the whole image")
    embedding_threshold: float = Field(EMBEDDING_THRESHOLD, gt=0.0, le=1.0,
                                       description="smallest embedding cosine of an embedding match")
    encoder: str | None = Field(None, description="feature cache key for the embedding method; default: index.encoder")

    @field_validator("phash_crops")
    @classmethod
    def _crops_in_range(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.5 <= c <= 1.0 for c in v):
            raise ValueError(f"phash_crops must be shares of the side in [0.5, 1.0], got {v}")
        return v


class KnnConfig(_Section):
    enabled: bool = False
    k: int = Field(10, ge=1)
    min_agree: float = Field(0.3, ge=0.0, le=1.0, description="share of neighbours with the same pseudo-label")


class RelevanceConfig(_Section):
    """[project] the relevance score R of modes balanced / soft (selection.scores.relevance):
    R = ood_weight clip(robust-z(teacher OOD score), +-clip) + knn_weight (2 a - 1) + query_weight g."""

    score: Literal["energy", "max_logit"] = Field(
        "energy", description="teacher OOD score: energy T logsumexp(z_T / T), or the max logit max z_T")
    temperature: float = Field(1.0, gt=0.0, description="T of the energy score")
    ood_weight: float = Field(1.0, ge=0.0, description="weight of the clipped teacher OOD term")
    clip: float | None = Field(
        3.0, gt=0.0, description="clip the robust z of the OOD score to [-clip, clip] (None: no clip), so huge "
                                 "confidently-wrong logits cannot outvote the k-NN and query terms")
    knn_weight: float = Field(
        0.0, ge=0.0, description="weight of the k-NN term 2a - 1, a = share of the selection.knn.k FAISS "
                                 "neighbours with the same teacher top-1 (0: off; > 0 loads the neighbours)")
    knn_source: Literal["teacher", "query"] = Field(
        "teacher", description="neighbour label a is compared on: its teacher top-1, or its web query's class")
    query_weight: float = Field(
        0.0, ge=0.0, description="weight of the web query prior g: +1 query class = teacher top-1, "
                                 "-1 off-class query (web_class -1), 0 otherwise (0: off)")
    discrepancy_weight: float = Field(
        0.0, ge=0.0, description="weight of the student-in-the-loop term: clipped robust z of KL(p_T || p_S) "
                                 "on the scoring view at each reselection (the images the student has not "
                                 "yet matched; 0: off; > 0 scores the pool with the student every reselection)")


class BudgetConfig(_Section):
    """[project] class-balanced budgets (modes balanced / soft): per pseudo-class c with m_c candidates,
    keep the n_c = min(m_c, max(min_per_class, min(ceil(keep m_c), cap))) of highest relevance."""

    keep: float = Field(0.5, gt=0.0, le=1.0, description="q: share of each pseudo-class kept")
    min_per_class: int = Field(10, ge=1, description="floor per class (all of a class with fewer candidates)")
    max_per_class: int | None = Field(None, ge=1, description="absolute cap per class; None: no absolute cap")
    cap_median: float | None = Field(
        2.0, gt=0.0, description="cap = ceil(cap_median x the median of ceil(q m_c) over classes with "
                                 "candidates); None: no relative cap")
    class_power: float = Field(
        1.0, ge=0.0, le=1.0,
        description="beta: 1 keeps ceil(keep m_c) per class (the share of each class, capped as above); "
                    "below 1 the total ceil(keep sum m_c) is shared out in proportion to m_c^beta, water-filled "
                    "(a class with fewer candidates than its share keeps them all, the rest goes to the others): "
                    "0 gives every pseudo-class the same count, whatever the teacher's class mix on the pool "
                    "(cap_median is then not used; max_per_class still is)")
    refresh: bool = Field(
        False, description="group by the mixed teacher/student argmax at each reselection (alpha floored at "
                           "refresh_alpha_min) instead of the teacher's top-1; relevance stays the teacher's")
    refresh_alpha_min: float = Field(0.5, ge=0.0, le=1.0, description="floor on the teacher share when refresh")


class SoftConfig(_Section):
    """[project] mode soft: every candidate trains with w = w_min + (1 - w_min) u^power, u the
    relevance percentile (average ranks, in [0, 1])."""

    w_min: float = Field(0.1, ge=0.0, le=1.0, description="weight of the least relevant candidate")
    power: float = Field(1.0, gt=0.0, description="gamma of u^gamma (> 1: steeper near the top)")
    per_class: bool = Field(False, description="u within the row's pseudo-class instead of over the pool")


class SelectionConfig(_Section):
    mode: Literal["kd3", "teacher", "none", "random", "balanced", "soft"] = Field(
        "kd3", description="kd3: teacher+student dynamic; teacher: teacher only; none: keep all; "
                           "random: a fixed seeded random subset of random_keep of the candidates (a baseline); "
                           "[project] balanced: class-balanced budgets by relevance (hard); soft: every candidate "
                           "trains, weighted by relevance rank (the budget's share counts as kept)"
    )
    random_keep: float = Field(1.0, gt=0.0, le=1.0, description="mode random: share of the candidates kept")
    random_seed: int = Field(0, description="mode random: seed of the subset (the same subset every epoch)")
    p_cut: float = Field(0.95, gt=0.0, le=1.0)
    tau_min: float = Field(0.0, ge=0.0, lt=1.0, description="floor on per-class thresholds")
    reselect_every: int = Field(1, ge=1, description="epochs between re-selection")
    query_top2: bool = Field(False, description="reject when the web query class is outside the teacher top-2")
    knn: KnnConfig = Field(default_factory=KnnConfig)
    fallback: Literal["previous", "all"] = Field("previous", description="on an empty selection")
    relevance: RelevanceConfig = Field(default_factory=RelevanceConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    soft: SoftConfig = Field(default_factory=SoftConfig)
    reject_weight: float = Field(
        0.0, ge=0.0, le=1.0,
        description="[project] soft selection: images rejected by the confidence rules (not validation, "
                    "near-duplicate or override rejections) still train with this weight; 0 = KD^3's hard selection")


class TrainConfig(_Section):
    method: str = "kd3"
    method_args: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="arguments per method name, e.g. {kd3: {kd_weight: 1.0}}; only train.method's block is used")
    label_source: Literal["web", "refined"] = "web"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    steps_per_epoch: int | Literal["candidates"] | None = Field(
        None, description="optimisation steps per epoch, whatever the kept set's size (reshuffled passes over the "
                          "kept rows): a number, or `candidates` (as many as one pass over every training candidate, "
                          "the budget of no selection); default: one pass over the kept rows")

    @field_validator("steps_per_epoch")
    @classmethod
    def _positive_steps(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("steps_per_epoch must be >= 1 or 'candidates'")
        return v
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True
    eval_batch_size: int = 512
    val_metric: Literal["auto", "agreement", "query_acc"] = Field(
        "auto", description="checkpoint selection: agreement with the teacher on validation rows, or accuracy on "
                            "their query labels; auto = agreement for teacher-based methods, query_acc otherwise")
    warm_start: str | None = Field(None, description="student checkpoint or export dir to start from")
    nproc: int = Field(1, ge=1, description="training processes on this machine (`webkd distill --nproc N`): DDP, gloo "
                                            "on CPU, NCCL on CUDA (one GPU each); batch_size is the global batch, "
                                            "batch_size / nproc rows per process")

    @field_validator("method_args", mode="before")
    @classmethod
    def _keyed_by_method(cls, v: Any, info: ValidationInfo) -> Any:
        m = info.data.get("method", "kd3")
        if isinstance(v, dict):
            for k, args in v.items():
                if not isinstance(args, dict) and args is not None:
                    raise ValueError(
                        f"method_args is keyed by method name: write `method_args: {{{m}: {{{k}: {args}}}}}` "
                        f"(on the command line train.method_args.{m}.{k}={args}), not `{{{k}: {args}}}`")
            return {k: (args or {}) for k, args in v.items()}
        return v

    @property
    def args(self) -> dict[str, Any]:
        """The arguments of `method` (its block in method_args; arguments of other methods never leak)."""
        return dict(self.method_args.get(self.method) or {})


class RefineConfig(_Section):
    """PLL two-hot label refinement (`webkd refine`, selection/refine.py; methods.md §3, §7.2)."""

    encoder: str | None = Field(None, description="feature cache key of the frozen encoder; default: first teacher")
    loss: Literal["paper", "gce"] = Field("paper", description="two-hot CE [paper] or GCE q=0.7 [code]")
    q: float = Field(0.7, gt=0.0, le=1.0, description="GCE exponent")
    init: Literal["scratch", "teacher"] = Field("scratch", description="student probe init: zeros, or W_0 [code]")
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    lr_decay: float = Field(0.98, gt=0, le=1.0, description="lr multiplier per epoch")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    features: Literal["raw", "standardize"] = Field("standardize", description="feature scaling before the probe")
    label_off_class: bool = Field(False, description="also give refined labels to rows whose query is off-class")
    drop_disagree: bool = Field(False, description="no refined label where the query is outside the top-2 pair")


class PriorCorrectionConfig(_Section):
    """[project] post-hoc logit adjustment of the deployed student for the class mix of the images it
    trained on (training/prior.py): logits + tau (log target - log prior); tau 0 is off."""

    tau: float | Literal["auto"] = Field(0.0, description="a number >= 0, or auto: the value of `taus` with the "
                                                          "highest class-balanced validation agreement")
    taus: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0], description="what tau=auto tries")
    target: Literal["uniform"] | list[float] = Field("uniform", description="the deployment class shares")

    @field_validator("tau")
    @classmethod
    def _tau_nonnegative(cls, v):
        if isinstance(v, float) and v < 0:
            raise ValueError("tau must be >= 0 (0 is off), or auto")
        return v


class ExportConfig(_Section):
    prior_correction: PriorCorrectionConfig = Field(default_factory=PriorCorrectionConfig)
    onnx: bool = True
    opset: int = Field(18, ge=18, description="ONNX opset (the dynamo exporter needs >= 18)")
    atol: float = 1e-4
    int8: bool = Field(False, description="also write student.int8.onnx (onnxruntime static quantization, "
                                          "calibrated on validation images); needs export.onnx")
    int8_calibration: int = Field(256, ge=1, description="validation images the int8 calibration reads (at most)")
    license: str = Field("unknown", description="license id of the exported student in the model card metadata "
                                                "(e.g. apache-2.0); mind the teacher's and the web images' terms")

    @model_validator(mode="after")
    def _int8_needs_onnx(self) -> "ExportConfig":
        if self.int8 and not self.onnx:
            raise ValueError("export.int8=true quantizes student.onnx: set export.onnx=true too (or export.int8=false)")
        return self


class FlowsConfig(_Section):
    task_runner: Literal["local", "dask", "ray"] = Field(
        "local", description="where the curate / refresh flows run their shard tasks (ingest, features): local "
                             "(this process), dask (a Dask cluster: `address`, or a LocalCluster of n_workers), ray "
                             "(a Ray cluster at `address`, or a local one). The run directory must be on storage "
                             "every worker sees")
    address: str | None = Field(None, description="scheduler address of an existing cluster (tcp://host:8786, "
                                                  "ray://host:10001); none: a local cluster is started")
    n_workers: int = Field(2, ge=1, description="worker processes of a local Dask cluster")
    shard_size: int = Field(5000, ge=1, description="listed images (ingest) or manifest rows (features) per shard (a "
                                                    "task of its own on a task runner: each costs Prefect ~0.3-0.5 s; "
                                                    "at 100k images on 2 Dask workers, 1,000 a shard ingested at "
                                                    "1,645 img/s, 5,000 at 2,065; BENCHMARKS.md Scale)")
    curate_cron: str | None = "0 2 * * *"
    refresh_cron: str | None = "0 3 * * 1"
    timezone: str = "UTC"
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(5.0, ge=0)
    refresh_epochs: int | None = Field(
        None, ge=1, description="epochs of a refresh challenger warm-started from the champion; default train.epochs"
    )
    refresh_lr_scale: float = Field(
        0.1, gt=0.0, le=1.0, description="a warm-started challenger trains at train.lr x this (fine-tuning, not a restart)"
    )
    promote_min_delta: float = Field(
        0.0, ge=0.0, description="a challenger is promoted only above champion accuracy + this (a tie keeps the champion)"
    )


class Config(_Section):
    name: str = "webkd"
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    data: DataConfig = Field(default_factory=DataConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    teachers: list[ModelSpec] = Field(default_factory=list)
    student: ModelSpec = Field(default_factory=ModelSpec)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    flows: FlowsConfig = Field(default_factory=FlowsConfig)

    @model_validator(mode="after")
    def _unique_teacher_keys(self) -> "Config":
        keys = [t.cache_key for t in self.teachers]
        if len(set(keys)) != len(keys):
            raise ValueError(f"teacher keys must be unique, got {keys}")
        if self.decontam.test_source and not self.data.test_source:
            raise ValueError("decontam.test_source: true needs data.test_source (set it, or list the evaluation "
                             "sources in data.decontaminate)")
        return self

    @property
    def paths(self) -> "RunPaths":
        return RunPaths(Path(self.run_dir))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# loading and overrides
# --------------------------------------------------------------------------------------------
def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = (),
                 origin: str = "<dict>") -> Config:
    """Validate a raw config after overrides; relative paths of overrides resolve against the
    working directory (those of a YAML file were resolved against its folder by load_config)."""
    from webkd.pipeline.config_checks import apply_stored_preprocess, format_errors

    raw = resolve_paths(apply_overrides(raw or {}, list(overrides)), Path.cwd())
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, origin, Config)) from None
    specs = list(cfg.teachers) + [cfg.student]
    return apply_stored_preprocess(cfg, ["preprocess" in s.model_fields_set for s in specs])


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (its relative paths resolved against its folder), then apply overrides
    (their relative paths resolved against the working directory): config_io.PATH_RULE."""
    if path is None:
        return build_config({}, overrides)
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw = resolve_paths(raw, path.resolve().parent)
    return build_config(raw, overrides, origin=str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def save_resolved_config(cfg: Config) -> Path:
    """Write the resolved config into the run directory (atomically) before work starts."""
    from webkd.pipeline.storage import atomic_write_text

    p = cfg.paths.config
    atomic_write_text(p, dump_config(cfg))
    return p
