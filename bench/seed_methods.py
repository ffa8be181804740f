"""Seed-method benchmark (issue 4): does each of RLD, PLL, MixSKD and UNIC do what its paper
claims, at this scale, on real data? One table per claim, each cell the mean ± sample std over
seeds; every model is selected on a validation split and the test split is read once per model.

    .venv/bin/python bench/seed_methods.py [--tables rld,pll,mixskd,unic] [--seeds 0 1 2]
        [--epochs-rld 8] [--epochs-mixskd 12] [--epochs-unic 8] [--smoke] [--fresh]

Tables (methods.md §2-§5; details and numbers in BENCHMARKS.md, "Seed methods"):

1. RLD vs KD vs CE: a cnn_small student from the Fashion-MNIST teacher (flows/demo.py), (a) on
   original data (a Fashion-MNIST train subset with its labels), (b) on the fashion-web pool
   (clothing photos + PACS off-class images, through the pipeline stages: ingest, features,
   index, refine) with web query labels, and RLD / CE also on PLL-refined labels. RLD's β is
   chosen from {2, 4, 8} on validation with seed 0. Test: Fashion-MNIST test.
2. PLL vs CE vs 2 rounds of self-distillation: linear probes on frozen embeddings, (a) PACS
   held-out images with PACS-teacher embeddings and (b) clothing photos with Fashion-MNIST-teacher
   embeddings, both with 20/40/60% symmetric noise injected into the training labels (clean
   validation), and (c) the fashion-web pool's real noisy query labels (validation: web labels;
   test: Fashion-MNIST test, footwear classes grouped).
3. MixSKD vs CE: the same student trained on clothing photos (their own train/validation/test
   split), no teacher; MixSKD is reported at the backbone exit.
4. UNIC: one student distilled from the Fashion-MNIST teacher and a PACS teacher vs students
   distilled from each alone (same unlabeled pool of FMNIST + PACS images); linear-probe
   accuracy of every student (and of the teachers) on both tasks.

Every finished run is cached in bench/out/seed_methods/results.json, so an interrupted bench
resumes; `--fresh` recomputes. Teachers are cached in .cache/teachers/.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.label_noise import inject_label_noise, noise_matrix  # noqa: E402
from webkd.flows import demo  # noqa: E402
from webkd.flows.stages import curate as curate_stages  # noqa: E402
from webkd.pipeline import datasets  # noqa: E402
from webkd.pipeline.config import ModelSpec, PreprocessSpec, RunPaths, SelectionConfig, TrainConfig, load_config  # noqa: E402
from webkd.pipeline.storage import atomic_write_json  # noqa: E402
from webkd.selection.refine import fit_linear_probe, refine_labels, softmax  # noqa: E402
from webkd.training.loop import accuracy, fit, load_checkpoint, predict_logits  # noqa: E402
from webkd.training.methods import build_method, method_from_models  # noqa: E402
from webkd.training.pool import Pool, class_groups, split_of  # noqa: E402
from webkd.training.models import build_model, count_parameters, freeze, load_weights, save_weights  # noqa: E402

OUT = ROOT / "bench" / "out" / "seed_methods"
log = logging.getLogger("seed_methods")
IMAGENET = PreprocessSpec(size=32, channels=3)
FOOTWEAR = [5, 7, 9]


# --------------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------------
class Results:
    """results.json: run key -> record; a finished run is never recomputed (unless --fresh)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data: dict[str, Any] = {} if fresh or not path.exists() else json.loads(path.read_text())

    def get(self, key: str, fn: Callable[[], dict]) -> dict:
        if key not in self.data:
            t0 = time.time()
            rec = fn()
            rec["seconds"] = round(time.time() - t0, 1)
            self.data[key] = rec
            atomic_write_json(self.path, self.data)
            print(f"  [{key}] " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in rec.items()), flush=True)
        return self.data[key]


