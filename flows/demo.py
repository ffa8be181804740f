"""The fashion-web scenario, shared by `webkd demo`, bench/fashion_web.py and the tests.

- Teacher: a CNN trained here on Fashion-MNIST train (Debian package files), cached by recipe.
  Its input domain is grey 28 px, white object on black. Web photos show dark-ish objects on
  light backgrounds, so the teacher's declared preprocessing is grey -> resize 28 -> invert ->
  normalise, and every image the pipeline handles is in "photo polarity": Fashion-MNIST images
  (teacher training, the test set) are stored inverted, and the model's own inversion brings
  them back to white-on-black.
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

from pipeline import datasets
from pipeline.config import Config, ModelSpec, PreprocessSpec, RunPaths, SelectionConfig, TrainConfig, build_config

log = logging.getLogger(__name__)

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def cache_dir() -> Path:
    """Where trained teachers and written scenarios are kept between runs."""
    return Path(os.environ.get("WEBKD_CACHE", datasets.PROJECT_ROOT / ".cache"))


def fmnist_preprocess() -> PreprocessSpec:
    return PreprocessSpec(size=28, channels=1, mean=[FMNIST_MEAN], std=[FMNIST_STD], invert=True)


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

    from pipeline.features import resolve_device
    from training.loop import Pool, accuracy, fit, load_checkpoint, predict_logits
    from training.methods import build_method
    from training.models import build_model, save_weights

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
    metrics = {"val_acc": res.best_val,   # CE: selected on validation accuracy "test_acc": test_acc, "best_epoch": res.best_epoch,
               "parameters": sum(p.numel() for p in model.parameters())}
    save_weights(model.cpu(), weights)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    log.info("Fashion-MNIST teacher: val %.4f test %.4f -> %s", res.best_val, test_acc, weights)
    return weights, metrics
