"""training/models.py, archs.py and zero_shot.py: the Outputs contract over the registry,
preprocessing numerics and ONNX, checkpoints (safetensors / torch, weights_only), open_clip
zero-shot teachers, frozen teachers, fingerprints. Real images from the shared data; tiny or
small models only."""
from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from webkd.pipeline.config import ModelSpec, PreprocessSpec
from webkd.training import models as M
from webkd.training.archs import ARCHS
from webkd.training.zero_shot import OpenClipZeroShot

GREY = dict(channels=1, mean=[0.5], std=[0.5])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one intra-op thread


def _rgb01(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def real32(pacs32) -> torch.Tensor:
    """Four real PACS images (one per domain), 32 px."""
    idx = [int(np.flatnonzero(pacs32.domains == d)[5]) for d in range(4)]
    return _rgb01(pacs32.images[idx])


@pytest.fixture(scope="module")
def real28(clothing) -> torch.Tensor:
    """Four real clothing photos, Lanczos-resized from 64 to 28 px."""
    imgs = [np.asarray(Image.fromarray(clothing.images[i]).resize((28, 28), Image.LANCZOS)) for i in (0, 500, 1500, 3000)]
    return _rgb01(np.stack(imgs))


@pytest.fixture(scope="module")
def real64(clothing) -> torch.Tensor:
    return _rgb01(clothing.images[[10, 900, 2000]])


# --------------------------------------------------------------------------------------------
# Outputs contract, driven by the registry
# --------------------------------------------------------------------------------------------
def _check_outputs(model: nn.Module, x: torch.Tensor, k: int) -> M.Outputs:
    model.eval()
    with torch.no_grad():
        out = model(x)
    b = len(x)
    assert isinstance(out, M.Outputs)
    assert out.logits.shape == (b, k) and model.num_classes == k
    assert out.embedding.shape == (b, model.embed_dim)
    assert len(out.features) == len(model.feature_channels) >= 1
    for f, c in zip(out.features, model.feature_channels):
        assert f.dim() == 4 and f.shape[:2] == (b, c)
    assert isinstance(model.classifier, nn.Linear)
    torch.testing.assert_close(model.classifier(out.embedding), out.logits, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.logits).all()
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("size", [28, 32])
def test_project_archs_outputs_contract(arch, size, real28, real32):
    x = real28 if size == 28 else real32
    for pre in (PreprocessSpec(size=size), PreprocessSpec(size=size, **GREY)):
        model = M.build_model(ModelSpec(name=arch, preprocess=pre), num_classes=7)
        assert isinstance(model, M.StagedNet) and isinstance(model.stages, nn.ModuleList)
        out = _check_outputs(model, x, 7)
        # embedding is exactly the GAP of the last spatial map (the KD^3 alignment relies on it)
        torch.testing.assert_close(out.embedding, out.features[-1].mean((2, 3)))
        assert out.features[-1].shape[-1] > 1, "last stage map must stay spatial at 28/32 px"
    # and a model made for 32 px takes 28 px input through its own resize
    model = M.build_model(ModelSpec(name=arch, preprocess=PreprocessSpec(size=32)), num_classes=7)
    _check_outputs(model, real28, 7)


def test_project_arch_sizes():
    n = {a: M.count_parameters(M.build_model(ModelSpec(name=a), num_classes=10)) for a in ARCHS}
    assert n["cnn_tiny"] < 5_000
    assert 80_000 <= n["cnn_small"] <= 150_000
    fm = M.count_parameters(M.build_model(ModelSpec(name="cnn_fmnist", preprocess=PreprocessSpec(size=28, **GREY)), 10))
    assert 250_000 <= fm <= 1_000_000
    wide = M.build_model(ModelSpec(name="resnet_narrow", kwargs={"width": 32}), num_classes=10)
    assert len(wide.stages) == 4 and wide.feature_channels == [32, 64, 128, 256]
    assert M.count_parameters(wide) > 3 * n["resnet_narrow"]
    with pytest.raises(M.ModelLoadError, match="known: cnn_tiny"):
        M.build_model(ModelSpec(name="no_such_net"), 10)
    with pytest.raises(M.ModelLoadError, match="bad kwargs"):
        M.build_model(ModelSpec(name="cnn_small", kwargs={"depth": 3}), 10)


ADAPTERS = [("torchvision", "resnet18"), ("torchvision", "resnet34"), ("torchvision", "resnet50"),
            ("torchvision", "mobilenet_v3_small"), ("torchvision", "mobilenet_v3_large"),
            ("timm", "resnet18"), ("timm", "mobilenetv3_small_100")]


def _native(library: str, name: str, k: int) -> nn.Module:
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=k)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=k)


