"""Run an exported student on images: the library half of `webkd predict`.

The images are listed and read by the ingest readers (`pipeline.sources.iter_source`,
`pipeline.ingest.load_entry`: a folder, a CSV/Parquet manifest, WebDataset shards, or one image
file), decoded exactly as ingest decodes them, brought to the export's input square as the pixel
cache does (`pipeline.features.fit_square` with the export's `preprocess`) and fed to student.onnx
through onnxruntime (default) or to the PyTorch student (`export.load_student`). One output row
per listed image: id (content sha256), path, label (the source's query folder / label column),
class, probability, top-k classes and probabilities, and `error` for an image that could not be
read (its class columns are empty): a broken file is a row, never a crash.

Written to Parquet or CSV (atomically); the report counts rows, errors and, where the source has
labels that name the export's classes, the accuracy on its unique images (exact duplicates count
once, as ingest merges them), which is how the test accuracy of the model card is computed.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from webkd.pipeline.config import IngestConfig
from webkd.pipeline.pixels import FITS, fit_square
from webkd.pipeline.progress import tqdm
from webkd.pipeline.sources import Entry, iter_source
from webkd.pipeline.storage import atomic_path, atomic_write_table, read_json
from webkd.training.export import META, ONNX, ONNX_INT8, onnx_session, probabilities

log = logging.getLogger(__name__)

# the decode limits of a labelled test source at distill time (flows.stages.distill.test_set)
PREDICT_INGEST = IngestConfig(min_side=1)
BACKENDS = ("onnx", "torch")
OUT_SUFFIXES = (".parquet", ".pq", ".csv")


class PredictError(Exception):
    """A user's mistake in a predict call (missing export, bad source, bad option): one line."""


# --------------------------------------------------------------------------------------------
# the export: metadata, preprocessing, backends
# --------------------------------------------------------------------------------------------
def find_export(path: str | Path) -> Path:
    """The export folder of `path`: the folder itself (it holds student.json) or `<run>/export`."""
    p = Path(path)
    for cand in (p, p / "export"):
        if (cand / META).is_file():
            return cand
    if not p.exists():
        raise PredictError(f"{p}: no such folder; give a run directory or its export/ folder")
    raise PredictError(f"{p}: no {META} here or in {p / 'export'}; give a run directory (after `webkd distill`) "
                       "or its export/ folder")


def load_export_meta(path: str | Path) -> dict[str, Any]:
    """student.json of an export (or run) folder, checked for what prediction needs."""
    export = find_export(path)
    meta = read_json(export / META)
    pre = meta.get("preprocess") or {}
    if not meta.get("classes"):
        raise PredictError(f"{export / META}: no class names; re-export the run with data.classes set")
    if pre.get("fit") not in FITS or not isinstance(pre.get("size"), int):
        raise PredictError(f"{export / META}: no preprocess size/fit (exported by an older webkd); "
                           "re-run `webkd distill` to export it again")
    return meta


def to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., S, S, 3) -> float32 (..., 3, S, S) in [0, 1] (`training.loop.to_tensor`'s numbers)."""
    x = np.moveaxis(np.asarray(pixels), -1, -3)
    return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)


def load_image(image: str | Path | bytes, preprocess: dict[str, Any]) -> np.ndarray:
    """One image file (or its bytes) -> float32 (3, S, S) in [0, 1]: ingest's decode, then the
    pixel cache's fit. Raises `pipeline.ingest.Rejected` for a file ingest would refuse."""
    from webkd.pipeline.ingest import decode_image

    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    img = decode_image(data, PREDICT_INGEST).image
    return to_input(fit_square(img, int(preprocess["size"]), preprocess["fit"]))


