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
    class_words: list[str] | None = None   # all synonyms per class (Tiny ImageNet)


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


# --------------------------------------------------------------------------------------------
# the fashion-web scenario: a Fashion-MNIST teacher, and web images found by class-name queries
# --------------------------------------------------------------------------------------------
# clothing-dataset-small query -> Fashion-MNIST class (the data README's suggested mapping);
# hat, shorts and skirt have no counterpart and stay off-class queries.
CLOTHING_TO_FMNIST: dict[str, str | None] = {
    "t-shirt": "T-shirt/top", "pants": "Trouser", "longsleeve": "Pullover", "dress": "Dress",
    "outwear": "Coat", "shirt": "Shirt", "shoes": "Sneaker", "hat": None, "shorts": None, "skirt": None,
}
FOOTWEAR = ["Sandal", "Sneaker", "Ankle boot"]   # "shoes" photos may be any of these
# Tiny ImageNet queries a person looking for Fashion-MNIST classes would collect (issue 11, item 5),
# mapped from the class names alone, before any run: sandal, cardigan (a knitted sweater), fur coat and
# backpack name a Fashion-MNIST class; the rest are clothing-adjacent queries left off-class because the
# name alone does not pick one class (a poncho or kimono is neither clearly Coat nor Dress; Fashion-MNIST
# has no skirt, sock, hat, swimwear or tie class).
TINY_CLOTHING_TO_FMNIST: dict[str, str | None] = {
    "sandal": "Sandal", "cardigan": "Pullover", "fur coat": "Coat", "backpack": "Bag",
    "poncho": None, "kimono": None, "miniskirt": None, "sock": None, "Christmas stocking": None,
    "bow tie": None, "sombrero": None, "swimming trunks": None, "bikini": None, "apron": None,
    "academic gown": None, "military uniform": None, "vestment": None,
}


def safe_name(label: str) -> str:
    """A class name as a folder name ("T-shirt/top" -> "T-shirt_top")."""
    return label.replace("/", "_").replace("\\", "_")


@dataclass
class Scenario:
    web_dir: Path                      # folder: source, sub-folders named by web query
    test_dir: Path | None              # folder: source of the labelled test set
    classes: list[str]                 # teacher classes
    label_map: dict[str, str | None]   # query (folder name) -> class
    class_groups: list[list[str]]
    counts: dict[str, int]


