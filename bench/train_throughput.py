"""Training images/s of the product's loop against the pure forward+backward rate of the same
models and batch (issue 11, item 3).

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_throughput.py [--run-dir DIR] [--steps 20]
        [--methods kd,kd_fm,kd3p]

On a curated run directory of the cifar-tinyimagenet scenario (default: the benchmark's base pool,
bench/out/cifar_big/base_web, made by bench/cifar_tinyimagenet.py --pool-size 60600), for each
method (kd: vanilla KD; kd_fm: KD with function matching, mixup on every batch; kd3p: the KD^3
objective + logit KD):

- loop: `training.loop.train_one_epoch` for --steps steps of the configured batch (random crops,
  flips, the method's own augmentation, the teacher online, weighted loss, optimizer step);
- pure: the same student, teacher and method on one fixed batch already on the device:
  teacher forward (no grad) + the method's loss + backward + optimizer step, --steps times;
- ratio loop / pure: the share of the pure rate the loop reaches (1.0 = no input-pipeline cost).
Prints a table and writes bench/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from webkd.flows import cifar  # noqa: E402
from webkd.flows.stages import curate as cstages  # noqa: E402
from webkd.flows.stages.distill import build_student_and_method  # noqa: E402
from webkd.pipeline.config import load_config  # noqa: E402
from webkd.pipeline.storage import atomic_write_json  # noqa: E402
from webkd.training.pool import sample_batch  # noqa: E402

METHODS = {
    "kd": ["train.method=kd", "train.method_args={}"],
    "kd_fm": ["train.method=kd", "train.method_args={kd: {mixup: 1.0, temperature: 1.0, kd_weight: 1.0}}"],
    "kd3p": ["train.method=kd3", "train.method_args={kd3: {kd_weight: 1.0}}"],
}


def measure(run_dir: Path, method: str, steps: int, batch: int) -> dict:
    import torch

    from webkd.training.loop import _make_optimizer, to_tensor, train_one_epoch

    cfg = load_config(cifar.CONFIG, [f"run_dir={run_dir}", f"train.batch_size={batch}",
                                     f"train.steps_per_epoch={steps}", "selection.mode=none"] + METHODS[method])
    p = cstages.pool(cfg, with_neighbors=False)
    teachers = [m for _, m, _ in cstages.build_teachers(cfg)]
    student, meth = build_student_and_method(cfg, teachers, sample_batch(p))
    device = torch.device("cpu")
    params = [q for q in list(student.parameters()) + list(meth.parameters()) if q.requires_grad]
    opt = _make_optimizer(params, cfg.train)
    rows = np.flatnonzero(p.split == "train")
    weights = np.ones(len(p), np.float32)
    # warm-up (allocator, first-call costs), then the loop
    train_one_epoch(student, teachers, meth, p, rows, weights, cfg.train.model_copy(update={"steps_per_epoch": 2}),
                    opt, 0, 0.5, 0, device)
    t0 = time.perf_counter()
    stats = train_one_epoch(student, teachers, meth, p, rows, weights, cfg.train, opt, 1, 0.5, 0, device)
    loop_s = time.perf_counter() - t0
    # pure: one fixed batch on the device
    b = rows[:batch]
    x = to_tensor(p.pixels, b, device)
    fixed = {"x": x, "labels": torch.from_numpy(p.labels[b]), "index": torch.from_numpy(b),
             "generator": torch.Generator().manual_seed(0), "progress": 0.5}
    student.train()
    meth.train()

    def step():
        terms = meth(fixed, student, teachers, 0.5)
        loss = sum(v for k, v in terms.items() if k.startswith("loss")).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    pure_s = time.perf_counter() - t0
    loop_ips, pure_ips = stats["seen"] / loop_s, steps * batch / pure_s
    return {"method": method, "batch": batch, "steps": steps, "loop_images_per_s": loop_ips,
            "pure_images_per_s": pure_ips, "ratio": loop_ips / pure_ips}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "bench" / "out" / "cifar_big" / "base_web")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = ap.parse_args(argv)
    if not (args.run_dir / "manifest.parquet").exists():
        raise SystemExit(f"{args.run_dir}: no curated run here; run bench/cifar_tinyimagenet.py --pool-size 60600 first")
    import torch

    rows = [measure(args.run_dir, m, args.steps, args.batch_size) for m in args.methods.split(",")]
    print("| objective | loop images/s | pure forward+backward images/s | loop / pure |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['loop_images_per_s']:.0f} | {r['pure_images_per_s']:.0f} | {r['ratio']:.2f} |")
    out = {"rows": rows, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "command": " ".join(["python", "bench/train_throughput.py"] + (argv if argv is not None else sys.argv[1:]))}
    atomic_write_json(args.results, out)
    return out


if __name__ == "__main__":
    main()
