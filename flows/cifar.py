"""The cifar-tinyimagenet scenario (issue 11), shared by bench/cifar_tinyimagenet.py and the tests.

- Teacher: a CIFAR-style ResNet (`resnet_narrow` width 16: the ResNet-18 shape at a quarter of
  its width, 0.7M parameters) trained here on CIFAR-10 train (the JPEG copy), cached by recipe in
  .cache/teachers/, and shipped in flows/assets/cifar_teacher.safetensors with a sidecar
  `cifar_teacher.json` (preprocess, arch, recipe, metrics), as the fashion teacher is.
- Web pool: Tiny ImageNet photos in folders named by their class name (the query); the queries
  mapped to CIFAR-10 classes are written down in flows/configs/cifar_tinyimagenet.yaml.
- Validation: a held-out slice of the pool; test: CIFAR-10 test, read once per run.
"""
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from webkd.flows.demo import cache_dir
from webkd.pipeline import datasets
from webkd.pipeline.config import ModelSpec, PreprocessSpec, SelectionConfig, TrainConfig
from webkd.pipeline.paths import RunPaths

log = logging.getLogger(__name__)

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_TEACHER = ASSETS / "cifar_teacher.safetensors"
SHIPPED_SIDECAR = ASSETS / "cifar_teacher.json"
CONFIG = Path(__file__).resolve().parent / "configs" / "cifar_tinyimagenet.yaml"

# The teacher recipe (CE on CIFAR-10 train; validation: the last `val_size` of a seeded shuffle
# of train; SGD + nesterov, cosine, random-resized crop + flip). ~2.5 h on one CPU thread at
# ~130 img/s, minutes on a GPU; expected CIFAR-10 test accuracy around 90% (not yet measured).
TEACHER_RECIPE: dict[str, Any] = {"arch": "resnet_narrow", "width": 16, "epochs": 30, "batch_size": 128,
                                  "lr": 0.1, "weight_decay": 5e-4, "crop_scale": [0.5, 1.0], "hflip": True,
                                  "schedule": "cosine", "val_size": 5000, "train_size": None, "seed": 0}


def cifar_preprocess() -> PreprocessSpec:
    return PreprocessSpec(size=32, channels=3, mean=list(CIFAR_MEAN), std=list(CIFAR_STD))


def teacher_spec(weights: str | None = None, width: int = 16) -> ModelSpec:
    return ModelSpec(key="cifar_teacher", library="project", name="resnet_narrow", kwargs={"width": width},
                     weights=weights, preprocess=cifar_preprocess())


def recipe_tag(recipe: dict[str, Any]) -> str:
    r = recipe
    return (f"cifar_{r['arch']}_w{r['width']}_e{r['epochs']}_b{r['batch_size']}_lr{r['lr']}_s{r['seed']}"
            f"_v{r['val_size']}_n{r['train_size'] or 'all'}")