def write_fashion_web(out_dir: str | Path, data_dir: str | Path | None = None, pacs_images: int = 1500,
                      clothing_fraction: float = 1.0, test_images: int | None = None, seed: int = 0,
                      write_test: bool = True, invert_fmnist: bool = True, tiny_clothing: bool = False) -> Scenario:
    """Write the fashion-web pool as real image files (idempotent: existing files are kept).

    - web/<query>/*.jpg: clothing photos (all splits; JPEG q90 of the 64 px images) under their
      own query names, plus `pacs_images` PACS images (real JPEGs, all four domains) under the
      PACS class names as off-class queries; with `tiny_clothing`, also the Tiny ImageNet images of
      the TINY_CLOTHING_TO_FMNIST queries (stored JPEG bytes) under their class names;
    - test/<class>/*.png: Fashion-MNIST test (the teacher's domain), read once at the end. With
      `invert_fmnist` the images are stored dark-on-white ("photo polarity", like the web photos),
      for models whose preprocessing inverts (see flows/demo.py).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    web = out_dir / "web"
    counts: dict[str, int] = {}
    cloth = load_clothing(data_dir)
    idx = np.arange(len(cloth.labels))
    if clothing_fraction < 1.0:
        idx = np.sort(rng.choice(idx, int(round(len(idx) * clothing_fraction)), replace=False))
    for i in idx:
        q = cloth.class_names[int(cloth.labels[i])]
        p = web / q / f"clothing_{i:05d}.jpg"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(cloth.images[i]).save(p, format="JPEG", quality=90)
        counts[q] = counts.get(q, 0) + 1
    blobs, meta = pacs_jpeg_bytes(data_dir)
    pick = np.sort(rng.choice(len(blobs), min(pacs_images, len(blobs)), replace=False))
    for i in pick:
        q = meta.class_names[int(meta.labels[i])]
        p = web / q / f"pacs_{meta.domain_names[int(meta.domains[i])]}_{i:05d}.jpg"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blobs[i])
        counts[q] = counts.get(q, 0) + 1
    label_map: dict[str, str | None] = dict(CLOTHING_TO_FMNIST)
    label_map.update({c: None for c in meta.class_names})
    if tiny_clothing:
        tblobs, tmeta = tinyimagenet_jpeg_bytes(data_dir)
        wanted = {tmeta.class_names.index(q): q for q in TINY_CLOTHING_TO_FMNIST}
        for i in np.flatnonzero(np.isin(tmeta.labels, list(wanted))):
            q = wanted[int(tmeta.labels[i])]
            p = web / safe_name(q) / f"tiny_{tmeta.domain_names[int(tmeta.labels[i])]}_{i:05d}.jpg"
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(tblobs[i])
            counts[safe_name(q)] = counts.get(safe_name(q), 0) + 1
        label_map.update(TINY_CLOTHING_TO_FMNIST)
    test_dir = None
    if write_test:
        test_dir = write_fmnist_folder(out_dir / "test", "test", test_images, seed, invert_fmnist, data_dir)
        label_map.update({safe_name(c): c for c in FMNIST_CLASSES if safe_name(c) != c})
    return Scenario(web_dir=web, test_dir=test_dir, classes=list(FMNIST_CLASSES), label_map=label_map,
                    class_groups=[list(FOOTWEAR)], counts=counts)


def write_fmnist_folder(out: str | Path, split: str = "test", n: int | None = None, seed: int = 0,
                        invert: bool = True, data_dir: str | Path | None = None) -> Path:
    """Fashion-MNIST images as PNG files in class folders (`T-shirt_top/`, ...): a labelled
    `folder:` source. `n` draws a seeded subset; `invert` stores them in photo polarity."""
    from PIL import Image

    out = Path(out)
    data = load_fashion_mnist(split, data_dir)
    idx = np.arange(len(data.labels)) if n is None else np.sort(
        np.random.default_rng(seed).choice(len(data.labels), n, replace=False))
    for i in idx:
        p = out / safe_name(FMNIST_CLASSES[int(data.labels[i])]) / f"fmnist_{split}_{i:05d}.png"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - data.images[i] if invert else data.images[i]).save(p, format="PNG")
    return out


# --------------------------------------------------------------------------------------------
# CIFAR-10 (a teacher's original data) and Tiny ImageNet (a web pool): JPEG containers
# --------------------------------------------------------------------------------------------
CIFAR10_FILE = "cifar10/cifar10_jpeg.npz"
TINYIMAGENET_FILE = "tinyimagenet/tinyimagenet_32_jpeg.npz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _decoded(container: Path, key: str, buf: np.ndarray, offsets: np.ndarray, cache: bool) -> np.ndarray:
    """Decode a JPEG container once; with `cache` the uint8 array is kept in
    .cache/decoded/<container stem>_<key>.npy (keyed by the container's size and mtime)."""
    if not cache:
        return decode_jpeg_container(buf, offsets)
    st = container.stat()
    out = PROJECT_ROOT / ".cache" / "decoded" / f"{container.stem}_{key}_{st.st_size}_{st.st_mtime_ns}.npy"
    if out.exists():
        return np.load(out)
    images = decode_jpeg_container(buf, offsets)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, images)
    os.replace(tmp, out)
    return images