@pytest.mark.parametrize("library,name", ADAPTERS)
def test_adapters_outputs_contract_and_library_checkpoint(library, name, tmp_path, real28, real32):
    """The adapter honours Outputs at 28 and 32 px; a checkpoint of the plain library model
    (`conv1.weight`, `fc.weight`, ...) loads into it, and its logits are the library model's own
    logits on the preprocessed input."""
    torch.manual_seed(1)
    native = _native(library, name, 5).eval()
    path = tmp_path / "native.pt"
    torch.save(native.state_dict(), path)
    spec = ModelSpec(library=library, name=name, weights=str(path), preprocess=PreprocessSpec(size=32))
    model = M.build_model(spec, num_classes=5)
    for x in (real28, real32):
        out = _check_outputs(model, x, 5)
    with torch.no_grad():
        ref = native(model.preprocess(real32))
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-5)
    if "resnet" in name:  # staged like the project nets, so MixSKD can copy later stages
        assert isinstance(model, M.StagedNet) and len(model.stages) == 4
        torch.testing.assert_close(out.embedding, out.features[-1].mean((2, 3)))


def test_staged_forward_from_reruns_later_stages(real32):
    """MixSKD's use: deep-copied later stages re-run from an intermediate map."""
    model = M.build_model(ModelSpec(name="resnet_narrow"), num_classes=7).eval()
    with torch.no_grad():
        full = model(real32)
        h = model.forward_stem(real32)
        maps = model.forward_stages(h, 0, 2)
        tail = model.forward_from(2, maps[-1])
        branch = copy.deepcopy(nn.Sequential(*model.stages[2:]))
        a = branch(maps[-1])
    torch.testing.assert_close(tail.logits, full.logits)
    assert len(tail.features) == 2
    torch.testing.assert_close(a, full.features[-1])


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 28, 32, 45])
def test_preprocess_resize_matches_torch_antialias(size, real64, real28):
    pre = M.Preprocess(PreprocessSpec(size=size, mean=[0.0], std=[1.0]))
    for x in (real64, real28):
        ref = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(pre(x), ref, rtol=0, atol=2e-5)


def test_preprocess_grey_invert_normalise(real64, clothing):
    x = real64
    grey = M.Preprocess(PreprocessSpec(size=64, channels=1, mean=[0.0], std=[1.0]))(x)
    assert grey.shape == (3, 1, 64, 64)
    # ITU-R 601 luma, as Pillow's convert("L") (which rounds to uint8)
    pil = np.stack([np.asarray(Image.fromarray(clothing.images[i]).convert("L")) for i in (10, 900, 2000)])
    assert np.abs(grey[:, 0].numpy() * 255 - pil).max() <= 1.0
    inv = M.Preprocess(PreprocessSpec(size=64, channels=1, invert=True, mean=[0.0], std=[1.0]))(x)
    torch.testing.assert_close(inv, 1.0 - grey)
    norm = M.Preprocess(PreprocessSpec(size=64, channels=1, invert=True, mean=[0.2860], std=[0.3530]))(x)
    torch.testing.assert_close(norm, (1.0 - grey - 0.2860) / 0.3530)
    rgb = M.Preprocess(PreprocessSpec(size=64, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0]))(x)
    want = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb, want)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        M.Preprocess(PreprocessSpec())(x[:, :1])


