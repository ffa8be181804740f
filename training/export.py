"""Export the compact student: safetensors + JSON metadata, ONNX checked with onnxruntime,
and a Markdown model card.

What is exported is the *deployed* student (`Method.deploy`): for KD^3 that includes the
projector and the teacher's classifier; training scaffolding (heads, branches, projectors of
other methods) is not. The exported module (and student.onnx) takes float RGB in [0, 1],
`(B, 3, H, W)` at any H, W, and applies its own preprocessing (resize included), so users feed
decoded images and nothing else. `load_student` and `warm_start` hand the rebuilding to the
method (`Method.load_deployed`, `Method.load_deployed_state`).
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from webkd.pipeline.config import ModelSpec
from webkd.pipeline.paths import STUDENT_PREDICTIONS
from webkd.pipeline.storage import atomic_path, atomic_write_json, atomic_write_table, atomic_write_text, read_json
from webkd.training.methods import METHODS
from webkd.training.models import build_model, count_parameters

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "student.safetensors"
META = "student.json"
ONNX = "student.onnx"
CARD = "model_card.md"


@dataclass
class ExportResult:
    export_dir: Path
    files: list[Path]
    parameters: int
    onnx_max_abs_diff: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def save_export(model: nn.Module, export_dir: str | Path, metadata: dict[str, Any], sample: torch.Tensor,
                onnx: bool = True, opset: int = 18, atol: float = 1e-4) -> ExportResult:
    """Write weights, metadata and (optionally) ONNX; the ONNX graph must reproduce the torch
    logits on `sample` within `atol` or the export fails."""
    from safetensors.torch import save_file

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    sample = sample.cpu().float()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(export_dir / WEIGHTS, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    params = count_parameters(model)
    meta = {"format_version": FORMAT_VERSION, "parameters": params,
            "input": {"layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0], "channels": "RGB",
                      "size": int(sample.shape[-1])},
            **metadata}
    files = [export_dir / WEIGHTS]
    diff = None
    if onnx:
        diff = export_onnx(model, export_dir / ONNX, sample, opset=opset, atol=atol)
        meta["onnx"] = {"file": ONNX, "opset": opset, "max_abs_diff": diff, "input": "image", "output": "logits"}
        files.append(export_dir / ONNX)
    atomic_write_json(export_dir / META, meta)
    files.append(export_dir / META)
    return ExportResult(export_dir=export_dir, files=files, parameters=params, onnx_max_abs_diff=diff)


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor, opset: int = 18, atol: float = 1e-4) -> float:
    """torch.onnx.export (dynamo exporter) with a dynamic batch, height and width (the model
    resizes to its own input size), then an onnxruntime parity check on `sample`."""
    import onnx
    import onnxruntime as ort

    model = model.eval()
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter logs every pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim("height", min=2, max=8192),
            3: torch.export.Dim("width", min=2, max=8192)}
    with torch.no_grad():
        program = torch.onnx.export(model, (sample[:2],), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=(dims,), opset_version=opset, dynamo=True,
                                    verbose=False)
    with atomic_path(path, suffix=".onnx") as tmp:
        program.save(str(tmp))
        onnx.checker.check_model(str(tmp))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(sample).numpy()
    got = session.run(["logits"], {"image": sample.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if not np.isfinite(diff) or diff > atol:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX parity check failed: max |onnx - torch| = {diff:.3g} > {atol}")
    log.info("ONNX export %s: max abs diff %.2e on %d images", path, diff, len(sample))
    return diff


def save_student_predictions(export_dir: str | Path, ids: list[str], logits: np.ndarray, source: str) -> Path:
    """`student_predictions.parquet` in the export folder: the exported student's top-1 class
    and its probability for every pool image (id-keyed: the review page shows it per image).
    `source` names the student (the run and version) in the file's metadata."""
    import pyarrow as pa

    z = np.asarray(logits, np.float64)                                    # (N, K)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    table = pa.table({"id": pa.array([str(i) for i in ids], pa.string()),
                      "student_pred": pa.array(p.argmax(1).astype(np.int32), pa.int32()),
                      "student_conf": pa.array(p.max(1).astype(np.float32), pa.float32())})
    path = Path(export_dir) / STUDENT_PREDICTIONS
    atomic_write_table(path, table.replace_schema_metadata({"webkd_source": source}))
    return path