def ms(values: list[float], pct: bool = True) -> str:
    v = np.array([x for x in values if x is not None and x == x], float) * (100 if pct else 1)
    if not len(v):
        return "-"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def resize_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W[, 3]) -> (N, size, size, 3) RGB with Lanczos (the pixel cache's resize)."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        img = Image.fromarray(im).convert("RGB")
        out[i] = np.asarray(img if img.size == (size, size) else img.resize((size, size), Image.Resampling.LANCZOS))
    return out


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def embed(model, pixels: np.ndarray, batch: int = 500) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, D) embeddings in eval mode."""
    model.eval()
    out = []
    for s in range(0, len(pixels), batch):
        x = torch.from_numpy(np.ascontiguousarray(pixels[s:s + batch])).to(device()).permute(0, 3, 1, 2).float() / 255
        out.append(model(x).embedding.float().cpu().numpy())
    return np.concatenate(out)


def probe_acc(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], k: int, seed: int,
              group: np.ndarray | None = None, epochs: int = 60) -> tuple[float, float]:
    """CE linear probe on train, selected on val; (val acc, test acc)."""
    f = np.concatenate([feats["train"], feats["val"], feats["test"]])
    n_tr, n_va = len(feats["train"]), len(feats["val"])
    y = np.concatenate([labels["train"], labels["val"], labels["test"]])
    p = fit_linear_probe(f, y, np.arange(n_tr), np.arange(n_tr, n_tr + n_va), y, k, "ce", epochs=epochs, seed=seed)
    test_logits = p.logits(feats["test"])
    return p.val_acc, accuracy(test_logits, labels["test"], group)


# --------------------------------------------------------------------------------------------
# shared data and teachers
# --------------------------------------------------------------------------------------------
def fmnist_split(n_train: int, n_val: int, seed: int = 0):
    """Disjoint Fashion-MNIST train subsets (photo polarity, 28 px RGB) and the whole test set."""
    tr = datasets.load_fashion_mnist("train")
    te = datasets.load_fashion_mnist("test")
    order = np.random.default_rng(1000 + seed).permutation(len(tr.labels))
    a, b = order[:n_train], order[n_train:n_train + n_val]
    return ((demo.photo_polarity(tr.images[a]), tr.labels[a]), (demo.photo_polarity(tr.images[b]), tr.labels[b]),
            (demo.photo_polarity(te.images), te.labels))


def pacs_parts(seed: int = 0) -> dict[str, np.ndarray]:
    """PACS 32 px split by a seeded permutation: 60% teacher train, 10% teacher val, 30% held out."""
    p = datasets.load_pacs(size=32)
    order = np.random.default_rng(2000 + seed).permutation(len(p.labels))
    n = len(order)
    a, b = int(0.6 * n), int(0.7 * n)
    return {"images": p.images, "labels": p.labels, "teach": order[:a], "teach_val": order[a:b], "held": order[b:]}


def pacs_teacher(parts: dict, epochs: int = 10) -> tuple[Any, dict]:
    """cnn_small (width 24, RGB 32 px) trained with CE on PACS (all four domains), cached."""
    spec = ModelSpec(key="pacs_teacher", library="project", name="cnn_small", kwargs={"width": 24}, preprocess=IMAGENET)
    out = demo.cache_dir() / "teachers" / f"pacs_cnn_small_w24_e{epochs}"
    weights, metrics_path = out / "teacher.safetensors", out / "teacher_metrics.json"
    if not weights.exists():
        t0 = time.time()
        torch.manual_seed(0)
        model = build_model(spec, 7)
        rows = np.concatenate([parts["teach"], parts["teach_val"]])
        n = len(rows)
        split = np.array(["train"] * len(parts["teach"]) + ["val"] * len(parts["teach_val"]), object)
        labels = parts["labels"][rows].astype(np.int64)
        pool = Pool(pixels=parts["images"][rows], ids=[f"pacs{i}" for i in rows], split=split,
                    status=np.full(n, "ok", object), labels=labels, web_labels=[None] * n, web_class=labels,
                    val_labels=np.where(split == "val", labels, -1))
        cfg = TrainConfig(method="ce", epochs=epochs, batch_size=128, lr=0.05, crop_scale=(0.5, 1.0))
        res = fit(model, [], build_method("ce"), pool, cfg, SelectionConfig(mode="none"), RunPaths(out / "run"),
                  seed=0, device=device())
        model.load_state_dict(load_checkpoint(out / "run" / "checkpoints" / "best.pt", device())["student"])
        save_weights(model.cpu(), weights)
        metrics_path.write_text(json.dumps({"val_acc": res.best_val, "best_epoch": res.best_epoch,
                                            "seconds": time.time() - t0}))
    model = freeze(load_weights(build_model(spec.model_copy(update={"weights": None}), 7), weights)).to(device())
    return model, json.loads(metrics_path.read_text())


def fmnist_teacher_weights(epochs: int) -> tuple[Path, dict]:
    """The shipped demo teacher (flows/assets, the 4-epoch recipe), else train and cache one."""
    if epochs == 4 and demo.DEMO_TEACHER.exists():
        meta = json.loads(demo.DEMO_TEACHER.with_suffix(".json").read_text())
        return demo.DEMO_TEACHER, meta["metrics"]
    return demo.train_fmnist_teacher(epochs=epochs, device="auto")


def fmnist_teacher(epochs: int) -> tuple[Any, Path, dict]:
    weights, metrics = fmnist_teacher_weights(epochs)
    model = freeze(build_model(demo.teacher_spec(str(weights)), 10)).to(device())
    return model, weights, metrics


def student_spec(width: int, fmnist_domain: bool) -> ModelSpec:
    pre = demo.fmnist_preprocess() if fmnist_domain else IMAGENET
    return ModelSpec(key="student", library="project", name="cnn_small", kwargs={"width": width}, preprocess=pre)


def train_student(pool: Pool, method: str, method_args: dict, teachers: list, spec: ModelSpec, k: int,
                  epochs: int, seed: int, run_dir: Path, selection: str = "val",
                  batch_size: int = 64, val_metric: str = "query_acc") -> tuple[Any, Any, dict]:
    """fit() a fresh student; returns (student, method, info) with the validation-chosen (or last)
    checkpoint loaded. Every row of a table is selected by the same metric: accuracy on the
    validation rows' labels (`query_acc`), whatever the method."""
    torch.manual_seed(seed)
    student = build_model(spec, k)
    sample = torch.from_numpy(np.ascontiguousarray(pool.pixels[:8])).permute(0, 3, 1, 2).float() / 255
    m = method_from_models(method, student, teachers, sample, **method_args)
    cfg = TrainConfig(method=method, epochs=epochs, batch_size=batch_size, lr=0.05, val_metric=val_metric)
    paths = RunPaths(run_dir)
    if paths.last_checkpoint.exists():
        paths.last_checkpoint.unlink()       # results.json is the cache; a run dir is scratch
    res = fit(student, teachers, m, pool, cfg, SelectionConfig(mode="none"), paths, seed=seed, device=device(),
              run_fingerprint=f"{method}{sorted(method_args.items())}{seed}")
    ck = load_checkpoint(paths.best_checkpoint if selection == "val" else paths.last_checkpoint, device())
    student.load_state_dict(ck["student"])
    m.load_state_dict(ck["method"])
    student.eval(), m.eval()
    best = res.history[res.best_epoch] if res.history and res.best_epoch >= 0 else {}
    return student, m, {"val_acc": best.get("val_acc", float("nan")),
                        "val_agreement": best.get("val_agreement", float("nan")), "best_epoch": res.best_epoch,
                        "epoch_s": round(res.seconds / max(1, len(res.history)), 1)}


