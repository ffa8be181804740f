"""Decontamination (issue 14 part 3): precision / recall of the three match methods on real near
duplicates, the thresholds chosen from them, and how many web-pool images are flagged against a
benchmark's test set.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/decontam.py [--eval 800] [--neg 4000]
        [--tiny-subset N] [--no-counts]

1. Precision / recall. For CIFAR-10 test (32 px), clothing photos (64 px) and PACS (64 px JPEG),
   a seeded `--eval` images are the evaluation set and `--neg` other images of the same set are
   distinct negatives (hard ones: same domain, same backgrounds). Each evaluation image is copied
   by a transform (resize down / up, centre crop 90 / 80 %, JPEG q50 / q20, crop + resize + JPEG)
   at its own resolution; copies, negatives and evaluation images then pass through the pixel
   cache a run uses (32 px squash, Lanczos, `pipeline.features.fit_square`). Per method and
   threshold: recall = share of copies flagged, FPR = share of negatives flagged, precision =
   flagged copies / all flagged with one copy per evaluation image plus the negatives in the pool.
   Embeddings: the shipped CIFAR-10 teacher (flows/assets/cifar_teacher.safetensors) for all three.
   Chosen threshold per method: the loosest with FPR <= 0.1 % on every set.
2. Counts at the chosen thresholds: the Tiny ImageNet pool (60,600 images, the files
   `pipeline.datasets.write_tinyimagenet_pool` writes) against CIFAR-10 test (CIFAR teacher), and
   the fashion-web pool (clothing photos + 1,500 PACS images, `write_fashion_web`'s files) against
   Fashion-MNIST test as the demo stores it (inverted PNGs; Fashion-MNIST teacher). A contact sheet
   of flagged pairs goes to bench/results/decontam_pairs_*.png for a look by eye.

Single-threaded by design; run it alone (not beside other benchmarks). Results:
bench/results/decontam.json.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from PIL import Image  # noqa: E402

from webkd.pipeline import datasets  # noqa: E402
from webkd.pipeline.config import DecontamConfig, load_config  # noqa: E402
from webkd.pipeline.decontam import EvalSet, embedding_nearest, find_eval_duplicates, phash_nearest  # noqa: E402
from webkd.pipeline.features import fit_square  # noqa: E402
from webkd.pipeline.storage import atomic_write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BITS = list(range(0, 13))
COSINES = [0.90, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995]
MAX_FPR = 0.001
CROPS = DecontamConfig().phash_crops


def _jpeg(img: Image.Image, q: int) -> Image.Image:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=q)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB")


def _crop(img: Image.Image, share: float) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * share), round(h * share)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def _scale(img: Image.Image, f: float) -> Image.Image:
    return img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.Resampling.BICUBIC)


TRANSFORMS = {
    "resize_0.6": lambda im: _scale(im, 0.6),
    "upscale_2x": lambda im: _scale(im, 2.0),
    "crop_90": lambda im: _crop(im, 0.9),
    "crop_80": lambda im: _crop(im, 0.8),
    "jpeg_q50": lambda im: _jpeg(im, 50),
    "jpeg_q20": lambda im: _jpeg(im, 20),
    "crop90_resize0.75_q60": lambda im: _jpeg(_scale(_crop(im, 0.9), 0.75), 60),
}


def cache(images) -> np.ndarray:
    """What a run's pixel cache holds: each image squashed to 32 px with Lanczos."""
    return np.stack([fit_square(im if isinstance(im, Image.Image) else Image.fromarray(im).convert("RGB"), 32)
                     for im in images])


def teacher(config: str):
    from webkd.training.models import build_model, freeze

    cfg = load_config(ROOT / "flows" / "configs" / config)
    spec = cfg.teachers[0]
    return freeze(build_model(spec, num_classes=len(cfg.data.classes), class_names=cfg.data.classes))


def embed(model, pix: np.ndarray, batch: int = 512) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(pix), batch):
            x = torch.from_numpy(np.array(pix[i:i + batch])).permute(0, 3, 1, 2).float() / 255
            out.append(model(x).embedding.float().numpy())
    return np.concatenate(out)


VERIFY = [-1.0, 0.8, 0.85, 0.9, 0.95]      # thumbnail cosine behind a pHash match (-1: no check)


def phash_hits(eval_pix: np.ndarray, pool_pix: np.ndarray) -> dict[tuple[int, float], np.ndarray]:
    """(bits, verify) -> (N,) bool: pool images matched by pHash (the product's code path)."""
    d, _, cos = phash_nearest(eval_pix, pool_pix, CROPS)
    return {(b, v): (d <= b) & (cos >= v) for b in BITS for v in VERIFY}