def load_backend(export_dir: str | Path, backend: str = "onnx", int8: bool = False, threads: int = 0,
                 device: str = "cpu") -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(float32 (B, 3, S, S) -> float32 logits (B, K), a description) for the export's student."""
    export = find_export(export_dir)
    if backend not in BACKENDS:
        raise PredictError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        if int8:
            raise PredictError("--int8 runs student.int8.onnx: use it with --backend onnx")
        import torch

        from webkd.training.export import load_student

        dev = torch.device(device)
        model = load_student(export, dev)

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x).to(dev)).float().cpu().numpy()
        return run_torch, "PyTorch student (student.safetensors)"
    name = ONNX_INT8 if int8 else ONNX
    if not (export / name).is_file():
        fix = "export with export.int8=true, or drop --int8" if int8 else \
            "export with export.onnx=true, or use --backend torch"
        raise PredictError(f"{export}: no {name} ({fix})")
    session = onnx_session(export / name, threads)
    return (lambda x: session.run(["logits"], {"image": x})[0]), f"{name} (onnxruntime)"


# --------------------------------------------------------------------------------------------
# the images: one listing through the ingest readers
# --------------------------------------------------------------------------------------------
def source_spec(source: str) -> str:
    """A plain path becomes an ingest source spec: a folder -> `folder:`, .csv/.parquet ->
    `manifest:`, .tar (or a brace range) -> `wds:`; `folder:` / `manifest:` / `wds:` pass as given.
    One image file is `file:PATH` (listed here, read by the same reader)."""
    prefix, sep, rest = source.partition(":")
    if sep and prefix in ("folder", "manifest", "wds") and rest:
        return source
    p = Path(source)
    if p.is_dir():
        return f"folder:{p}"
    if p.suffix.lower() in (".csv", ".parquet", ".pq"):
        return f"manifest:{p}"
    if p.suffix.lower() == ".tar" or "{" in source:
        return f"wds:{source}"
    if p.is_file():
        return f"file:{p}"
    raise PredictError(f"{source}: no such file or folder; give a folder of images, a .csv/.parquet manifest, "
                       ".tar shards or one image file")


def list_images(source: str) -> list[Entry]:
    """Every image the source lists (listing failures included, as entries with an error)."""
    spec = source_spec(source)
    if spec.startswith("file:"):
        path = os.path.abspath(spec[5:])
        st = os.stat(path)
        return [Entry(uri=path, source=spec, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)]
    entries = list(iter_source(spec, PREDICT_INGEST))
    root = os.path.abspath(spec.partition(":")[2])
    if len(entries) == 1 and entries[0].error and entries[0].uri == root:   # the source itself failed
        raise PredictError(f"{source}: {entries[0].error[1]}")
    if not entries:
        raise PredictError(f"{source}: no images found (file names ending in "
                           f"{', '.join(PREDICT_INGEST.extensions)}); check the path")
    return entries


def _decode(entry: Entry, size: int, fit: str) -> tuple[str | None, np.ndarray | None, str | None]:
    """(content id, uint8 (S, S, 3), error) of one entry; never raises."""
    from webkd.pipeline.ingest import Rejected, load_entry

    seen: list[str] = []
    try:
        cid, dec = load_entry(entry, PREDICT_INGEST, on_id=seen.append)
        return cid, fit_square(dec.image, size, fit), None
    except Rejected as rej:
        return next(iter(seen), None), None, f"{rej.reason}: {rej.detail}" if rej.detail else rej.reason
    except Exception as exc:  # an unforeseen decoder failure: this file, not the whole call
        return next(iter(seen), None), None, f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
@dataclass
class PredictReport:
    out: Path
    model: str
    rows: int = 0
    errors: Counter = field(default_factory=Counter)      # reason code -> rows
    labelled: int = 0                                     # unique images whose label names a class
    correct: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def summary(self) -> str:
        from webkd.pipeline.report import pct

        err = sum(self.errors.values())
        lines = [f"predicted {self.rows - err} of {self.rows} images with {self.model} -> {self.out}"]
        if err:
            lines.append(f"unreadable: {err} ({', '.join(f'{k} {v}' for k, v in sorted(self.errors.items()))}); "
                         "their rows hold the reason in `error`")
        if self.labelled:
            lines.append(f"accuracy against the source's labels: {pct(self.accuracy)} "
                         f"({self.correct} of {self.labelled} unique labelled images)")
        return "\n".join(lines)


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise PredictError(f"--out {out}: write .parquet or .csv (got {out.suffix or 'no suffix'!r})")
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder: give a file name such as {out / 'predictions.parquet'}")
    return out