def test_logits(student, method, teachers, pixels) -> np.ndarray:
    """The deployed prediction on the test pixels (read once per model)."""
    return predict_logits(lambda x: method.predict(student, teachers, x), pixels, np.arange(len(pixels)), device())


# --------------------------------------------------------------------------------------------
# Table 1: RLD vs KD vs CE
# --------------------------------------------------------------------------------------------
def web_run(args, teacher_weights: Path) -> Any:
    """The fashion-web pool through the pipeline stages (ingest, features, index, refine)."""
    scen = datasets.write_fashion_web(OUT / "data", pacs_images=args.pacs, write_test=False,
                                      clothing_fraction=args.clothing_fraction)
    over = [f"run_dir={OUT / 'web_run'}", f"teachers.0.weights={teacher_weights}",
            f"data.sources=['folder:{scen.web_dir}']", "data.test_source=null", "data.image_size=28",
            f"refine.epochs={args.probe_epochs}"] + (["index.near_dup_threshold=null"] if args.smoke else [])
    cfg = load_config(ROOT / "flows" / "configs" / "fashion_web.yaml", over)
    if not cfg.paths.labels.exists():
        t0 = time.time()
        print(curate_stages.ingest(cfg).summary())
        curate_stages.features(cfg)
        curate_stages.index(cfg)
        print("refine:", curate_stages.refine(cfg).summary(), f"(curation {time.time() - t0:.0f}s)")
    return cfg