def _weights(export_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(export_dir / WEIGHTS))


def load_student(export_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the deployed student from an export folder (metadata + safetensors): the method
    class whose `deploy_head` the metadata names builds the module (`Method.load_deployed`)."""
    export_dir = Path(export_dir)
    meta = read_json(export_dir / META)
    if meta is None:
        raise FileNotFoundError(f"{export_dir / META} not found: not an export folder")
    spec = ModelSpec.model_validate(meta["student_spec"])
    spec = spec.model_copy(update={"weights": None})
    student = build_model(spec, num_classes=meta["student_num_classes"], class_names=meta.get("classes"))
    head = meta["deploy"]["head"]
    owner = next((cls for cls in METHODS.values() if cls.deploy_head == head), None)
    if owner is None:
        raise ValueError(f"unknown deployed head {head!r} in {export_dir / META}")
    model = owner.load_deployed(student, meta)
    missing, unexpected = model.load_state_dict(_weights(export_dir), strict=False)
    if missing or unexpected:
        raise ValueError(f"export weights do not match the rebuilt model: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def warm_start(student: nn.Module, method: nn.Module, source: str | Path) -> None:
    """Initialise from a previous export folder: the deployed student's weights, and the
    method's own deployed parts (KD^3's projector) via `Method.load_deployed_state`."""
    src = Path(source)
    if not (src / WEIGHTS).is_file():
        raise FileNotFoundError(f"train.warm_start={source}: expected an export folder with {WEIGHTS}")
    method.load_deployed_state(student, _weights(src))
    log.info("warm start from %s", src)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_model_card(export_dir: str | Path, meta: dict[str, Any], metrics: dict[str, Any],
                     lineage: dict[str, Any], command: str) -> Path:
    """Markdown model card: what it is, metrics, size, data lineage, how it was made.

    `lineage` holds the run's counts as `selection.counts.count_run` defines them (pool,
    quarantined, near_duplicates, validation, validation_scored, kept, rejected, per_class) and
    their lines (`query_shares`: in-class vs off-class queries; `collapsed`: one per class that
    lost its kept images)."""
    export_dir = Path(export_dir)
    classes = meta.get("classes", [])
    lines = [
        f"# Model card: {meta.get('name', 'student')}",
        "",
        f"Compact student distilled with **{meta.get('method')}** from "
        f"{', '.join(meta.get('teachers', [])) or 'no teacher'} on curated web images.",
        "",
        "## Model",
        "",
        f"- architecture: `{meta['student_spec']['library']}:{meta['student_spec']['name']}` "
        f"(deployed head: {meta['deploy']['head']})",
        f"- parameters: {meta.get('parameters', 0):,}",
        f"- input: float RGB in [0, 1], NCHW, {meta['input']['size']}x{meta['input']['size']} "
        f"(preprocessing inside the model: {json.dumps(meta['student_spec'].get('preprocess', {}))})",
        f"- classes ({len(classes)}): {', '.join(classes)}",
        f"- teacher fingerprint(s): {', '.join(meta.get('teacher_fingerprints', [])) or '-'}",
        f"- files: `{WEIGHTS}`, `{META}`" + (f", `{ONNX}` (opset {meta['onnx']['opset']}, onnxruntime parity "
                                               f"max abs diff {meta['onnx']['max_abs_diff']:.1e})" if "onnx" in meta else ""),
        "",
        "## Metrics",
        "",
        _table([[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in metrics.items()], ["metric", "value"]),
        "",
        "Checkpoint chosen on the validation split; test metrics (if any) were read once at the end.",
        "",
        "## Data lineage",
        "",
        f"- pool: {lineage.get('pool', '?')} records ({lineage.get('near_duplicates', 0)} near duplicates, "
        f"{lineage.get('validation', 0)} held out for validation, {lineage.get('validation_scored', '?')} of them "
        f"scored); {lineage.get('quarantined', 0)} quarantined at ingest",
        f"- sources: {', '.join(lineage.get('sources', [])) or '-'}",
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
    lines += ["## How it was made", "", "```", command, "```", "",
              f"Created {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node() or 'host'} "
              f"(torch {torch.__version__}).", ""]
    path = export_dir / CARD
    atomic_write_text(path, "\n".join(lines))
    return path