def test_preprocess_and_model_export_to_onnx_opset18_any_size(tmp_path, real32):
    """cnn_tiny with a grey, inverted, down-resizing preprocess exports to ONNX opset 18 with a
    dynamic height and width: the resize is one Resize(antialias=1) in the graph, and onnxruntime
    gives the torch logits and embedding at the export size and at other sizes."""
    import onnx
    import onnxruntime as ort

    model = M.build_model(ModelSpec(name="cnn_tiny", preprocess=PreprocessSpec(size=16, invert=True, **GREY)), 4)

    class Export(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            out = self.m(x)
            return out.logits, out.embedding

    wrapper = Export(model).eval()
    path = tmp_path / "tiny.onnx"
    dims = ({0: torch.export.Dim("batch", max=64), 2: torch.export.Dim("h", min=2, max=1024),
             3: torch.export.Dim("w", min=2, max=1024)},)
    torch.onnx.export(wrapper, (real32,), opset_version=18, dynamo=True, dynamic_shapes=dims,
                      input_names=["rgb"], output_names=["logits", "embedding"]).save(str(path))
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    resizes = [n for n in proto.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 1 and {a.name: a.i for a in resizes[0].attribute}.get("antialias") == 1
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (real32, F.interpolate(real32, size=(48, 40), mode="nearest"), real32[:3, :, 5:25, 2:30]):
        logits, emb = sess.run(None, {"rgb": x.contiguous().numpy()})
        with torch.no_grad():
            ref = model.eval()(x)
        np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(emb, ref.embedding.numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# teachers from checkpoints
# --------------------------------------------------------------------------------------------
_EXECUTED: list[str] = []


def _payload() -> str:
    _EXECUTED.append("ran")
    return "pwned"


class _Evil:
    """Unpickling this calls _payload(): torch.load(weights_only=False) would run it."""

    def __reduce__(self):
        return (_payload, ())


def _tiny_spec(**kw) -> ModelSpec:
    return ModelSpec(name="cnn_tiny", preprocess=PreprocessSpec(size=32), **kw)


def test_teacher_from_checkpoint_safetensors_and_pt(tmp_path, real32):
    torch.manual_seed(3)
    src = M.build_model(_tiny_spec(), 6).eval()
    src(real32)  # keep BN stats at init; eval forward only
    st = M.save_weights(src, tmp_path / "t.safetensors")
    pt = tmp_path / "t.pt"
    torch.save(src.state_dict(), pt)
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, nested)
    with torch.no_grad():
        ref = src(real32)
        for path in (st, pt, nested):
            model = M.build_model(_tiny_spec(weights=str(path)), 6).eval()
            out = model(real32)
            assert torch.equal(out.logits, ref.logits) and torch.equal(out.embedding, ref.embedding)
            assert M.fingerprint(model, model.spec) == M.fingerprint(src, src.spec)
    fresh = M.build_model(_tiny_spec(), 6)
    assert M.fingerprint(fresh, fresh.spec) != M.fingerprint(src, src.spec)


def test_checkpoint_errors_name_the_keys(tmp_path):
    src = M.build_model(_tiny_spec(), 6)
    sd = src.state_dict()
    sd["stem.0.weight_renamed"] = sd.pop("stem.0.weight")
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(M.ModelLoadError) as err:
        M.build_model(_tiny_spec(weights=str(bad)), 6)
    assert "missing keys: stem.0.weight" in str(err.value) and "stem.0.weight_renamed" in str(err.value)
    other_k = tmp_path / "k9.safetensors"
    M.save_weights(M.build_model(_tiny_spec(), 9), other_k)
    with pytest.raises(M.ModelLoadError, match=r"classifier.weight: file \(9, 16\) vs model \(6, 16\)"):
        M.build_model(_tiny_spec(weights=str(other_k)), 6)
    with pytest.raises(M.ModelLoadError, match="weights file not found"):
        M.build_model(_tiny_spec(weights=str(tmp_path / "nope.pt")), 6)


def test_checkpoint_pickle_with_objects_is_refused(tmp_path):
    src = M.build_model(_tiny_spec(), 6)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": src.state_dict(), "extra": _Evil()}, path)
    with pytest.raises(M.ModelLoadError, match=r"weights_only=True"):
        M.build_model(_tiny_spec(weights=str(path)), 6)
    assert _EXECUTED == [], "the pickle's code ran: weights were not loaded with weights_only=True"


# --------------------------------------------------------------------------------------------
# open_clip zero-shot teacher
# --------------------------------------------------------------------------------------------
TINY_CLIP = "webkd-test-tiny-clip"
CLASSES = ["dog", "elephant", "guitar"]


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory) -> str:
    """A tiny open_clip config registered like open_clip's own tests do (a JSON + add_model_config)."""
    import open_clip

    d = tmp_path_factory.mktemp("clip_cfg")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_CLIP}.json")
    return TINY_CLIP


