"""The fashion-web scenario, shared by `webkd demo`, bench/fashion_web.py and the tests.

- Teacher: a CNN trained here on Fashion-MNIST train (Debian package files), cached by recipe.
  Its input domain is grey 28 px, white object on black. Web photos show garments on white,
  grey or coloured backdrops, so the teacher's declared preprocessing is grey -> resize 28 ->
  |x - border median| (background subtraction) -> normalise: Fashion-MNIST images pass through
  unchanged, a photo becomes a bright object on black. The subtraction makes polarity
  irrelevant; Fashion-MNIST files written by the scenario are stored dark-on-white ("photo
  polarity") so every image file in the pipeline looks like a web image.
- Web pool: clothing photos under their query names plus PACS images as off-class queries
  (pipeline.datasets.write_fashion_web).
- Validation: a held-out slice of the web pool (by content hash); test: Fashion-MNIST test,
  read once at the end.
"""
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from webkd.pipeline import datasets
from webkd.pipeline.config import ModelSpec, PreprocessSpec, SelectionConfig, TrainConfig
from webkd.pipeline.paths import RunPaths

log = logging.getLogger(__name__)

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def cache_dir() -> Path:
    """Where trained teachers and written scenarios are kept between runs."""
    return Path(os.environ.get("WEBKD_CACHE", datasets.PROJECT_ROOT / ".cache"))


def fmnist_preprocess() -> PreprocessSpec:
    """Grey 28 px, background subtracted (|x - border median|): Fashion-MNIST (black border) is
    unchanged, a photo on any backdrop becomes a bright object on black."""
    return PreprocessSpec(size=28, channels=1, mean=[FMNIST_MEAN], std=[FMNIST_STD], background="border")


def teacher_spec(weights: str | None = None, width: int = 32) -> ModelSpec:
    return ModelSpec(key="fmnist_teacher", library="project", name="cnn_fmnist", kwargs={"width": width},
                     weights=weights, preprocess=fmnist_preprocess())


def student_spec(name: str = "cnn_small", **kwargs: Any) -> ModelSpec:
    return ModelSpec(key="student", library="project", name=name, kwargs=kwargs, preprocess=fmnist_preprocess())


def photo_polarity(grey: np.ndarray) -> np.ndarray:
    """Fashion-MNIST (N, 28, 28) white-on-black -> (N, 28, 28, 3) RGB dark-on-white."""
    inv = 255 - grey
    return np.repeat(inv[..., None], 3, axis=-1)


def train_fmnist_teacher(out: Path | None = None, epochs: int = 4, width: int = 32, seed: int = 0,
                         data_dir: str | Path | None = None, val_size: int = 5000,
                         device: str = "auto") -> tuple[Path, dict[str, float]]:
    """Train (or reuse) the Fashion-MNIST teacher; returns (safetensors path, metrics).

    Validation: the last `val_size` images of a seeded shuffle of FMNIST train; the test split
    is read once after training for the report.
    """
    import torch

    from webkd.pipeline.features import resolve_device
    from webkd.training.loop import accuracy, fit, load_checkpoint, predict_logits
    from webkd.training.pool import Pool
    from webkd.training.methods import build_method
    from webkd.training.models import build_model, save_weights

    tag = f"fmnist_cnn_w{width}_e{epochs}_s{seed}_v{val_size}"
    out = Path(out or cache_dir() / "teachers" / tag)
    weights, metrics_path = out / "teacher.safetensors", out / "teacher_metrics.json"
    if weights.exists() and metrics_path.exists():
        return weights, json.loads(metrics_path.read_text())

    train = datasets.load_fashion_mnist("train", data_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train.labels))
    split = np.full(len(order), "train", dtype=object)
    split[order[-val_size:]] = "val"
    n = len(train.labels)
    pool = Pool(pixels=photo_polarity(train.images), ids=[f"fmnist-train-{i}" for i in range(n)], split=split,
                status=np.full(n, "ok", dtype=object), labels=train.labels.astype(np.int64),
                web_labels=[train.class_names[k] for k in train.labels], web_class=train.labels.astype(np.int64),
                val_labels=np.where(split == "val", train.labels, -1).astype(np.int64))
    spec = teacher_spec(None, width)
    torch.manual_seed(seed)
    model = build_model(spec, num_classes=10)
    method = build_method("ce")
    cfg = TrainConfig(method="ce", epochs=epochs, batch_size=128, lr=0.05, crop_scale=(0.8, 1.0), hflip=True)
    dev = resolve_device(device)
    run = RunPaths(out / "run")
    res = fit(model, [], method, pool, cfg, SelectionConfig(mode="none"), run, seed=seed, device=dev,
              run_fingerprint=tag)
    model.load_state_dict(load_checkpoint(run.best_checkpoint, dev)["student"])
    model.eval()
    test = datasets.load_fashion_mnist("test", data_dir)
    test_acc = accuracy(predict_logits(lambda x: model(x).logits, photo_polarity(test.images),
                                       np.arange(len(test.labels)), dev), test.labels)
    metrics = {"val_acc": res.best_val,   # CE: selected on validation accuracy
               "test_acc": test_acc, "best_epoch": res.best_epoch,
               "parameters": sum(p.numel() for p in model.parameters())}
    save_weights(model.cpu(), weights)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    log.info("Fashion-MNIST teacher: val %.4f test %.4f -> %s", res.best_val, test_acc, weights)
    return weights, metrics


