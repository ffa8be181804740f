"""Locating and loading the real image sets the demo, tests and benchmarks use.

Lookup order for the shared image data: an explicit `data_dir`, the `WEBKD_DATA_DIR`
environment variable, `../shared/data` beside the project, `./shared/data`. Fashion-MNIST is
read from the same folders (`fashion-mnist/`) or the Debian package path. When something is
missing the error says exactly what to install or where to put it.
"""
from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DataNotFound(FileNotFoundError):
    """A data set is missing; the message says how to get it."""


def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    cands = []
    if data_dir:
        cands.append(Path(data_dir))
    if os.environ.get("WEBKD_DATA_DIR"):
        cands.append(Path(os.environ["WEBKD_DATA_DIR"]))
    cands += [PROJECT_ROOT.parent / "shared" / "data", PROJECT_ROOT / "shared" / "data",
              Path.cwd() / "shared" / "data"]
    seen, out = set(), []
    for c in cands:
        r = c.resolve()
        if r not in seen:
            seen.add(r)
            out.append(c)
    return out


def find_file(rel: str, data_dir: str | Path | None = None) -> Path:
    for d in data_dirs(data_dir):
        p = d / rel
        if p.exists():
            return p
    tried = ", ".join(str(d) for d in data_dirs(data_dir))
    raise DataNotFound(
        f"{rel} not found (looked in: {tried}). Put the shared image data folder there or set "
        f"WEBKD_DATA_DIR / data_dir to the folder that holds {rel}."
    )


@dataclass
class ImageSet:
    images: np.ndarray          # uint8 (N, H, W, 3) RGB, or (N, H, W) grey
    labels: np.ndarray          # int64 (N,)
    class_names: list[str]
    split: np.ndarray | None = None    # bytes/str per image (clothing: train/validation/test)
    domains: np.ndarray | None = None  # int per image (PACS)
    domain_names: list[str] | None = None
    paths: np.ndarray | None = None


def load_clothing(data_dir: str | Path | None = None, gray28: bool = False) -> ImageSet:
    """clothing-dataset-small: 3,781 real photos, 10 classes, 64x64 RGB (or 28x28 grey)."""
    z = np.load(find_file("clothing_small/clothing_small.npz", data_dir))
    return ImageSet(
        images=z["gray28"] if gray28 else z["images64"], labels=z["labels"],
        class_names=[str(c) for c in z["class_names"]],
        split=np.array([s.decode() for s in z["split"]]), paths=z["paths"],
    )


def decode_jpeg_container(buf: np.ndarray, offsets: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    from PIL import Image

    idx = np.arange(len(offsets) - 1) if idx is None else idx
    return np.stack([np.asarray(Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                     for i in idx])


def pacs_jpeg_bytes(data_dir: str | Path | None = None) -> tuple[list[bytes], ImageSet]:
    """PACS 64 px as the original JPEG byte strings (real encoded files), plus labels/domains."""
    z = np.load(find_file("pacs/pacs_64_jpeg.npz", data_dir))
    buf, off = z["jpeg"], z["offsets"]
    blobs = [buf[off[i]:off[i + 1]].tobytes() for i in range(len(off) - 1)]
    meta = ImageSet(images=np.empty((0,)), labels=z["labels"], class_names=[str(c) for c in z["class_names"]],
                    domains=z["domains"], domain_names=[str(d) for d in z["domain_names"]], paths=z["paths"])
    return blobs, meta


def load_pacs(data_dir: str | Path | None = None, size: int = 32) -> ImageSet:
    """PACS: 4 domains x 7 classes; 32 px arrays, or 64 px decoded from the JPEG container."""
    if size == 32:
        z = np.load(find_file("pacs/pacs_32.npz", data_dir))
        images = z["images"]
    elif size == 64:
        z = np.load(find_file("pacs/pacs_64_jpeg.npz", data_dir))
        images = decode_jpeg_container(z["jpeg"], z["offsets"])
    else:
        raise ValueError("PACS is stored at 32 or 64 px")
    return ImageSet(images=images, labels=z["labels"], class_names=[str(c) for c in z["class_names"]],
                    domains=z["domains"], domain_names=[str(d) for d in z["domain_names"]], paths=z["paths"])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir(data_dir: str | Path | None = None) -> Path:
    cands = [d / "fashion-mnist" for d in data_dirs(data_dir)] + [DEBIAN_FMNIST]
    if data_dir:
        cands.insert(0, Path(data_dir))
    for c in cands:
        if (c / "t10k-images-idx3-ubyte.gz").exists():
            return c
    raise DataNotFound(
        "Fashion-MNIST not found. On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` "
        f"(installs {DEBIAN_FMNIST}). Elsewhere download the four *-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into "
        f"{data_dirs(data_dir)[0] / 'fashion-mnist'}."
    )


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None) -> ImageSet:
    """Fashion-MNIST (grey 28x28, white object on black) from the Debian package files."""
    d = fashion_mnist_dir(data_dir)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return ImageSet(images=images, labels=labels, class_names=list(FMNIST_CLASSES))