# --------------------------------------------------------------------------------------------
def measure_set(name: str, images: list, n_eval: int, n_neg: int, model, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    ev, neg = order[:n_eval], order[n_eval:n_eval + n_neg]
    to_img = (lambda a: a if isinstance(a, Image.Image) else Image.fromarray(a).convert("RGB"))
    E = cache([to_img(images[i]) for i in ev])
    N = cache([to_img(images[i]) for i in neg])
    e_emb, n_emb = embed(model, E), embed(model, N)
    nhit = phash_hits(E, N)
    out = {"eval": len(ev), "negatives": len(neg), "fpr": {}, "transforms": {}}
    out["fpr"]["phash"] = {f"{b}|{v}": float(h.mean()) for (b, v), h in nhit.items()}
    per = {}
    for tname, f in TRANSFORMS.items():
        P = cache([f(to_img(images[i])) for i in ev])
        phit = phash_hits(E, P)
        pool_emb = np.concatenate([n_emb, embed(model, P)])      # centred on this pool's mean
        cos, j = embedding_nearest(pool_emb, e_emb)
        ncos, pcos = cos[:len(neg)], cos[len(neg):]
        per[tname] = (phit, nhit, pcos, ncos)
        out["transforms"][tname] = {
            "phash_recall": {f"{b}|{v}": float(h.mean()) for (b, v), h in phit.items()},
            "embedding_recall": {c: float((pcos >= c).mean()) for c in COSINES},
            "embedding_fpr": {c: float((ncos >= c).mean()) for c in COSINES},
        }
    # the embedding FPR depends a little on the pool mean (centring); report the worst over transforms
    out["fpr"]["embedding"] = {c: max(t["embedding_fpr"][c] for t in out["transforms"].values()) for c in COSINES}
    out["_raw"] = per
    print(f"[{name}] {len(ev)} evaluation images, {len(neg)} distinct negatives", flush=True)
    return out


def choose(sets: dict) -> dict:
    """pHash: among (bits, verify) with FPR <= MAX_FPR on every set, the highest mean recall (over
    sets and transforms; ties: fewer bits, stricter check). Embedding: the loosest such cosine."""
    def recall(key: str) -> float:
        return float(np.mean([t["phash_recall"][key] for s in sets.values() for t in s["transforms"].values()]))
    ok = [(b, v) for b in BITS for v in VERIFY if all(s["fpr"]["phash"][f"{b}|{v}"] <= MAX_FPR for s in sets.values())]
    bits, verify = max(ok, key=lambda bv: (recall(f"{bv[0]}|{bv[1]}"), -bv[0], bv[1])) if ok else (0, 0.95)
    cos = min([c for c in COSINES if all(s["fpr"]["embedding"][c] <= MAX_FPR for s in sets.values())], default=1.0)
    return {"phash_max_bits": bits, "phash_verify": verify, "embedding_threshold": cos,
            "rule": f"FPR <= {MAX_FPR:.1%} on every set; pHash: highest mean recall, embedding: loosest"}


def union_table(sets: dict, chosen: dict) -> dict:
    """Precision / recall of the union of phash and embedding at the chosen thresholds."""
    out = {}
    for name, s in sets.items():
        out[name] = {}
        key = (chosen["phash_max_bits"], chosen["phash_verify"])
        for tname, (phit, nhit, pcos, ncos) in s["_raw"].items():
            tp = phit[key] | (pcos >= chosen["embedding_threshold"])
            fp_rate = float((nhit[key] | (ncos >= chosen["embedding_threshold"])).mean())
            fp = fp_rate * s["negatives"]
            out[name][tname] = {"recall": float(tp.mean()), "precision": float(tp.sum() / max(tp.sum() + fp, 1e-9)),
                                "false_flags_per_1000": 1000 * fp_rate}
    return out


def print_tables(sets: dict, chosen: dict, union: dict) -> None:
    v = chosen["phash_verify"]
    show = [(b, -1.0) for b in (4, 6, 8)] + [(b, v) for b in (4, 6, 8, 10, 12)]
    show_cos = [0.95, 0.97, 0.98, 0.99, 0.995]
    for name, s in sets.items():
        print(f"\n## {name}: phash recall per transform (max bits / thumbnail check); FPR on {s['negatives']} "
              "distinct images")
        print("| transform | " + " | ".join(f"<= {b} / {'off' if c < 0 else c}" for b, c in show) + " |")
        print("|---|" + "---:|" * len(show))
        print("| FPR (negatives) | " + " | ".join(f"{100 * s['fpr']['phash'][f'{b}|{c}']:.2f}%" for b, c in show) + " |")
        for t, r in s["transforms"].items():
            print(f"| {t} | " + " | ".join(f"{100 * r['phash_recall'][f'{b}|{c}']:.1f}%" for b, c in show) + " |")
        print(f"\n## {name}: embedding cosine (CIFAR teacher) recall per transform")
        print("| transform | " + " | ".join(f">= {c}" for c in show_cos) + " |")
        print("|---|" + "---:|" * len(show_cos))
        print("| FPR (negatives) | " + " | ".join(f"{100 * s['fpr']['embedding'][c]:.2f}%" for c in show_cos) + " |")
        for t, r in s["transforms"].items():
            print(f"| {t} | " + " | ".join(f"{100 * r['embedding_recall'][c]:.1f}%" for c in show_cos) + " |")
    print(f"\nchosen: phash <= {chosen['phash_max_bits']} bits with thumbnail cosine >= {chosen['phash_verify']}, "
          f"embedding >= {chosen['embedding_threshold']} "
          f"({chosen['rule']})")
    print("\n## union at the chosen thresholds: precision / recall (one copy per evaluation image + the negatives)")
    names = list(union)
    print("| transform | " + " | ".join(f"{n} P / R" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for t in TRANSFORMS:
        print(f"| {t} | " + " | ".join(f"{100 * union[n][t]['precision']:.1f} / {100 * union[n][t]['recall']:.1f}"
                                      for n in names) + " |")


# --------------------------------------------------------------------------------------------
def contact_sheet(path: Path, pool_pix: np.ndarray, eval_pix: np.ndarray, pairs: list[tuple[int, int]],
                  n: int = 40) -> None:
    """Pairs (pool | eval) side by side, 4 pairs a row, 2x magnified."""
    pairs = pairs[:n]
    if not pairs:
        return
    cols, s = 4, 64
    rows = (len(pairs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (2 * s + 8), rows * (s + 8)), (255, 255, 255))
    for k, (p, e) in enumerate(pairs):
        x, y = (k % cols) * (2 * s + 8), (k // cols) * (s + 8)
        sheet.paste(Image.fromarray(np.asarray(pool_pix[p])).resize((s, s), Image.Resampling.NEAREST), (x, y))
        sheet.paste(Image.fromarray(np.asarray(eval_pix[e])).resize((s, s), Image.Resampling.NEAREST), (x + s, y))
    sheet.save(path)


def count(name: str, pool_ids: list[str], pool_pix: np.ndarray, pool_emb: np.ndarray, ev: EvalSet,
          cfg: DecontamConfig) -> dict:
    t0 = time.perf_counter()
    m = find_eval_duplicates(pool_ids, pool_pix, pool_emb, [ev], cfg)
    flagged = m.flagged()
    res = {"pool": len(pool_ids), "eval": len(ev.ids), "flagged": int(flagged.sum()),
           "by_method": {k: int((r >= 0).sum()) for k, r in m.eval_row.items()},
           "settings": cfg.model_dump(mode="json"), "seconds": round(time.perf_counter() - t0, 1)}
    pairs = []
    for k in ("exact", "phash", "embedding"):
        if k in m.eval_row:
            rows = np.flatnonzero(m.eval_row[k] >= 0)
            rows = rows[np.argsort(-m.similarity[k][rows], kind="stable")]
            pairs += [(int(r), int(m.eval_row[k][r])) for r in rows if (int(r), int(m.eval_row[k][r])) not in pairs]
    sheet = RESULTS / f"decontam_pairs_{name}.png"
    contact_sheet(sheet, pool_pix, ev.pixels, pairs)
    res["contact_sheet"] = str(sheet.relative_to(ROOT)) if pairs else None
    print(f"[{name}] {res['flagged']} of {res['pool']} pool images flagged against {res['eval']} "
          f"evaluation images ({res['by_method']}), {res['seconds']}s", flush=True)
    return res


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def tiny_vs_cifar(cfg: DecontamConfig, subset: int | None) -> dict:
    blobs, meta = datasets.tinyimagenet_jpeg_bytes()
    rows = datasets.pool_subset(len(blobs), subset)
    tiny = datasets.load_tinyimagenet()
    pool_pix = cache(tiny.images[rows])
    z = np.load(datasets.find_file(datasets.CIFAR10_FILE))
    buf, off = z["test_jpeg"], z["test_offsets"]
    cifar = datasets.load_cifar10("test")
    eval_pix = cache(cifar.images)
    model = teacher("cifar_tinyimagenet.yaml")
    ev = EvalSet("cifar10 test", [sha(buf[off[i]:off[i + 1]].tobytes()) for i in range(len(off) - 1)],
                 [f"cifar_test_{i:05d}" for i in range(len(off) - 1)], eval_pix, embed(model, eval_pix))
    res = count("tinyimagenet_vs_cifar10", [sha(blobs[i]) for i in rows], pool_pix, embed(model, pool_pix), ev, cfg)
    res["subset"] = subset
    return res


def fashion_vs_fmnist(cfg: DecontamConfig, pacs_images: int = 1500) -> dict:
    cloth = datasets.load_clothing()
    files = []
    for im in cloth.images:                                   # write_fashion_web's files: JPEG q90 of the 64 px
        b = io.BytesIO()
        Image.fromarray(im).save(b, format="JPEG", quality=90)
        files.append(b.getvalue())
    pblobs, _ = datasets.pacs_jpeg_bytes()
    pick = np.sort(np.random.default_rng(0).choice(len(pblobs), min(pacs_images, len(pblobs)), replace=False))
    files += [pblobs[i] for i in pick]
    pool_pix = cache([Image.open(io.BytesIO(b)).convert("RGB") for b in files])
    fm = datasets.load_fashion_mnist("test")
    pngs, imgs = [], []
    for g in fm.images:                                       # write_fmnist_folder: inverted PNGs
        b = io.BytesIO()
        Image.fromarray(255 - g).save(b, format="PNG")
        pngs.append(b.getvalue())
        imgs.append(Image.open(io.BytesIO(b.getvalue())).convert("RGB"))
    eval_pix = cache(imgs)
    model = teacher("fashion_web.yaml")
    ev = EvalSet("fashion-mnist test", [sha(b) for b in pngs], [f"fmnist_test_{i:05d}" for i in range(len(pngs))],
                 eval_pix, embed(model, eval_pix))
    return count("fashion_web_vs_fmnist", [sha(b) for b in files], pool_pix, embed(model, pool_pix), ev, cfg)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=800, help="evaluation images per set")
    ap.add_argument("--neg", type=int, default=4000, help="distinct negatives per set (at most what is left)")
    ap.add_argument("--tiny-subset", type=int, default=None, help="Tiny ImageNet pool subset (default: all 60,600)")
    ap.add_argument("--no-counts", action="store_true", help="only the precision / recall tables")
    ap.add_argument("--results", type=Path, default=RESULTS / "decontam.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    model = teacher("cifar_tinyimagenet.yaml")
    clothing = datasets.load_clothing().images
    pacs_blobs, _ = datasets.pacs_jpeg_bytes()
    pacs = [Image.open(io.BytesIO(b)).convert("RGB") for b in pacs_blobs]
    cifar = datasets.load_cifar10("test").images
    sets = {}
    for name, imgs in (("cifar10_test", cifar), ("clothing", clothing), ("pacs", pacs)):
        sets[name] = measure_set(name, imgs, args.eval, min(args.neg, len(imgs) - args.eval), model)
    chosen = choose(sets)
    union = union_table(sets, chosen)
    print_tables(sets, chosen, union)
    out = {"settings": {"eval": args.eval, "neg": args.neg, "transforms": list(TRANSFORMS), "phash_crops": CROPS,
                        "cache": "32 px squash (Lanczos)", "embedding_encoder": "flows/assets/cifar_teacher.safetensors",
                        "max_fpr": MAX_FPR},
           "sets": {k: {kk: vv for kk, vv in v.items() if kk != "_raw"} for k, v in sets.items()},
           "chosen": chosen, "union": union}
    if not args.no_counts:
        cfg = DecontamConfig(phash_max_bits=chosen["phash_max_bits"], phash_verify=chosen["phash_verify"],
                             embedding_threshold=chosen["embedding_threshold"])
        out["counts"] = {"tinyimagenet_vs_cifar10_test": tiny_vs_cifar(cfg, args.tiny_subset),
                         "fashion_web_vs_fmnist_test": fashion_vs_fmnist(cfg)}
    out["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results, out)
    print(f"\nwrote {args.results} ({out['seconds']}s)")
    return out


if __name__ == "__main__":
    main()