# --------------------------------------------------------------------------------------------
# `webkd demo`
# --------------------------------------------------------------------------------------------
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_TEACHER = ASSETS / "fmnist_teacher.safetensors"
CONFIG = Path(__file__).resolve().parent / "configs" / "fashion_web.yaml"
# what the demo table shows of each student (DistillResult attributes, distill_flow result keys)
ROW_KEYS = ("test_acc", "val_acc", "val_agreement", "parameters", "kept", "candidates")


def check_data(data_dir: str | Path | None = None) -> list[str]:
    """What is missing for the demo, as instructions (empty when everything is there)."""
    problems = []
    for rel in ("clothing_small/clothing_small.npz", "pacs/pacs_64_jpeg.npz"):
        try:
            datasets.find_file(rel, data_dir)
        except datasets.DataNotFound as exc:
            problems.append(str(exc))
    try:
        datasets.fashion_mnist_dir(data_dir)
    except datasets.DataNotFound as exc:
        problems.append(str(exc))
    return problems


def run_demo(data_dir: str | Path | None = None, out: str | Path = "runs/demo", epochs: int = 8,
             pacs_images: int = 1500, train_teacher: bool = False, baseline: bool = True,
             use_flows: bool = True) -> dict[str, Any]:
    """The fashion-web scenario end to end: write the web pool and the test set as image files,
    curate (Prefect flow), distill a KD^3 student (Prefect flow) and a vanilla-KD baseline with the
    same budget, and return the numbers and paths the CLI prints."""
    import time

    from webkd.pipeline.config import load_config

    t0 = time.time()
    scen = datasets.write_fashion_web(cache_dir() / "fashion_web", data_dir=data_dir, pacs_images=pacs_images)
    if train_teacher:
        weights, teacher_metrics = train_fmnist_teacher(data_dir=data_dir)
    else:
        weights = DEMO_TEACHER
        teacher_metrics = json.loads((ASSETS / "fmnist_teacher.json").read_text())["metrics"]
    out = Path(out)
    common = [f"data.sources=['folder:{scen.web_dir}']", f"data.test_source=folder:{scen.test_dir}",
              f"teachers.0.weights={weights}", f"train.epochs={epochs}", "data.image_size=28"]
    kd3_over = common + [f"run_dir={out / 'kd3'}"]
    kd_over = common + [f"run_dir={out / 'kd_baseline'}", "train.method=kd", "selection.mode=none",
                        "train.method_args={}", "export.prior_correction.tau=0"]   # plain vanilla KD
    cfg = load_config(CONFIG, kd3_over)
    if use_flows:
        from webkd.flows.curate import curate_flow, run_flow
        from webkd.flows.distill import distill_flow

        run_flow(curate_flow, str(CONFIG), kd3_over)
        kd3 = run_flow(distill_flow, str(CONFIG), kd3_over)
        kd3_row = {k: kd3[k] for k in ROW_KEYS}
        gallery, card = kd3["gallery"], kd3["model_card"]
    else:
        from webkd.flows.stages import curate as curate_stages
        from webkd.flows.stages import distill as distill_stages

        curated = curate_stages.curate(cfg)
        res = distill_stages.distill(cfg)
        kd3_row = {k: getattr(res, k) for k in ROW_KEYS}
        gallery, card = str(curated["gallery"]), str(res.model_card)
    kd3_row["label"] = describe_student(cfg)
    rows = {"kd3": kd3_row}
    if baseline:
        from webkd.flows.stages import curate as curate_stages
        from webkd.flows.stages import distill as distill_stages

        res = distill_stages.distill(load_config(CONFIG, kd_over))
        rows["kd"] = {k: getattr(res, k) for k in ROW_KEYS}
    from webkd.pipeline.paths import RunPaths
    from webkd.selection.counts import count_run, query_shares_line

    counts = count_run(RunPaths(out / "kd3"))
    return {"teacher": teacher_metrics, "rows": rows, "gallery": gallery, "model_card": card,
            "curation": query_shares_line(counts.in_class, counts.off_class),
            "pool": sum(scen.counts.values()), "epochs": epochs, "seconds": time.time() - t0,
            "run_dir": str(out)}