def test_open_clip_random_init_offline(tiny_clip_config, real28):
    spec = ModelSpec(library="open_clip", name=tiny_clip_config, pretrained=None)
    model = M.build_model(spec, num_classes=3, class_names=CLASSES)
    assert isinstance(model, OpenClipZeroShot)
    assert model.preprocess.spec.size == 32 and model.preprocess.spec.mean[0] == pytest.approx(0.48145466)
    out = _check_outputs(model, real28, 3)
    torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(len(real28)))
    assert len(out.features) == 1 and out.features[0].shape == (len(real28), 32, 1, 1)
    with pytest.raises(M.ModelLoadError, match="class_names"):
        M.build_model(spec, num_classes=3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_local_checkpoint_matches_open_clip_zero_shot(tiny_clip_config, tmp_path, real32, suffix):
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    torch.manual_seed(4)
    clip = open_clip.create_model(tiny_clip_config, pretrained=None).eval()
    path = tmp_path / f"tiny_clip{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    else:
        torch.save(clip.state_dict(), path)
    templates = ["a photo of a {}.", "a drawing of the {}."]
    spec = ModelSpec(library="open_clip", name=tiny_clip_config, pretrained=str(path), prompts=templates)
    model = M.build_model(spec, num_classes=3, class_names=CLASSES).eval()
    with torch.no_grad():
        w = build_zero_shot_classifier(clip, open_clip.get_tokenizer(tiny_clip_config), CLASSES, templates)  # (D, K)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        img = clip.encode_image((real32 - mean) / std, normalize=True)
        ref = clip.logit_scale.exp() * img @ w
        out = model(real32)
        again_model = M.build_model(spec, num_classes=3, class_names=CLASSES).eval()
        again = again_model(real32)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.logits, again.logits)
    assert M.fingerprint(model, spec) == M.fingerprint(again_model, spec)


def test_open_clip_hub_tag_offline_fails_fast_with_instructions(monkeypatch, tiny_clip_config):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(library="open_clip", name="ViT-B-32", pretrained="laion2b_s34b_b79k")
    t0 = time.monotonic()
    with pytest.raises(M.ModelLoadError) as err:
        M.build_model(spec, num_classes=3, class_names=CLASSES)
    assert time.monotonic() - t0 < 5.0
    msg = str(err.value)
    assert "offline" in msg and "pretrained: /path/to/open_clip_model.safetensors" in msg
    assert "machine with internet" in msg and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg
    with pytest.raises(M.ModelLoadError, match="neither a local file nor a known tag"):
        M.build_model(ModelSpec(library="open_clip", name=tiny_clip_config, pretrained="no_such_tag"), 3, CLASSES)
    with pytest.raises(M.ModelLoadError, match="checkpoint file not found"):
        M.build_model(ModelSpec(library="open_clip", name=tiny_clip_config, pretrained="/nope/model.safetensors"),
                      3, CLASSES)


# --------------------------------------------------------------------------------------------
# frozen teachers and fingerprints
# --------------------------------------------------------------------------------------------
def test_frozen_teacher_stays_eval_without_grads(real32):
    teacher = M.freeze(M.build_model(ModelSpec(name="cnn_small"), 7))
    student = M.build_model(ModelSpec(name="cnn_tiny"), 7)
    holder = nn.ModuleDict({"student": student, "teacher": teacher})
    holder.train()
    teacher.train()
    assert student.training and all(m.training for m in student.modules())
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = teacher(real32)
    assert not out.logits.requires_grad
    for k, v in teacher.state_dict().items():  # BN running stats untouched by a "training" forward
        assert torch.equal(v, stats[k]), k
    # the frozen copy MixSKD/KD3 may deep-copy keeps the behaviour
    clone = copy.deepcopy(teacher)
    clone.train()
    assert not clone.training


def test_fingerprint_tracks_weights_and_preprocessing():
    torch.manual_seed(5)
    a = M.build_model(_tiny_spec(), 4)
    b = copy.deepcopy(a)
    assert M.fingerprint(a, a.spec) == M.fingerprint(b, b.spec)
    with torch.no_grad():
        b.classifier.bias[0] += 1e-3
    assert M.fingerprint(a, a.spec) != M.fingerprint(b, b.spec)
    inv_spec = ModelSpec(name="cnn_tiny", preprocess=PreprocessSpec(size=32, invert=True))
    c = M.build_model(inv_spec, 4)
    c.load_state_dict(a.state_dict())
    assert M.fingerprint(c, inv_spec) != M.fingerprint(a, a.spec)


def test_weights_round_trip_helpers(tmp_path, real32):
    a = M.build_model(ModelSpec(name="cnn_small"), 3).eval()
    p = M.save_weights(a, tmp_path / "w" / "a.safetensors")
    b = M.load_weights(M.build_model(ModelSpec(name="cnn_small"), 3), p).eval()
    with torch.no_grad():
        assert torch.equal(a(real32).logits, b(real32).logits)
    assert M.count_parameters(M.freeze(b), trainable_only=True) == 0
    assert os.path.getsize(p) > 4 * M.count_parameters(a)