def train_cifar_teacher(recipe: dict[str, Any] | None = None, out: Path | None = None,
                        data_dir: str | Path | None = None, device: str = "auto",
                        test_size: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse, cached by recipe) the CIFAR-10 teacher; returns (safetensors, metrics).

    `recipe` overrides TEACHER_RECIPE keys (`train_size` draws a seeded subset of train, for
    smoke tests). Checkpoints are chosen on validation accuracy; CIFAR-10 test (or a seeded
    `test_size` subset of it) is read once after training."""
    import torch

    from webkd.pipeline.features import resolve_device
    from webkd.training.loop import accuracy, fit, load_checkpoint, predict_logits
    from webkd.training.methods import build_method
    from webkd.training.models import build_model, save_weights
    from webkd.training.pool import Pool

    r = {**TEACHER_RECIPE, **(recipe or {})}
    unknown = sorted(set(r) - set(TEACHER_RECIPE))
    if unknown:
        raise ValueError(f"unknown teacher recipe keys {unknown}; valid: {sorted(TEACHER_RECIPE)}")
    tag = recipe_tag(r) + (f"_t{test_size}" if test_size else "")
    out = Path(out or cache_dir() / "teachers" / tag)
    weights, metrics_path = out / "teacher.safetensors", out / "teacher_metrics.json"
    if weights.exists() and metrics_path.exists():
        return weights, json.loads(metrics_path.read_text())

    train = datasets.load_cifar10("train", data_dir)
    rows = datasets.pool_subset(len(train.labels), r["train_size"], r["seed"])
    images, labels = train.images[rows], train.labels[rows]
    n = len(labels)
    order = np.random.default_rng(r["seed"]).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[-min(r["val_size"], n // 5):]] = "val"
    pool = Pool(pixels=images, ids=[f"cifar-train-{i}" for i in rows], split=split,
                status=np.full(n, "ok", dtype=object), labels=labels, web_labels=[train.class_names[k] for k in labels],
                web_class=labels.copy(), val_labels=np.where(split == "val", labels, -1).astype(np.int64))
    torch.manual_seed(r["seed"])
    model = build_model(teacher_spec(None, r["width"]), num_classes=10)
    cfg = TrainConfig(method="ce", epochs=r["epochs"], batch_size=r["batch_size"], lr=r["lr"],
                      weight_decay=r["weight_decay"], schedule=r["schedule"], crop_scale=tuple(r["crop_scale"]),
                      hflip=r["hflip"])
    dev = resolve_device(device)
    run = RunPaths(out / "run")
    res = fit(model, [], build_method("ce"), pool, cfg, SelectionConfig(mode="none"), run, seed=r["seed"],
              device=dev, run_fingerprint=tag)
    model.load_state_dict(load_checkpoint(run.best_checkpoint, dev)["student"])
    model.eval()
    test = datasets.load_cifar10("test", data_dir)
    t_rows = datasets.pool_subset(len(test.labels), test_size, r["seed"])
    test_acc = accuracy(predict_logits(lambda x: model(x).logits, test.images, t_rows, dev), test.labels[t_rows])
    metrics = {"val_acc": res.best_val, "test_acc": test_acc, "best_epoch": res.best_epoch,
               "parameters": sum(p.numel() for p in model.parameters()), "minutes": res.seconds / 60,
               "train_images": int((split == "train").sum()), "val_images": int((split == "val").sum()),
               "test_images": int(len(t_rows))}
    save_weights(model.cpu(), weights)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    log.info("CIFAR-10 teacher: val %.4f test %.4f -> %s", res.best_val, test_acc, weights)
    return weights, metrics


def ship_teacher(weights: Path, metrics: dict[str, Any], recipe: dict[str, Any] | None = None,
                 assets: Path = ASSETS) -> Path:
    """Copy a trained teacher into flows/assets/ with its sidecar (preprocess, arch, recipe, metrics)."""
    from webkd.pipeline.storage import atomic_write_json, sha256_file

    r = {**TEACHER_RECIPE, **(recipe or {})}
    assets.mkdir(parents=True, exist_ok=True)
    dst = assets / SHIPPED_TEACHER.name
    shutil.copy2(weights, dst)
    spec = teacher_spec(None, r["width"])
    atomic_write_json(assets / SHIPPED_SIDECAR.name, {
        "what": "CIFAR-10 teacher for the cifar-tinyimagenet benchmark (issue 11)",
        "made_by": f"flows.cifar.train_cifar_teacher(recipe={r})",
        "reproduce": "bench/cifar_tinyimagenet.py --train-teacher --ship-teacher (cached in .cache/teachers/)",
        "arch": {"library": spec.library, "name": spec.name, "kwargs": spec.kwargs},
        "preprocess": spec.preprocess.model_dump(include={"size", "channels", "mean", "std"}),
        "data": "CIFAR-10 train, JPEG copy (../shared/data/cifar10, README section 3): seeded train / validation "
                "split; CIFAR-10 test read once",
        "recipe": r, "metrics": metrics, "sha256": sha256_file(dst)})
    return dst


def shipped_teacher() -> tuple[Path, dict[str, Any]] | None:
    """(weights, sidecar) of the shipped teacher, or None when it has not been shipped yet."""
    if SHIPPED_TEACHER.exists() and SHIPPED_SIDECAR.exists():
        return SHIPPED_TEACHER, json.loads(SHIPPED_SIDECAR.read_text())
    return None
