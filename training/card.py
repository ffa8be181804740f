"""The model card of an export folder (`model_card.md`), written with `huggingface_hub.ModelCard`.

YAML metadata (license, library, tags, datasets, metrics, base_model = the teacher(s), and a
`model-index` holding the test results as `EvalResult`s), then: how to use it (onnxruntime,
PyTorch and `webkd predict` snippets that run as written from inside the export folder, on the
`example.png` beside them), intended use and limitations, the model, numeric metrics, the int8
variant, data lineage (counts as `selection.counts` defines them), the curation settings and how
it was made. The card is portable: every path is shown by its file name (`portable`) and no host
name is written, so it can be published as it is.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from webkd.pipeline.report import pct
from webkd.pipeline.storage import atomic_write_text
from webkd.training.export import CARD, EXAMPLE, META, ONNX, ONNX_INT8, WEIGHTS

# metric key -> what the numeric table calls it (fractions, shown with pipeline.report.pct)
METRIC_NAMES = {
    "val_acc": "validation accuracy (web query labels)",
    "val_agreement": "validation top-1 agreement with the teacher",
    "teacher_val_acc": "teacher validation accuracy (web query labels)",
    "test_acc": "test accuracy",
    "teacher_test_acc": "teacher test accuracy",
    "val_balanced_agreement": "validation class-balanced agreement with the teacher",
    "test_acc_uncorrected": "test accuracy without the prior correction",
}
# an absolute path (or a URL's //host/path) after a start, space, '=', ':', quote or bracket
_ABSOLUTE = re.compile(r"(?:(?<=^)|(?<=[\s=:'\"(\[,]))~?/[^\s'\",)\]]+")


def portable(text: str) -> str:
    """`text` with every absolute path (and `~/...`, and a URL's `//host/path`) replaced by its
    last component: `folder:/data/web` -> `folder:web`, `run_dir=/tmp/r1` -> `run_dir=r1`."""
    def name(m: re.Match) -> str:
        path = m.group(0)
        if path.startswith("//"):                             # a URL: the host goes too
            path = "/" + path[2:].partition("/")[2]
        return PurePosixPath(path.rstrip("/")).name or "."
    return _ABSOLUTE.sub(name, str(text))


def _portable_tree(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _portable_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_portable_tree(v) for v in obj]
    return portable(obj) if isinstance(obj, str) else obj


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(float(v)) else float(v)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


_FIT_LINES = {   # pipeline.features.fit_square, spelled with Pillow for the snippet
    "squash": "image = image.resize((size, size), Image.Resampling.LANCZOS)",
    "crop": "image = ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)",
    "pad": "image = ImageOps.pad(image, (size, size), Image.Resampling.LANCZOS, color=(0, 0, 0))",
}


def onnx_snippet(fit: str, model_file: str = ONNX) -> str:
    """Python that classifies `example.png` with onnxruntime, from inside the export folder."""
    return f'''import json

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession("{model_file}", providers=["CPUExecutionProvider"])
props = session.get_modelmeta().custom_metadata_map      # classes, preprocess, teacher_fingerprint
classes = json.loads(props["classes"])
size = json.loads(props["preprocess"])["size"]

image = ImageOps.exif_transpose(Image.open("{EXAMPLE}")).convert("RGB")
{_FIT_LINES[fit]}   # fit: {fit}
x = np.ascontiguousarray(np.asarray(image, np.float32).transpose(2, 0, 1)[None]) / np.float32(255)
logits = session.run(["logits"], {{"image": x}})[0][0]          # (K,)
probs = np.exp(logits - logits.max())
probs /= probs.sum()
for k in probs.argsort()[::-1][:3]:
    print(f"{{classes[k]}}: {{probs[k]:.3f}}")'''


def torch_snippet() -> str:
    """Python that classifies `example.png` with the PyTorch student (needs webkd installed)."""
    return f'''import torch

from webkd.training.export import load_student
from webkd.training.predict import load_export_meta, load_image

meta = load_export_meta(".")
model = load_student(".")                                   # {META} + {WEIGHTS}
x = torch.from_numpy(load_image("{EXAMPLE}", meta["preprocess"]))[None]   # the training decode and fit
with torch.no_grad():
    probs = model(x).softmax(-1)[0]                         # (K,)
top = probs.topk(min(3, len(probs)))
for p, k in zip(top.values.tolist(), top.indices.tolist()):
    print(f"{{meta['classes'][k]}}: {{p:.3f}}")'''


def card_data(meta: dict[str, Any], metrics: dict[str, Any], lineage: dict[str, Any], license: str):
    """The card's YAML metadata (`huggingface_hub.ModelCardData`), `model-index` included."""
    from huggingface_hub import EvalResult, ModelCardData

    name = str(meta.get("name") or "student")
    test_name = portable(lineage.get("test_source") or "") or "test"
    results = []
    split, dataset = ("test", test_name) if _number(metrics.get("test_acc")) is not None else ("validation", "validation")
    for key, label in (("test_acc", "test accuracy"), ("val_acc", "validation accuracy (web query labels)")):
        v = _number(metrics.get(key))
        if v is not None and (key == "test_acc") == (split == "test"):
            results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder",
                                      dataset_name=dataset, dataset_split=split, metric_type="accuracy",
                                      metric_value=v, metric_name=label))
    int8 = meta.get("int8") or {}
    if split == "test" and _number(int8.get("test_acc_int8")) is not None:
        results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=dataset,
                                  dataset_split="test", metric_type="accuracy", metric_value=float(int8["test_acc_int8"]),
                                  metric_name=f"test accuracy ({ONNX_INT8})"))
    teachers = [str(t.get("name")) for t in meta.get("teacher_models", [])] or list(meta.get("teachers", []))
    tags = ["image-classification", "knowledge-distillation", "webkd", str(meta.get("method", ""))]
    tags += ["onnx"] if "onnx" in meta else []
    tags += ["int8"] if int8 else []
    return ModelCardData(
        model_name=name, license=license or "unknown", library_name="onnx" if "onnx" in meta else "pytorch",
        pipeline_tag="image-classification", tags=[t for t in tags if t],
        datasets=[portable(s) for s in lineage.get("sources", [])] or None, metrics=["accuracy"],
        base_model=(teachers[0] if len(teachers) == 1 else teachers) or None, eval_results=results or None)