def table_rld(args, res: Results, fm_teacher, fm_weights) -> str:
    tag = f"b{args.batch}e{args.epochs_rld}w{args.width_rld}n{args.n_fmnist}v{args.n_fmnist_val}p{args.pacs}c{args.clothing_fraction}t{args.teacher_epochs}"
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = fmnist_split(args.n_fmnist, args.n_fmnist_val)
    n = len(tr_y) + len(va_y)
    split = np.array(["train"] * len(tr_y) + ["val"] * len(va_y), object)
    lab = np.concatenate([tr_y, va_y]).astype(np.int64)
    fm_pool = Pool(pixels=np.concatenate([tr_x, va_x]), ids=[f"fm{i}" for i in range(n)], split=split,
                   status=np.full(n, "ok", object), labels=lab, web_labels=[None] * n, web_class=lab,
                   val_labels=np.where(split == "val", lab, -1))
    cfg = web_run(args, fm_weights)
    web_pool = curate_stages.pool(cfg)
    ref_pool = curate_stages.pool(cfg.model_copy(update={"train": cfg.train.model_copy(update={"label_source": "refined"})}))
    group = class_groups(cfg.data)
    spec = student_spec(args.width_rld, fmnist_domain=True)
    settings = {"fmnist": {"pool": fm_pool, "kd_ce": 0.1}, "web": {"pool": web_pool, "kd_ce": 0.0}}

    def run(setting: str, row: str, method: str, margs: dict, seed: int, pool: Pool, rule: str = "query_acc") -> dict:
        def go():
            teachers = [fm_teacher] if method != "ce" else []
            st, m, info = train_student(pool, method, margs, teachers, spec, 10, args.epochs_rld, seed,
                                        OUT / "runs" / f"rld_{setting}_{row}_s{seed}", batch_size=args.batch,
                                        val_metric=rule)
            logits = test_logits(st, m, teachers, te_x)
            info["test_acc"], info["test_acc_grouped"] = accuracy(logits, te_y), accuracy(logits, te_y, group)
            return info
        # web keys: "-qb" selected on query-label accuracy, "-ab" on agreement with the teacher, for every
        # row alike (train.val_metric), with the demo's background=border preprocessing
        suffix = {"fmnist": "", "web": {"query_acc": "-qb", "agreement": "-ab"}[rule]}[setting]
        return res.get(f"rld[{tag}]/{setting}{suffix}/{row}/s{seed}", go)

    rows_out, sweep_note = [], []
    teacher_test = accuracy(predict_logits(lambda x: fm_teacher(x).logits, te_x, np.arange(len(te_y)), device()), te_y)
    val_key = {"query_acc": "val_acc", "agreement": "val_agreement"}
    for setting, st in settings.items():
        pool = st["pool"]
        rules = ["query_acc"] + (["agreement"] if setting == "web" else [])
        betas = {}
        for rule in rules:  # RLD's beta on validation, seed 0 (methods.md §2.4: beta from {2, 4, 8})
            sweep = {b: run(setting, f"rld_b{b}", "rld", {"beta": float(b)}, args.seeds[0], pool, rule)[val_key[rule]]
                     for b in (2, 4, 8)}
            betas[rule] = max(sweep, key=lambda b: (sweep[b], -b))
            sweep_note.append(f"{setting} ({rule}): " + ", ".join(f"β={b} {100 * v:.2f}" for b, v in sweep.items())
                              + f" -> β={betas[rule]}")
        rows = [("CE (labels)", "ce", "ce", {}, pool),
                ("KD" + (" (0.1 CE + 0.9 KD)" if st["kd_ce"] else " (no CE: unlabelled web images)"), "kd", "kd",
                 {"ce_weight": st["kd_ce"]}, pool), ("RLD", "rld", "rld", None, pool)]
        if setting == "web":
            rows += [("CE, PLL-refined labels", "ce_refined", "ce", {}, ref_pool),
                     ("RLD, PLL-refined labels", "rld_refined", "rld", None, ref_pool)]
        for label, key, method, margs, p in rows:
            cells = []
            for rule in rules:
                k, a = key, margs
                if margs is None:   # RLD rows: the beta chosen under this rule
                    k, a = f"{key}_b{betas[rule]}", {"beta": float(betas[rule])}
                recs = [run(setting, k, method, a, s, p, rule) for s in args.seeds]
                cells.append((recs, betas.get(rule)))
            (rq, bq) = cells[0]
            ra = cells[1][0] if len(cells) > 1 else None
            name = label + (f" (β={bq}" + (f" / {cells[1][1]}" if ra is not None else "") + ")" if margs is None else "")
            rows_out.append([{"fmnist": f"original FMNIST ({len(tr_y)} labelled)", "web": "fashion-web pool"}[setting]
                             if key == "ce" else "", name, ms([r["test_acc"] for r in rq]),
                             ms([r["test_acc"] for r in ra]) if ra is not None else "n/a",
                             ms([r["val_acc"] for r in rq]),
                             ms([r["val_agreement"] for r in ra]) if ra is not None else "n/a",
                             f"{np.mean([r['epoch_s'] for r in rq]):.0f}"])
    labelled = int((web_pool.labels[web_pool.candidates] >= 0).sum())
    refined = int((ref_pool.labels[ref_pool.candidates] >= 0).sum())
    head = ["setting", "student objective", "FMNIST test (%), selected on val label acc",
            "FMNIST test (%), selected on val teacher agreement", "val label acc (%)", "val agreement (%)", "s / epoch"]
    notes = [f"Teacher (cnn_fmnist) FMNIST test accuracy {100 * teacher_test:.2f}%. Student cnn_small "
             f"width {args.width_rld} ({count_parameters(build_model(spec, 10)):,} parameters), {args.epochs_rld} epochs, "
             f"SGD lr 0.05 cosine, batch {args.batch}, crop 0.35-1 + flip. Original data: {len(tr_y)} FMNIST train images "
             f"with labels, {len(va_y)} for validation. Web pool: {len(web_pool)} images "
             f"({int(web_pool.candidates.sum())} train candidates, {labelled} with a mapped query label, "
             f"{refined} with a refined label); validation = held-out web slice: accuracy on its query labels "
             "(footwear grouped) or top-1 agreement with the teacher; each web column selects every row by one "
             "rule (the pipeline's `train.val_metric=auto` would use agreement for KD/RLD, label accuracy for CE).",
             "RLD β chosen on validation (seed 0): " + "; ".join(sweep_note) + "."]
    return md_table(head, rows_out) + "\n\n" + "\n".join(notes)


