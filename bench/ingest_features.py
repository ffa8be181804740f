"""Ingest and feature-extraction throughput (issue 2).

    .venv/bin/python bench/ingest_features.py [--encoders cnn_fmnist,ViT-B-32] [--batch-size 256]

On the fashion-web pool (real JPEG files: clothing photos + PACS), prints images/s for
 - ingest (list, read, hash, decode, validate, write manifest), cold and incremental no-op;
 - the decoded pixel cache;
 - feature extraction per encoder, next to the model's pure forward rate on random tensors of
   the same batch size (the gap is the pipeline's own overhead: reading the cache, copying,
   writing float16 arrays);
and the peak resident memory of each stage (each stage runs in its own process).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = ROOT / "bench" / "out" / "ingest_features"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_ingest(run: Path, web: Path) -> dict:
    from webkd.pipeline.config import IngestConfig, RunPaths
    from webkd.pipeline.ingest import run_ingest

    paths = RunPaths(run)
    t = time.time()
    rep = run_ingest([f"folder:{web}"], paths, IngestConfig())
    cold = time.time() - t
    t = time.time()
    rep2 = run_ingest([f"folder:{web}"], paths, IngestConfig())
    noop = time.time() - t
    return {"images": rep.seen, "kept": rep.kept, "cold_s": cold, "noop_s": noop, "noop_new": rep2.new,
            "peak_mb": _peak_mb()}


def stage_pixels(run: Path, size: int) -> dict:
    from webkd.pipeline.config import RunPaths
    from webkd.pipeline.features import build_pixel_cache
    from webkd.pipeline.records import load_manifest

    paths = RunPaths(run)
    recs = load_manifest(paths.manifest)
    t = time.time()
    build_pixel_cache(recs, paths.pixels(size, "squash"), size, "squash")
    return {"images": len(recs), "seconds": time.time() - t, "peak_mb": _peak_mb()}


def _encoder(name: str, classes: list[str]):
    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.training.models import build_model, fingerprint, freeze

    if name == "cnn_fmnist":
        spec = ModelSpec(key=name, name="cnn_fmnist", kwargs={"width": 32},
                         preprocess=PreprocessSpec(size=28, channels=1, mean=[0.286], std=[0.353], invert=True))
    else:  # an open_clip architecture, random init (no download): speed only
        spec = ModelSpec(key=name.replace("/", "_"), library="open_clip", name=name, pretrained=None)
    model = freeze(build_model(spec, num_classes=len(classes), class_names=classes))
    return spec, model, fingerprint(model, spec)


def stage_features(run: Path, size: int, encoder: str, batch_size: int, max_images: int = 0) -> dict:
    import numpy as np
    import torch

    from webkd.pipeline.config import RunPaths
    from webkd.pipeline.features import extract_features
    from webkd.pipeline.records import load_manifest

    paths = RunPaths(run)
    classes = [f"class {i}" for i in range(10)]
    spec, model, fp = _encoder(encoder, classes)
    pix = np.load(paths.pixels(size, "squash"), mmap_mode="r")
    ids = [r.id for r in load_manifest(paths.manifest)]
    if max_images and max_images < len(pix):  # the first rows only (large encoders on this CPU)
        pix, ids = pix[:max_images], ids[:max_images]
    n = len(pix)
    # pure forward rate on random tensors of the same batch size (after one warm-up batch)
    x = torch.rand(batch_size, 3, size, size)
    with torch.inference_mode():
        model(x)
        reps = max(2, min(20, (2 * n) // batch_size // 4))
        t = time.time()
        for _ in range(reps):
            model(x)
        forward_ips = reps * batch_size / (time.time() - t)
    shutil.rmtree(paths.features_dir, ignore_errors=True)
    t = time.time()
    cache = extract_features(model, pix, spec.cache_key, fp, paths, batch_size=batch_size, device="cpu", row_ids=ids)
    cold = time.time() - t
    t = time.time()
    again = extract_features(model, pix, spec.cache_key, fp, paths, batch_size=batch_size, device="cpu", row_ids=ids)
    cached = time.time() - t
    return {"encoder": encoder, "images": n, "extract_ips": cache.computed / cold, "forward_ips": forward_ips,
            "cached_s": cached, "cached_computed": again.computed, "params": sum(p.numel() for p in model.parameters()),
            "peak_mb": _peak_mb()}


def _child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", default="cnn_fmnist,ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=32, help="pixel cache side (ViT encoders resize to 224 themselves)")
    ap.add_argument("--max-images", type=int, default=2048,
                    help="feature extraction on the first N pool images only (0: all); ingest always reads all")
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child is not None:
        kind, *rest = args.child
        out = {"ingest": lambda: stage_ingest(Path(rest[0]), Path(rest[1])),
               "pixels": lambda: stage_pixels(Path(rest[0]), int(rest[1])),
               "features": lambda: stage_features(Path(rest[0]), int(rest[1]), rest[2], int(rest[3]), int(rest[4]))}[kind]()
        print(json.dumps(out))
        return

    from webkd.pipeline.datasets import write_fashion_web

    scen = write_fashion_web(OUT / "data", write_test=False)
    run = OUT / "run"
    shutil.rmtree(run, ignore_errors=True)
    ing = _child("ingest", str(run), str(scen.web_dir))
    pix = _child("pixels", str(run), str(args.size))
    feats = [_child("features", str(run), str(args.size), e, str(args.batch_size), str(args.max_images))
             for e in args.encoders.split(",")]

    import torch
    print(f"\npool: {ing['images']} real JPEG files (fashion-web), batch size {args.batch_size}, torch threads "
          f"{torch.get_num_threads()} of {os.cpu_count()} CPUs\n")
    print("| stage | images/s | pure forward images/s | extraction / forward | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    print(f"| ingest, cold (read, sha256, decode, validate, manifest) | {ing['images'] / ing['cold_s']:.0f} | | | "
          f"{ing['peak_mb']:.0f} |")
    print(f"| ingest, incremental no-op ({ing['noop_new']} new) | {ing['images'] / ing['noop_s']:.0f} | | | |")
    print(f"| pixel cache {args.size}px | {pix['images'] / pix['seconds']:.0f} | | | {pix['peak_mb']:.0f} |")
    for f in feats:
        print(f"| features {f['encoder']} ({f['params'] / 1e6:.2f}M params, {f['images']} images) | {f['extract_ips']:.0f} | "
              f"{f['forward_ips']:.0f} | {f['extract_ips'] / f['forward_ips']:.2f} | {f['peak_mb']:.0f} |")
        print(f"| features {f['encoder']}, cached re-run ({f['cached_computed']} computed) | "
              f"{f['images'] / max(f['cached_s'], 1e-9):.0f} | | | |")


if __name__ == "__main__":
    main()