def load_cifar10(split: str = "train", data_dir: str | Path | None = None, cache: bool = True) -> ImageSet:
    """CIFAR-10 from its JPEG copy (quality 75 re-encodings; see the data README section 3):
    uint8 (N, 32, 32, 3) RGB, 50,000 train / 10,000 test, the standard class order."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    path = find_file(CIFAR10_FILE, data_dir)
    z = np.load(path)
    images = _decoded(path, split, z[f"{split}_jpeg"], z[f"{split}_offsets"], cache)
    return ImageSet(images=images, labels=z[f"{split}_labels"].astype(np.int64),
                    class_names=[str(c) for c in z["class_names"]], paths=z[f"{split}_paths"])


def tinyimagenet_jpeg_bytes(data_dir: str | Path | None = None) -> tuple[list[bytes], ImageSet]:
    """Tiny ImageNet 32 px as the stored JPEG byte strings (real encoded files) plus labels;
    `class_names` are the first WordNet synonyms (the web queries), `domain_names` the wnids."""
    z = np.load(find_file(TINYIMAGENET_FILE, data_dir))
    buf, off = z["jpeg"], z["offsets"]
    blobs = [buf[off[i]:off[i + 1]].tobytes() for i in range(len(off) - 1)]
    return blobs, _tiny_meta(z, np.empty((0,)))


def _tiny_meta(z, images: np.ndarray) -> ImageSet:
    return ImageSet(images=images, labels=z["labels"].astype(np.int64), class_names=[str(c) for c in z["class_names"]],
                    split=np.array([s.decode() if isinstance(s, bytes) else str(s) for s in z["split"]]),
                    domain_names=[str(w) for w in z["wnids"]], paths=z["paths"],
                    class_words=[str(w) for w in z["class_words"]])


def load_tinyimagenet(data_dir: str | Path | None = None, cache: bool = True) -> ImageSet:
    """Tiny ImageNet (data README section 4): 60,600 photos, 202 classes x 300, bicubic 32 px,
    uint8 (N, 32, 32, 3). `class_names[labels[i]]` is image i's query; `class_words` holds all
    WordNet synonyms, `domain_names` the wnids."""
    path = find_file(TINYIMAGENET_FILE, data_dir)
    z = np.load(path)
    return _tiny_meta(z, _decoded(path, "all", z["jpeg"], z["offsets"], cache))


def pool_subset(n_total: int, size: int | None, seed: int = 0) -> np.ndarray:
    """Sorted rows of a seeded subset: the first `size` of one seeded permutation, so a smaller
    pool is always part of a larger one (None or >= n_total: every row)."""
    if size is None or size >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:size])


def write_tinyimagenet_pool(out: str | Path, size: int | None = None, seed: int = 0,
                            data_dir: str | Path | None = None) -> dict[str, int]:
    """Tiny ImageNet as a web pool of real image files: `<out>/<class name>/<wnid>_<i>.jpg` (the
    stored JPEG bytes, unchanged), the folder name being the web query. `size` draws a seeded
    subset (`pool_subset`). Idempotent: files already there are kept. Returns counts per query."""
    out = Path(out)
    blobs, meta = tinyimagenet_jpeg_bytes(data_dir)
    counts: dict[str, int] = {}
    for i in pool_subset(len(blobs), size, seed):
        k = int(meta.labels[i])
        q = safe_name(meta.class_names[k])
        p = out / q / f"{meta.domain_names[k]}_{i:05d}.jpg"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(blobs[i])
            os.replace(tmp, p)
        counts[q] = counts.get(q, 0) + 1
    return counts


def write_cifar10_folder(out: str | Path, split: str = "test", n: int | None = None, seed: int = 0,
                         data_dir: str | Path | None = None) -> Path:
    """CIFAR-10 images as their stored JPEG files in class folders (`airplane/`, ...): a labelled
    `folder:` source. `n` draws a seeded subset (`pool_subset`). Idempotent."""
    out = Path(out)
    z = np.load(find_file(CIFAR10_FILE, data_dir))
    buf, off, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"]
    names = [str(c) for c in z["class_names"]]
    for i in pool_subset(len(labels), n, seed):
        p = out / safe_name(names[int(labels[i])]) / f"cifar_{split}_{i:05d}.jpg"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(buf[off[i]:off[i + 1]].tobytes())
            os.replace(tmp, p)
    return out