def _how_to_use(meta: dict[str, Any]) -> list[str]:
    fit = (meta.get("preprocess") or {}).get("fit", "squash")
    lines = ["## How to use", "",
             f"Run these from inside this folder (`{EXAMPLE}` is one image of the training pool at the input size). "
             "The model takes float RGB in [0, 1], `(B, 3, H, W)`, and normalises and resizes inside; before it, "
             f"an image is decoded with Pillow (EXIF orientation applied, RGB), brought to a square by `{fit}` "
             "with Lanczos, and divided by 255, exactly as the training pixels were.", ""]
    if "onnx" in meta:
        lines += ["### onnxruntime", "", "```python", onnx_snippet(fit), "```", ""]
    lines += ["### PyTorch (with webkd installed)", "", "```python", torch_snippet(), "```", "",
              "### Command line", "",
              "A folder (query sub-folders are read as labels), a CSV/Parquet manifest or WebDataset shards; "
              "unreadable images get a row with the reason:", "",
              "```bash", "webkd predict . photos/ --out predictions.parquet --top-k 3", "```", ""]
    return lines


def _intended_use(meta: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    classes = meta.get("classes", [])
    lines = ["## Intended use and limitations", "",
             f"- Intended use: sorting images into these {len(classes)} classes ({', '.join(classes)}), as a "
             "small, fast stand-in for the teacher on a CPU or at the edge.",
             "- Every image gets one of these classes: it has no 'none of the above'. Out-of-scope images still "
             "get a confident-looking answer; filter on `probability` or keep a human in the loop.",
             "- Trained on web images found by search queries, whose labels are noisy and whose distribution "
             "(photo style, backgrounds, regions, people) follows what the search engine returned; expect errors "
             "and biases where that differs from yours. Curation kept what the teacher agreed with, so the "
             "student inherits the teacher's blind spots too.",
             "- Validate on your own data before relying on it. "
             + ("The test figure below is one labelled test source, read once after the checkpoint was chosen."
                if _number(metrics.get("test_acc")) is not None else "No test source was given: the figures below "
                "are validation figures on held-out web images (noisy labels)."),
             "- The web images' own licences were not checked by this pipeline; the card's `license` field is "
             "what `export.license` said.", ""]
    return lines


def write_model_card(export_dir: str | Path, meta: dict[str, Any], metrics: dict[str, Any],
                     lineage: dict[str, Any], command: str, license: str = "unknown") -> Path:
    """`model_card.md` in `export_dir` (see the module docstring).

    `lineage` holds the run's counts as `selection.counts.count_run` defines them (pool,
    quarantined, near_duplicates, validation, validation_scored, kept, rejected, per_class), their
    lines (`query_shares`: in-class vs off-class queries; `collapsed`: one per class that lost its
    kept images), `sources`, `test_source`, `pool_ids_sha256` and `curation` (the settings)."""
    from huggingface_hub import ModelCard

    export_dir = Path(export_dir)
    classes = meta.get("classes", [])
    teachers = meta.get("teacher_models") or [{"key": k} for k in meta.get("teachers", [])]
    spec = meta["student_spec"]
    pre = meta.get("preprocess") or {}
    files = [f"`{WEIGHTS}`", f"`{META}`"]
    if "onnx" in meta:
        files.append(f"`{ONNX}` (opset {meta['onnx']['opset']}, onnxruntime parity max abs diff "
                     f"{meta['onnx']['max_abs_diff']:.1e}; `metadata_props`: classes, preprocess, teacher_fingerprint)")
    if meta.get("int8"):
        files.append(f"`{ONNX_INT8}`")
    teacher_names = ", ".join("**" + portable(t.get("name") or t.get("key")) + "**" for t in teachers)
    lines = [f"# {meta.get('name', 'student')}", "",
             f"Compact image classifier ({len(classes)} classes) distilled with **{meta.get('method')}** from "
             f"{teacher_names or 'no teacher'} on curated web images, made with webkd.", ""]
    lines += _how_to_use(meta)
    lines += _intended_use(meta, metrics)
    lines += ["## Model", "",
              f"- architecture: `{spec['library']}:{spec['name']}` (deployed head: {meta['deploy']['head']})",
              f"- parameters: {meta.get('parameters', 0):,}",
              f"- input: float RGB in [0, 1], NCHW, {meta['input']['size']}x{meta['input']['size']} "
              f"(preprocessing inside the model: {json.dumps(spec.get('preprocess', {}))})",
              f"- before the model: {json.dumps({k: v for k, v in pre.items() if k != 'inside_model'})}",
              f"- classes ({len(classes)}): {', '.join(classes)}",
              "- teacher(s): " + ("; ".join(f"{t.get('key')}: `{t.get('library', '?')}:{portable(t.get('name', '?'))}`"
                                           + (f" pretrained `{portable(t['pretrained'])}`" if t.get("pretrained") else "")
                                           for t in teachers) or "-"),
              f"- teacher fingerprint(s): {', '.join(meta.get('teacher_fingerprints', [])) or '-'}",
              f"- files: {', '.join(files)}", ""]
    rows = [[METRIC_NAMES[k], pct(v)] for k in METRIC_NAMES if (v := _number(metrics.get(k))) is not None]
    lines += ["## Metrics", "", _table(rows, ["metric", "value"]), "",
              f"Checkpoint chosen on the validation split by `{metrics.get('val_metric') or '-'}` "
              f"(best epoch {metrics.get('best_epoch', '-')}); test metrics (if any) were read once at the end.", ""]
    prior = meta.get("prior_correction") or {}
    if prior:
        shares = ", ".join(f"{c} {100 * v:.1f}%" for c, v in zip(classes, prior["prior"]))
        lines += ["## Prior correction", "",
                  f"The deployed logits add tau (log target - log prior) with tau = {prior['tau']:g}, chosen on the "
                  "validation split's class-balanced agreement with the teacher (training/prior.py). The prior is the "
                  f"teacher's class mix over the images the student trained on: {shares}.", ""]
    int8 = meta.get("int8") or {}
    if int8:
        rows8 = [["file size, int8 / fp32", f"{int8['size_ratio']:.3f}"]]
        if _number(int8.get("test_acc_int8")) is not None:
            rows8 += [["test accuracy fp32 (onnxruntime)", pct(int8["test_acc_fp32"])],
                      ["test accuracy int8 (onnxruntime)", pct(int8["test_acc_int8"])],
                      ["test accuracy change, int8 - fp32 (points)", f"{100 * int8['test_acc_change']:+.2f}"],
                      ["top-1 agreement int8 vs fp32 on the test set", pct(int8["test_agreement"])]]
        lines += ["## Int8 variant", "",
                  f"`{ONNX_INT8}`: {int8['format']}, calibrated on {int8['calibration_images']} validation images. "
                  f"Use it in the snippets above by its file name, or `webkd predict . photos/ --int8`.", "",
                  _table(rows8, ["int8 measurement", "value"]), ""]
        if _number(int8.get("test_acc_int8")) is None:
            lines += ["No test source: the accuracy change was not measured.", ""]
    lines += [
        "## Data lineage", "",
        f"- pool: {lineage.get('pool', '?')} records ({lineage.get('near_duplicates', 0)} near duplicates, "
        f"{lineage.get('validation', 0)} held out for validation, {lineage.get('validation_scored', '?')} of them "
        f"scored); {lineage.get('quarantined', 0)} quarantined at ingest",
        f"- sources: {', '.join(portable(s) for s in lineage.get('sources', [])) or '-'}",
        f"- pool record ids (sha256 of the content, in manifest order) hash: `{lineage.get('pool_ids_sha256', '-')}`",
        f"- test source: {portable(lineage.get('test_source') or '-')}",
        *([f"- trained on: {meta['trained_on'].get('rows', '?')} pool rows (ids sha256 "
           f"{str(meta['trained_on'].get('ids_sha256', '-'))[:12]}, training config "
           f"{meta['trained_on'].get('config', '-')})"] if meta.get("trained_on") else []),
        f"- selection at the final epoch ({lineage.get('epoch', '?')}): kept {lineage.get('kept', '?')}, "
        f"rejected {lineage.get('rejected', '?')}, validation {lineage.get('validation', '?')} (never trained on)",
    ]
    if lineage.get("query_shares"):
        lines.append(f"- web queries (train rows): {lineage['query_shares']}")
    lines += [f"- warning: {line}" for line in lineage.get("collapsed") or []]
    lines.append("")
    per_class = lineage.get("per_class") or []
    if per_class:
        lines += [_table([[r["class"], r["kept"], r["rejected"], r.get("top_reason", "")] for r in per_class],
                         ["class (pseudo-label)", "kept", "rejected", "top rejection reason"]), ""]
    if lineage.get("curation"):
        lines += ["## Curation settings", "", "```yaml",
                  yaml.safe_dump(_portable_tree(lineage["curation"]), sort_keys=False).rstrip(), "```", ""]
    lines += ["## How it was made", "", "```bash", portable(command), "```", "",
              f"Created {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} with torch "
              f"{meta.get('torch_version', '?')}; config fingerprint `{meta.get('config_fingerprint', '-')}`, "
              f"student fingerprint `{meta.get('student_fingerprint', '-')}`. Paths are shown by file name.", ""]
    data = card_data(meta, metrics, lineage, license)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = export_dir / CARD
    atomic_write_text(path, str(card))
    return path