def predict(export: str | Path, source: str, out: str | Path = "predictions.parquet", batch_size: int = 64,
            top_k: int = 5, backend: str = "onnx", int8: bool = False, workers: int = 2,
            threads: int = 0) -> PredictReport:
    """Classify every image of `source` with the student of `export` (a run or export folder) and
    write one row per image to `out` (.parquet or .csv). See the module docstring."""
    import pyarrow as pa

    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be >= 1")
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: must be >= 1")
    out = _check_out(out)
    meta = load_export_meta(export)
    classes: list[str] = list(meta["classes"])
    size, fit = int(meta["preprocess"]["size"]), meta["preprocess"]["fit"]
    label_map = meta.get("label_map") or {}
    lookup = {c: i for i, c in enumerate(classes)}
    k = min(top_k, len(classes))
    run, model = load_backend(export, backend, int8, threads)
    entries = list_images(source)
    report = PredictReport(out=out, model=model, rows=len(entries))

    cols: dict[str, list] = {c: [] for c in ("id", "path", "label", "class", "probability", "error")}
    top_c = [[] for _ in range(k)]
    top_p = [[] for _ in range(k)]
    seen_ids: set[str] = set()
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(entries), desc="predict", unit="img") as bar:
        for start in range(0, len(entries), batch_size):
            chunk = entries[start:start + batch_size]
            decoded = list(pool.map(lambda e: _decode(e, size, fit), chunk))
            ok = [i for i, (_, pix, _) in enumerate(decoded) if pix is not None]
            logits = run(to_input(np.stack([decoded[i][1] for i in ok]))) if ok else np.zeros((0, len(classes)))
            if ok and logits.shape[1] != len(classes):
                raise PredictError(f"{find_export(export)}: the model has {logits.shape[1]} outputs but "
                                   f"{META} names {len(classes)} classes; re-export the run")
            probs = probabilities(logits)                                       # (n, K) float64
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]            # (n, k)
            pred = {i: j for j, i in enumerate(ok)}
            for i, (entry, (cid, _, err)) in enumerate(zip(chunk, decoded)):
                cols["id"].append(cid)
                cols["path"].append(entry.uri)
                cols["label"].append(entry.web_label)
                cols["error"].append(err)
                j = pred.get(i)
                if j is None:
                    report.errors[err.split(":", 1)[0]] += 1
                    for lst in (cols["class"], cols["probability"], *top_c, *top_p):
                        lst.append(None)
                    continue
                top = int(logits[j].argmax())
                cols["class"].append(classes[top])
                cols["probability"].append(float(probs[j, top]))
                for r in range(k):
                    top_c[r].append(classes[int(order[j, r])])
                    top_p[r].append(float(probs[j, order[j, r]]))
                name = label_map.get(entry.web_label, entry.web_label) if entry.web_label is not None else None
                if cid not in seen_ids and name in lookup:          # first occurrence: ingest's rule
                    report.labelled += 1
                    report.correct += int(top == lookup[name])
                seen_ids.add(cid)
            bar.update(len(chunk))

    data = {"id": pa.array(cols["id"], pa.string()), "path": pa.array(cols["path"], pa.string()),
            "label": pa.array(cols["label"], pa.string()), "class": pa.array(cols["class"], pa.string()),
            "probability": pa.array(cols["probability"], pa.float32())}
    for r in range(k):
        data[f"top{r + 1}_class"] = pa.array(top_c[r], pa.string())
        data[f"top{r + 1}_prob"] = pa.array(top_p[r], pa.float32())
    data["error"] = pa.array(cols["error"], pa.string())
    table = pa.table(data).replace_schema_metadata({"webkd_model": f"{meta.get('name', 'student')}: {model}"})
    if out.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        with atomic_path(out, suffix=".csv") as tmp:
            pacsv.write_csv(table, tmp)
    else:
        atomic_write_table(out, table)
    log.debug("predict: %d rows -> %s", report.rows, out)
    return report
