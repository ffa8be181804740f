"""Export the compact student: safetensors + JSON metadata, ONNX checked with onnxruntime (its
`metadata_props` carry the class names, the preprocessing and the teacher fingerprints), an
optional int8 ONNX (onnxruntime static quantization), and the model card (training/card.py).

What is exported is the *deployed* student (`Method.deploy`): for KD^3 that includes the
projector and the teacher's classifier; training scaffolding (heads, branches, projectors of
other methods) is not. The exported module (and student.onnx) takes float RGB in [0, 1],
`(B, 3, H, W)` at any H, W, and applies its own preprocessing (resize included), so users feed
decoded images and nothing else. What comes before the model (`preprocess` in student.json and
in the ONNX metadata: Pillow decode, EXIF transpose, RGB, the pixel cache's square fit and size,
/ 255) is `pixel_preprocessing`; `webkd predict` (training/predict.py) applies exactly that. `load_student` and `warm_start` hand the rebuilding to the
method (`Method.load_deployed`, `Method.load_deployed_state`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from webkd.pipeline.config import ModelSpec
from webkd.pipeline.paths import STUDENT_PREDICTIONS
from webkd.pipeline.storage import atomic_path, atomic_write_json, atomic_write_table, read_json
from webkd.training.methods import METHODS
from webkd.training.models import build_model, count_parameters

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "student.safetensors"
META = "student.json"
ONNX = "student.onnx"
ONNX_INT8 = "student.int8.onnx"
CARD = "model_card.md"
EXAMPLE = "example.png"     # one pool image at the input size: the model card's snippets read it


def pixel_preprocessing(size: int, fit: str = "squash", model: dict[str, Any] | None = None) -> dict[str, Any]:
    """What turns an image file into the exported model's input, as the pixel cache does it
    (`pipeline.ingest` decode, `pipeline.features.fit_square`, `training.loop.to_tensor`).
    `inside_model` (the student's mean/std/resize) is informational: the model applies it."""
    return {"decode": "pillow, EXIF transpose, RGB (transparency on white)", "fit": fit, "size": int(size),
            "resample": "lanczos", "scale": "uint8 / 255 -> float32 [0, 1]", "layout": "NCHW",
            "inside_model": model or {}}


def onnx_properties(meta: dict[str, Any]) -> dict[str, str]:
    """The ONNX `metadata_props` of an export (strings; JSON for lists and dicts)."""
    return {"name": str(meta.get("name", "student")), "classes": json.dumps(list(meta.get("classes", []))),
            "preprocess": json.dumps(meta.get("preprocess", {}), sort_keys=True),
            "teacher_fingerprint": ",".join(meta.get("teacher_fingerprints", [])),
            "teachers": json.dumps(list(meta.get("teachers", []))), "method": str(meta.get("method", "")),
            "webkd_format_version": str(FORMAT_VERSION)}


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
    meta.setdefault("preprocess", pixel_preprocessing(int(sample.shape[-1])))
    files = [export_dir / WEIGHTS]
    diff = None
    if onnx:
        diff = export_onnx(model, export_dir / ONNX, sample, opset=opset, atol=atol, properties=onnx_properties(meta))
        meta["onnx"] = {"file": ONNX, "opset": opset, "max_abs_diff": diff, "input": "image", "output": "logits"}
        files.append(export_dir / ONNX)
    else:   # a previous export's graph would be another student under this one's metadata
        for name in (ONNX, ONNX_INT8):
            (export_dir / name).unlink(missing_ok=True)
    atomic_write_json(export_dir / META, meta)
    files.append(export_dir / META)
    return ExportResult(export_dir=export_dir, files=files, parameters=params, onnx_max_abs_diff=diff)


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor, opset: int = 18, atol: float = 1e-4,
                properties: dict[str, str] | None = None) -> float:
    """torch.onnx.export (dynamo exporter) with a dynamic batch, height and width (the model
    resizes to its own input size), `properties` as the model's `metadata_props`, then an
    onnxruntime parity check on `sample`."""
    import onnx

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
        if properties:
            proto = onnx.load(str(tmp))
            onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **properties})
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
    session = onnx_session(path)
    with torch.no_grad():
        expected = model(sample).numpy()
    got = session.run(["logits"], {"image": sample.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if not np.isfinite(diff) or diff > atol:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX parity check failed: max |onnx - torch| = {diff:.3g} > {atol}")
    log.info("ONNX export %s: max abs diff %.2e on %d images", path, diff, len(sample))
    return diff


def onnx_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session of `path` (`threads` 0: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3                      # warnings about unused initializers etc. stay quiet
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) in [0, 1], the same numbers as `training.loop.to_tensor`."""
    x = np.ascontiguousarray(np.asarray(pixels).transpose(0, 3, 1, 2), dtype=np.float32)
    return x / np.float32(255.0)


def onnx_logits(session, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, K) float32 logits of uint8 (N, S, S, 3) pixels, as `training.loop.to_tensor` feeds torch."""
    out = [session.run(["logits"], {"image": _to_input(pixels[s:s + batch_size])})[0]
           for s in range(0, len(pixels), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def quantize_int8(export_dir: str | Path, calibration: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None = None,
                  batch_size: int = 32) -> dict[str, Any]:
    """`student.int8.onnx` from `student.onnx`: onnxruntime static quantization (QDQ, int8 weights,
    uint8 activations) calibrated on `calibration` (uint8 (N, S, S, 3), validation images), after
    onnxruntime's shape-inference pre-processing. Returns what student.json records: the file,
    its size ratio to the fp32 file and, with `test` (pixels, labels), the fp32 and int8 test
    accuracies through onnxruntime and their change (int8 - fp32)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from webkd.training.loop import accuracy

    export_dir = Path(export_dir)
    src, dst = export_dir / ONNX, export_dir / ONNX_INT8
    if not len(calibration):
        raise ValueError("int8 export: no validation images to calibrate on (data.val_fraction > 0 gives some)")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            s = next(self.starts, None)
            if s is None:
                return None
            return {"image": _to_input(calibration[s:s + batch_size])}

    quiet = logging.getLogger()                      # quantize_static warns on the root logger
    level = quiet.level
    with tempfile.TemporaryDirectory(dir=export_dir, prefix=".int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quiet.setLevel(logging.ERROR)
            try:
                quant_pre_process(str(src), str(pre))
            except Exception as exc:             # shape inference is an optimisation, not a requirement
                log.warning("int8: onnxruntime pre-processing failed (%s); quantizing the graph as exported", exc)
                pre = src
            with atomic_path(dst, suffix=".onnx") as out:
                quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                                weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        finally:
            quiet.setLevel(level)
    info: dict[str, Any] = {"file": ONNX_INT8, "calibration_images": int(len(calibration)),
                            "format": "QDQ, int8 weights, uint8 activations (onnxruntime quantize_static)",
                            "size_bytes": dst.stat().st_size, "fp32_size_bytes": src.stat().st_size,
                            "size_ratio": dst.stat().st_size / src.stat().st_size}
    if test is not None:
        pixels, labels = test
        fp32 = onnx_logits(onnx_session(src), pixels)
        int8 = onnx_logits(onnx_session(dst), pixels)
        info.update(test_acc_fp32=accuracy(fp32, labels), test_acc_int8=accuracy(int8, labels),
                    test_rows=int((np.asarray(labels) >= 0).sum()),
                    test_agreement=float((fp32.argmax(1) == int8.argmax(1)).mean()) if len(fp32) else float("nan"))
        info["test_acc_change"] = info["test_acc_int8"] - info["test_acc_fp32"]
    log.info("int8 export %s: %.2fx the fp32 size", dst, info["size_ratio"])
    return info


def save_example(export_dir: str | Path, pixels: np.ndarray) -> Path:
    """`example.png`: one uint8 (S, S, 3) pool image, the input of the model card's snippets."""
    from PIL import Image

    path = Path(export_dir) / EXAMPLE
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(tmp, format="PNG")
    return path


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax of (N, K) logits in float64 (the exported student's reported confidences)."""
    z = np.asarray(logits, np.float64).reshape(len(logits), -1)          # (N, K)
    p = np.exp(z - (z.max(1, keepdims=True) if z.size else 0.0))
    return p / p.sum(1, keepdims=True) if z.size else p


def save_student_predictions(export_dir: str | Path, ids: list[str], logits: np.ndarray, source: str) -> Path:
    """`student_predictions.parquet` in the export folder: the exported student's top-1 class
    and its probability for every pool image (id-keyed: the review page shows it per image).
    `source` names the student (the run and version) in the file's metadata."""
    import pyarrow as pa

    p = probabilities(logits)                                             # (N, K)
    table = pa.table({"id": pa.array([str(i) for i in ids], pa.string()),
                      "student_pred": pa.array(p.argmax(1).astype(np.int32), pa.int32()),
                      "student_conf": pa.array(p.max(1).astype(np.float32), pa.float32())})
    path = Path(export_dir) / STUDENT_PREDICTIONS
    atomic_write_table(path, table.replace_schema_metadata({"webkd_source": source}))
    return path


def _weights(export_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from webkd.training.prior import unwrap_state

    return unwrap_state(load_file(str(export_dir / WEIGHTS)))   # without a prior correction's offset


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
    from safetensors.torch import load_file

    from webkd.training.prior import PriorCorrected, unwrap_state

    model = owner.load_deployed(student, meta)
    state = load_file(str(export_dir / WEIGHTS))
    missing, unexpected = model.load_state_dict(unwrap_state(state), strict=False)
    if (meta.get("prior_correction") or {}).get("tau"):   # training/prior.py: logits + the stored offset
        model = PriorCorrected(model, state["logit_offset"])
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