# --------------------------------------------------------------------------------------------
# Table 2: PLL vs CE vs self-distillation, linear probes
# --------------------------------------------------------------------------------------------
def probe_rows(x: np.ndarray, noisy: np.ndarray, train: np.ndarray, val: np.ndarray, val_labels: np.ndarray,
               k: int, seed: int, epochs: int, test_x: np.ndarray, test_y: np.ndarray,
               group: np.ndarray | None = None) -> dict[str, float]:
    """Test accuracy of CE, SD (1 and 2 rounds), PLL paper (scratch) and PLL code form (GCE, W_0 init)."""
    tr, va = np.flatnonzero(train & (noisy >= 0)), np.flatnonzero(val & (val_labels >= 0))
    common = dict(epochs=epochs, seed=seed)
    w0 = fit_linear_probe(x, noisy, tr, va, val_labels, k, "ce", **common)
    out = {"ce": accuracy(w0.logits(test_x), test_y, group), "ce_val": w0.val_acc}
    prev = w0
    for r in (1, 2):   # plain self-distillation: a fresh probe against softmax(W_{r-1} φ)
        soft = softmax(prev.logits(x)).astype(np.float32)
        prev = fit_linear_probe(x, soft, tr, va, val_labels, k, "soft", scaling=(w0.mean, w0.scale), **common)
        out[f"sd{r}"] = accuracy(prev.logits(test_x), test_y, group)
    for name, loss, init in (("pll", "paper", "scratch"), ("pll_gce", "gce", "teacher")):
        from webkd.pipeline.config import RefineConfig

        cfg = RefineConfig(loss=loss, init=init, epochs=epochs)
        ref = refine_labels(x, noisy, train, val, k, cfg, val_labels=val_labels, seed=seed, teacher=w0)
        out[name] = accuracy(ref.student.logits(test_x), test_y, group)
        out[name + "_val"] = ref.student.val_acc
    return out


def table_pll(args, res: Results, fm_teacher, pacs_t, parts) -> str:
    tag = f"bg-e{args.probe_epochs}p{args.pacs}c{args.clothing_fraction}t{args.teacher_epochs}pt{args.pacs_teacher_epochs}"
    # (a) PACS held-out images, PACS-teacher embeddings; (b) clothing photos, FMNIST-teacher embeddings
    held = parts["held"]
    n_h = len(held)
    pacs_feat = embed(pacs_t, parts["images"][held])
    pacs_y = parts["labels"][held].astype(np.int64)
    a, b = int(0.6 * n_h), int(0.75 * n_h)
    pacs_split = (np.arange(n_h) < a), ((np.arange(n_h) >= a) & (np.arange(n_h) < b)), np.arange(n_h) >= b
    cl = datasets.load_clothing()
    cl_x = resize_rgb(cl.images, 28)
    cl_feat = embed(fm_teacher, cl_x)
    cl_y = cl.labels.astype(np.int64)
    cl_split = cl.split == "train", cl.split == "validation", cl.split == "test"
    sets = {"PACS held-out, PACS-teacher embeddings (64-d)": ("pacs", pacs_feat, pacs_y, pacs_split, 7),
            "clothing photos, FMNIST-teacher embeddings (128-d)": ("cloth", cl_feat, cl_y, cl_split, 10)}
    names = {"ce": "CE on noisy labels (W_0)", "sd1": "self-distillation, 1 round", "sd2": "self-distillation, 2 rounds",
             "pll": "PLL two-hot, paper form (from scratch)", "pll_gce": "PLL two-hot, code form (GCE q=0.7, init W_0)"}
    blocks = []
    for title, (key, feat, y, (trm, vam, tem), k) in sets.items():
        cols = {}
        for eta in (0.2, 0.4, 0.6):
            def go(eta=eta, seed=0):
                g = torch.Generator().manual_seed(seed)
                noisy = inject_label_noise(torch.from_numpy(y), noise_matrix("symmetric", k, eta), g).numpy()
                noisy = np.where(trm, noisy, -1)   # noise only in the probe-training labels
                return probe_rows(feat, noisy, trm, vam, y, k, seed, args.probe_epochs, feat[tem], y[tem])
            cols[eta] = [res.get(f"pll[{tag}]/{key}/eta{eta}/s{s}", lambda s=s, eta=eta: go(eta, s)) for s in args.seeds]
        rows = [[names[m]] + [ms([r[m] for r in cols[eta]]) for eta in cols] for m in names]
        blocks.append(f"**{title}**: {int(trm.sum())} train / {int(vam.sum())} val (clean) / {int(tem.sum())} test\n\n"
                      + md_table(["probe", "20% noise", "40% noise", "60% noise"], rows))
    # (c) the fashion-web pool's real query labels; test: FMNIST test through the same teacher
    cfg = web_run(args, fmnist_teacher_weights(args.teacher_epochs)[0])
    from webkd.pipeline.features import load_features
    from webkd.pipeline.records import class_index, load_manifest

    recs = load_manifest(cfg.paths.manifest)
    feat = np.asarray(load_features(cfg.paths, cfg.teachers[0].cache_key).embeddings, np.float32)
    q = np.array(class_index(recs, cfg.data.classes, cfg.data.label_map), np.int64)
    split = np.array([split_of(r.id, cfg.data.val_fraction) for r in recs])
    ok = np.array([r.status == "ok" for r in recs])
    te = datasets.load_fashion_mnist("test")
    te_feat = embed(fm_teacher, demo.photo_polarity(te.images))
    group = class_groups(cfg.data)
    recs_c = [res.get(f"pll[{tag}]/web/s{s}", lambda s=s: probe_rows(feat, np.where(ok, q, -1), (split == "train") & ok,
                                                              split == "val", q, 10, s, args.probe_epochs,
                                                              te_feat, te.labels, group)) for s in args.seeds]
    rows = [[names[m], ms([r[m] for r in recs_c]), ms([r.get(m + "_val", r.get("ce_val")) for r in recs_c])
             if m in ("ce", "pll", "pll_gce") else "-"] for m in names]
    blocks.append(f"**fashion-web pool, real query labels, FMNIST-teacher embeddings**: "
                  f"{int(((split == 'train') & ok & (q >= 0)).sum())} labelled train rows, "
                  f"{int(((split == 'val') & (q >= 0)).sum())} val rows (query labels); test: FMNIST test, "
                  f"footwear grouped\n\n" + md_table(["probe", "FMNIST test acc (%)", "web val acc (%)"], rows))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------