def describe_student(cfg) -> str:
    """A table label for the configured student recipe, e.g. 'KD^3 + logit KD, no instance selection'."""
    name = {"kd3": "KD^3", "kd": "vanilla KD", "ce": "CE"}.get(cfg.train.method, cfg.train.method)
    if cfg.train.method == "kd3" and cfg.train.args.get("kd_weight"):
        name += " + logit KD"
    sel = {"none": "no instance selection", "teacher": "teacher-only selection", "kd3": "KD^3 instance selection",
           "soft": "soft relevance weights", "balanced": "class-balanced relevance budgets",
           "random": "a random subset"}.get(cfg.selection.mode, f"selection {cfg.selection.mode}")
    pc = cfg.export.prior_correction.tau
    fix = f", prior correction (tau {pc})" if pc != 0 else ""
    return f"student, {name}, {sel}{fix} (curated pool)"


def format_demo(result: dict[str, Any]) -> str:
    from webkd.pipeline.report import pct

    t = result["teacher"]
    lines = [f"fashion-web demo: {result['pool']} web images (clothing photos + PACS off-class), "
             f"{result['epochs']} epochs, {result['seconds'] / 60:.1f} min", "",
             "| model | parameters | Fashion-MNIST test | web val: query acc | web val: agreement with teacher | kept / pool |",
             "|---|---|---|---|---|---|",
             f"| teacher (cnn_fmnist, trained on Fashion-MNIST) | {t.get('parameters', 0):,} | {pct(t.get('test_acc'), 1)} | - | - | - |"]
    names = {"kd": "student, vanilla KD on the whole web pool", "kd3": "student, KD^3 (curated, distilled)"}
    for key in ("kd", "kd3"):
        r = result["rows"].get(key)
        if r:
            lines.append(f"| {r.get('label') or names[key]} | {r['parameters']:,} | {pct(r['test_acc'], 1)} | {pct(r.get('val_acc'), 1)} | "
                         f"{pct(r.get('val_agreement'), 1)} | {r['kept']} / {r['candidates']} |")
    if result.get("curation"):
        lines += ["", f"curation (last epoch, training candidates): {result['curation']}"]
    lines += ["", f"gallery:    {result['gallery']}", f"model card: {result['model_card']}"]
    return "\n".join(lines)