# Table 3: MixSKD vs CE
# --------------------------------------------------------------------------------------------
def table_mixskd(args, res: Results) -> str:
    tag = f"b{args.batch}e{args.epochs_mixskd}w{args.width_mixskd}"
    cl = datasets.load_clothing()
    x = resize_rgb(cl.images, 32)
    y = cl.labels.astype(np.int64)
    trv = np.flatnonzero(cl.split != "test")
    te = np.flatnonzero(cl.split == "test")
    split = np.where(cl.split[trv] == "train", "train", "val").astype(object)
    n = len(trv)
    lab = y[trv]
    pool = Pool(pixels=x[trv], ids=[f"cl{i}" for i in trv], split=split, status=np.full(n, "ok", object),
                labels=np.where(split == "train", lab, -1), web_labels=[None] * n, web_class=lab,
                val_labels=np.where(split == "val", lab, -1))
    spec = student_spec(args.width_mixskd, fmnist_domain=False)
    rows_def = [("CE", "ce", {}), ("MixSKD (all five terms, joint discriminators)", "mixskd", {})]
    if args.mixskd_ablation:
        rows_def.append(("MixSKD without L_mixcls (official CIFAR script)", "mixskd_nomix", {"mixcls_weight": 0.0}))
    out = []
    for label, key, margs in rows_def:
        method = "mixskd" if key.startswith("mixskd") else key

        def go(seed, method=method, margs=margs, key=key):
            st, m, info = train_student(pool, method, margs, [], spec, 10, args.epochs_mixskd, seed,
                                        OUT / "runs" / f"mixskd_{key}_s{seed}", batch_size=args.batch)
            info["test_acc"] = accuracy(test_logits(st, m, [], x[te]), y[te])
            return info
        recs = [res.get(f"mixskd[{tag}]/{key}/s{s}", lambda s=s, go=go: go(s)) for s in args.seeds]
        out.append([label, ms([r["test_acc"] for r in recs]), ms([r["val_acc"] for r in recs]),
                    f"{np.mean([r['best_epoch'] for r in recs]):.1f}", f"{np.mean([r['epoch_s'] for r in recs]):.0f}"])
    params = count_parameters(build_model(spec, 10))
    return (md_table(["student objective", "test acc (%)", "val acc (%)", "best epoch", "s / epoch"], out)
            + f"\n\nClothing photos (10 classes) at 32 px: {int((split == 'train').sum())} train, "
              f"{int((split == 'val').sum())} validation, {len(te)} test (the data set's own split). Student "
              f"cnn_small width {args.width_mixskd} ({params:,} parameters; MixSKD adds "
              f"{count_parameters(build_method('mixskd', student=build_model(spec, 10))):,} training-only "
              f"parameters, not exported), {args.epochs_mixskd} epochs, SGD lr 0.05 cosine, batch {args.batch}, "
              "α_m = 0.4, T = 3; MixSKD evaluated at the backbone exit.")


# --------------------------------------------------------------------------------------------
# Table 4: UNIC
# --------------------------------------------------------------------------------------------
def table_unic(args, res: Results, fm_teacher, pacs_t, parts) -> str:
    tag = (f"b{args.batch}e{args.epochs_unic}w{args.width_unic}n{args.n_unic}p{args.n_probe}te{args.n_fmnist_test}"
           f"pe{args.probe_epochs}t{args.teacher_epochs}pt{args.pacs_teacher_epochs}")
    rng = np.random.default_rng(7)
    tr = datasets.load_fashion_mnist("train")
    te = datasets.load_fashion_mnist("test")
    order = rng.permutation(len(tr.labels))
    n_d, n_p, n_v = args.n_unic // 2, args.n_probe, args.n_probe // 3
    d_idx, p_idx, v_idx = order[:n_d], order[n_d:n_d + n_p], order[n_d + n_p:n_d + n_p + n_v]
    fm = lambda idx: resize_rgb(demo.photo_polarity(tr.images[idx]), 32)   # noqa: E731
    te_idx = rng.choice(len(te.labels), args.n_fmnist_test, replace=False)
    fm_task = {"train": (fm(p_idx), tr.labels[p_idx]), "val": (fm(v_idx), tr.labels[v_idx]),
               "test": (resize_rgb(demo.photo_polarity(te.images[te_idx]), 32), te.labels[te_idx])}
    held = parts["held"]
    a, b = int(0.6 * len(held)), int(0.75 * len(held))
    pacs_task = {"train": (parts["images"][held[:a]], parts["labels"][held[:a]]),
                 "val": (parts["images"][held[a:b]], parts["labels"][held[a:b]]),
                 "test": (parts["images"][held[b:]], parts["labels"][held[b:]])}
    # the unlabeled distillation pool: FMNIST train images + PACS teacher-train images
    pacs_d = rng.choice(parts["teach"], min(n_d, len(parts["teach"])), replace=False)
    pix = np.concatenate([fm(d_idx), parts["images"][pacs_d]])
    n = len(pix)
    pool = Pool(pixels=pix, ids=[f"u{i}" for i in range(n)], split=np.full(n, "train", object),
                status=np.full(n, "ok", object), labels=np.full(n, -1), web_labels=[None] * n,
                web_class=np.full(n, -1), val_labels=np.full(n, -1),
                teacher_logits=np.zeros((n, 10), np.float32))   # no curation: every image is used
    spec = student_spec(args.width_unic, fmnist_domain=False)

    def evaluate(model, seed) -> dict:
        out = {}
        for task, data, k in (("fmnist", fm_task, 10), ("pacs", pacs_task, 7)):
            feats = {s: embed(model, data[s][0]) for s in data}
            labels = {s: np.asarray(data[s][1], np.int64) for s in data}
            out[f"{task}_val"], out[f"{task}_test"] = probe_acc(feats, labels, k, seed, epochs=args.probe_epochs)
        return out

    students = {"unic_both": ("UNIC student, both teachers", [fm_teacher, pacs_t]),
                "unic_fmnist": ("student of the FMNIST teacher alone", [fm_teacher]),
                "unic_pacs": ("student of the PACS teacher alone", [pacs_t])}
    rows = []
    for key, label in (("teacher_fmnist", "FMNIST teacher (cnn_fmnist, 128-d)"), ("teacher_pacs", "PACS teacher (cnn_small w24, 64-d)")):
        t = fm_teacher if key == "teacher_fmnist" else pacs_t
        recs = [res.get(f"unic[{tag}]/{key}/s{s}", lambda s=s, t=t: evaluate(t, s)) for s in args.seeds]
        rows.append([label, ms([r["fmnist_test"] for r in recs]), ms([r["pacs_test"] for r in recs])])

    def random_student(seed):
        torch.manual_seed(seed)
        return evaluate(build_model(spec, 10).to(device()), seed)
    recs = [res.get(f"unic[{tag}]/random/s{s}", lambda s=s: random_student(s)) for s in args.seeds]
    rows.append(["untrained student (random init)", ms([r["fmnist_test"] for r in recs]), ms([r["pacs_test"] for r in recs])])
    for key, (label, teachers) in students.items():
        def go(seed, teachers=teachers, key=key):
            st, m, info = train_student(pool, "unic", {}, teachers, spec, 10, args.epochs_unic, seed,
                                        OUT / "runs" / f"unic_{key}_s{seed}", selection="last", batch_size=args.batch)
            return {**evaluate(st, seed), "epoch_s": info["epoch_s"]}
        recs = [res.get(f"unic[{tag}]/{key}/s{s}", lambda s=s, go=go: go(s)) for s in args.seeds]
        rows.append([label, ms([r["fmnist_test"] for r in recs]), ms([r["pacs_test"] for r in recs])])
    params = count_parameters(build_model(spec, 10))
    return (md_table(["encoder", "FMNIST linear probe, test acc (%)", "PACS linear probe, test acc (%)"], rows)
            + f"\n\nDistillation pool: {n_d} Fashion-MNIST train images + {len(pacs_d)} PACS teacher-train images "
              f"(unlabeled), 32 px RGB. Student cnn_small width {args.width_unic} ({params:,} parameters), "
              f"{args.epochs_unic} epochs, SGD lr 0.05 cosine, batch {args.batch}; cls targets (pooled embeddings), one "
              "ladder head per stage, teacher dropping p = 0.5; the last epoch is used (there is no label to "
              "select on). Probes: bias-free linear on standardised embeddings, CE, selected on validation: "
              f"FMNIST {n_p} train / {n_v} val / {args.n_fmnist_test} test; PACS held-out "
              f"{a} / {b - a} / {len(held) - b} (images no teacher or student saw).")


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, str]:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="rld,pll,mixskd,unic")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs-rld", type=int, default=8)
    ap.add_argument("--epochs-mixskd", type=int, default=10)
    ap.add_argument("--epochs-unic", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64, help="training batch size of every student")
    ap.add_argument("--probe-epochs", type=int, default=50)
    ap.add_argument("--width-rld", type=int, default=16)
    ap.add_argument("--width-mixskd", type=int, default=16)
    ap.add_argument("--width-unic", type=int, default=16)
    ap.add_argument("--n-fmnist", type=int, default=2000, help="labelled FMNIST train images (RLD, original data)")
    ap.add_argument("--n-fmnist-val", type=int, default=1000)
    ap.add_argument("--n-unic", type=int, default=3000, help="UNIC distillation pool (half FMNIST, half PACS)")
    ap.add_argument("--n-probe", type=int, default=3000, help="FMNIST probe-train images (UNIC)")
    ap.add_argument("--n-fmnist-test", type=int, default=5000, help="FMNIST test images for the UNIC probes")
    ap.add_argument("--pacs", type=int, default=1500, help="PACS off-class images in the web pool")
    ap.add_argument("--clothing-fraction", type=float, default=1.0)
    ap.add_argument("--pacs-teacher-epochs", type=int, default=10)
    ap.add_argument("--teacher-epochs", type=int, default=4, help="Fashion-MNIST teacher (flows/demo.py, cached)")
    ap.add_argument("--mixskd-ablation", action="store_true", help="also MixSKD without L_mixcls")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 avoids oversubscription on a shared 2-core machine)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one seed: checks the script runs")
    ap.add_argument("--fresh", action="store_true", help="ignore cached results")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/out/seed_methods (smoke: .../smoke)")
    args = ap.parse_args(argv)
    OUT = args.out or (ROOT / "bench" / "out" / "seed_methods" / ("smoke" if args.smoke else ""))
    if args.smoke:
        args.seeds = args.seeds[:1]
        args.epochs_rld = args.epochs_mixskd = args.epochs_unic = 1
        args.probe_epochs, args.n_fmnist, args.n_fmnist_val, args.n_unic = 3, 300, 100, 300
        args.n_probe, args.n_fmnist_test, args.pacs, args.clothing_fraction = 150, 200, 100, 0.1
        args.pacs_teacher_epochs, args.mixskd_ablation = 1, True
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_all = time.time()
    res = Results(OUT / "results.json", args.fresh)
    tables = args.tables.split(",")
    fm_teacher, fm_weights, fm_metrics = fmnist_teacher(args.teacher_epochs)
    print(f"FMNIST teacher: {fm_metrics}")
    parts = pacs_parts()
    pacs_t = None
    if {"pll", "unic"} & set(tables):
        pacs_t, pm = pacs_teacher(parts, args.pacs_teacher_epochs)
        print(f"PACS teacher: {pm}")
    out: dict[str, str] = {}
    timings = {}
    for name in tables:
        t0 = time.time()
        if name == "rld":
            out[name] = table_rld(args, res, fm_teacher, fm_weights)
        elif name == "pll":
            out[name] = table_pll(args, res, fm_teacher, pacs_t, parts)
        elif name == "mixskd":
            out[name] = table_mixskd(args, res)
        elif name == "unic":
            out[name] = table_unic(args, res, fm_teacher, pacs_t, parts)
        else:
            raise SystemExit(f"unknown table {name!r}; choose from rld, pll, mixskd, unic")
        timings[name] = time.time() - t0
        print(f"\n## {name} ({timings[name] / 60:.1f} min)\n\n{out[name]}\n", flush=True)
    total = sum(r.get("seconds", 0) for r in res.data.values())
    summary = (f"seeds {args.seeds}; this invocation {(time.time() - t_all) / 60:.1f} min; "
               f"all cached runs {total / 60:.1f} min of training/eval; device {device()}")
    print(summary)
    (OUT / "tables.md").write_text("\n\n".join(f"## {k}\n\n{v}" for k, v in out.items()) + f"\n\n{summary}\n")
    return out


if __name__ == "__main__":
    main()
