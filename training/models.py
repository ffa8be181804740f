"""Model wrappers behind one `Outputs` contract: `StagedNet` over the project archs
(`training.archs`), torchvision/timm adapters, `build_model` (which hands open_clip specs to
`training.zero_shot`); weight loading; frozen teachers; encoder fingerprints.

Every wrapper takes float RGB in [0, 1], shape (B, 3, H, W) at any H, W, applies its own
`Preprocess` (resize, grey, inversion, background subtraction, mean/std) inside `forward`, and returns
`Outputs(logits (B, K), features [(B, C_l, H_l, W_l)] per stage, embedding (B, D))` with
`classifier(embedding) == logits`, so no distillation method needs forward hooks (KD^3 predicts
through the teacher's frozen linear layer; MixSKD re-runs later stages through `forward_from`).

Staged wrappers (`StagedNet`: project archs, torchvision ResNets/MobileNetV3, timm ResNets) keep
`forward = preprocess -> stem -> stages -> GAP -> pre_logits -> classifier`; other timm models go
through `timm`'s `forward_intermediates`; open_clip models become zero-shot classifiers from class
names and prompt templates (`training.zero_shot.OpenClipZeroShot`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from webkd.pipeline.config import ModelSpec, PreprocessSpec
from webkd.pipeline.storage import atomic_path
from webkd.training.archs import ARCHS

log = logging.getLogger(__name__)

LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights, as PIL's convert("L")


class ModelLoadError(RuntimeError):
    """A model or its weights cannot be built/loaded; the message says what to change."""


# --------------------------------------------------------------------------------------------
# the Outputs contract
# --------------------------------------------------------------------------------------------
@dataclass
class Outputs:
    """What every wrapper returns.

    logits:    (B, K) class scores.
    features:  per-stage maps (B, C_l, H_l, W_l), earliest first; `features[-1]` is the last
               stage's spatial map (open_clip: the embedding as a 1x1 map, a pooled-only deviation).
    embedding: (B, D), the input of `classifier` (GAP of `features[-1]`, then `pre_logits`).
    """

    logits: torch.Tensor
    features: list[torch.Tensor]
    embedding: torch.Tensor


# Lets torch.export / the dynamo ONNX exporter trace models that return Outputs.
torch.export.register_dataclass(Outputs, serialized_type_name="webkd.Outputs")


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) 1-D antialiased bilinear resampling matrix.

    The same triangle filter, support and border renormalisation as PyTorch's
    `F.interpolate(mode="bilinear", antialias=True, align_corners=False)` (which follows PIL):
    built in numpy so the resize exports to ONNX opset 17 as two MatMuls (opset 17's Resize has
    no antialias attribute) and gives the same numbers eagerly and exported.
    """
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = np.clip(1.0 - np.abs((j - center + 0.5) * invscale), 0.0, None)
        total = k.sum()
        w[i, lo:hi] = k / total if total > 0 else 0.0
    return w.astype(np.float32)


class Preprocess(nn.Module):
    """Float RGB [0, 1] (B, 3, H, W) at any size -> the model's input (B, C, S, S).

    Steps, in order: antialiased bilinear resize to `spec.size`; ITU-R 601 luma when
    `channels == 1`; `1 - x` when `invert`; with `background == "border"`, |x - b| where b is
    the median of the image's outer ring of `border_width` pixels per channel (the object comes
    out bright on black whatever the background: a white-on-black domain such as Fashion-MNIST
    is left unchanged, a photo on a grey or coloured backdrop is brought to it); then
    `(x - mean) / std`. Exports to ONNX (the resize is two matrix products with constant
    weights, see `resize_weights`).
    """

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        self.spec = spec
        c = spec.channels
        mean = spec.mean * c if len(spec.mean) == 1 else spec.mean
        std = spec.std * c if len(spec.std) == 1 else spec.std
        # not persistent: preprocessing is configuration, not weights (keeps state dicts portable)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA_601, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._mats: dict[tuple[int, int, str], torch.Tensor] = {}

    def _matrix(self, n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
        key = (n_in, n_out, str(like.device))
        m = self._mats.get(key)
        if m is None:
            m = torch.from_numpy(resize_weights(n_in, n_out)).to(like.device)
            self._mats[key] = m
        return m.to(like.dtype)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec.size
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if (h, w) == (s, s):
            return x
        rows = self._matrix(h, s, x)                    # (S, H)
        cols = self._matrix(w, s, x)                    # (S, W)
        x = torch.matmul(x, cols.t())                   # (B, C, H, S)
        return torch.matmul(rows, x)                    # (B, C, S, S)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected float RGB (B, 3, H, W) in [0, 1], got shape {tuple(x.shape)}")
        x = self.resize(x if x.is_floating_point() else x.float())   # (B, 3, S, S)
        if self.spec.channels == 1:
            x = (x * self.luma).sum(1, keepdim=True)    # (B, 1, S, S)
        if self.spec.invert:
            x = 1.0 - x
        if self.spec.background == "border":
            x = (x - self.border_level(x)).abs()        # (B, C, S, S)
        return (x - self.mean) / self.std               # (B, C, S, S)

    def border_level(self, x: torch.Tensor) -> torch.Tensor:
        """Median of the outer ring of `border_width` pixels, per image and channel: (B, C, 1, 1)."""
        w = self.spec.border_width
        ring = torch.cat([x[:, :, :w, :].flatten(2), x[:, :, -w:, :].flatten(2),
                          x[:, :, w:-w, :w].flatten(2), x[:, :, w:-w, -w:].flatten(2)], dim=2)  # (B, C, P)
        k = (ring.shape[2] - 1) // 2                    # the lower median, as torch.median; by sort:
        return ring.sort(dim=2).values[:, :, k:k + 1].unsqueeze(-1)  # ONNX has no median op

    def extra_repr(self) -> str:
        return self.spec.model_dump_json()


# --------------------------------------------------------------------------------------------
# staged networks
# --------------------------------------------------------------------------------------------
def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pool (B, C, H, W) -> (B, C); works at any spatial size (28 px and 32 px)."""
    return x.mean(dim=(2, 3))


class StagedNet(nn.Module):
    """preprocess -> stem -> stages -> GAP -> pre_logits -> classifier.

    `pre_logits` is Identity for every project arch and ResNet, so `embedding = GAP(features[-1])`
    exactly; torchvision MobileNetV3 keeps its Linear+Hardswish head there (embedding = that
    1024-d vector), because its classifier is not linear in the pooled map.
    MixSKD builds branches by deep-copying `stages[k:]` and re-running them with `forward_from`.
    """

    def __init__(self, spec: ModelSpec, preprocess: Preprocess, stem: nn.Module, stages: list[nn.Module],
                 classifier: nn.Linear, feature_channels: list[int], pre_logits: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.pre_logits = pre_logits if pre_logits is not None else nn.Identity()
        self.classifier = classifier
        self.feature_channels = list(feature_channels)
        self.num_classes = classifier.out_features
        self.embed_dim = classifier.in_features

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] (B, 3, H, W) -> stem output (B, C_0, H_0, W_0), the input of stage 0."""
        return self.stem(self.preprocess(x))

    def forward_stages(self, h: torch.Tensor, start: int = 0, end: int | None = None) -> list[torch.Tensor]:
        """Run stages[start:end] on `h` (the output of stage start-1, or of the stem)."""
        maps = []
        for stage in self.stages[start:end]:
            h = stage(h)
            maps.append(h)                              # (B, C_l, H_l, W_l)
        return maps

    def forward_head(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last map (B, C, H, W) -> (embedding (B, D), logits (B, K))."""
        embedding = self.pre_logits(gap(feature_map))  # (B, D)
        return embedding, self.classifier(embedding)    # (B, K)

    def forward_from(self, stage_idx: int, h: torch.Tensor) -> Outputs:
        """Outputs from stage `stage_idx` on; `features` holds only the maps of the stages run."""
        maps = self.forward_stages(h, stage_idx)
        embedding, logits = self.forward_head(maps[-1])
        return Outputs(logits=logits, features=maps, embedding=embedding)

    def forward(self, x: torch.Tensor) -> Outputs:
        return self.forward_from(0, self.forward_stem(x))


# --------------------------------------------------------------------------------------------
# adapters for torchvision and timm
# --------------------------------------------------------------------------------------------
def _replace_conv_in(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    return nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None)


def _probe_channels(model: nn.Module) -> list[int]:
    """Stage output channels, by one forward pass on zeros at the model's input size."""
    was_training = model.training
    model.eval()
    s = model.preprocess.spec.size
    with torch.no_grad():
        out = model(torch.zeros(2, 3, s, s))
    model.train(was_training)
    return [int(f.shape[1]) for f in out.features]


def _resnet_channels(net: nn.Module) -> list[int]:
    """Output channels of layer1..4 of a torchvision/timm ResNet (last BatchNorm of each layer)."""
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        bns = [m for m in layer[-1].modules() if isinstance(m, nn.BatchNorm2d)]
        out.append(int(bns[-1].num_features))
    return out


def _set_native(model: nn.Module, native: nn.Module | None) -> nn.Module:
    """Remember the library's own model (sharing its parameters) without registering it, so a
    checkpoint saved from plain torchvision/timm (`conv1.weight`, `fc.weight`) loads as well."""
    model.__dict__["_native"] = native
    return model


def _torchvision(spec: ModelSpec, num_classes: int, preprocess: Preprocess) -> nn.Module:
    import torchvision

    try:
        net = torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes, **spec.kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"torchvision cannot build model {spec.name!r} ({exc}); "
                             f"known: {', '.join(torchvision.models.list_models()[:20])}, ...") from None
    in_chans = preprocess.spec.channels
    if isinstance(net, torchvision.models.ResNet):
        if in_chans != 3:
            net.conv1 = _replace_conv_in(net.conv1, in_chans)
        model = StagedNet(spec, preprocess, nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
                          [net.layer1, net.layer2, net.layer3, net.layer4], net.fc, _resnet_channels(net))
    elif isinstance(net, torchvision.models.MobileNetV3):
        if in_chans != 3:
            net.features[0][0] = _replace_conv_in(net.features[0][0], in_chans)
        stem, stages = net.features[0], _group_by_resolution(net.features[0], list(net.features)[1:])
        model = StagedNet(spec, preprocess, stem, stages, net.classifier[-1], [],
                          pre_logits=nn.Sequential(*list(net.classifier)[:-1]))
    else:
        raise ModelLoadError(f"torchvision adapter supports ResNet and MobileNetV3 families, not {spec.name!r}; "
                             "use library: timm (any timm model) or a project arch")
    if not model.feature_channels:
        model.feature_channels = _probe_channels(model)
    return _set_native(model, net)


def _group_by_resolution(stem: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Split a flat block list into stages at every stride change (probe on a 64 px input)."""
    was = stem.training
    stem.eval()
    with torch.no_grad():
        h = stem(torch.zeros(1, stem[0].in_channels if isinstance(stem, nn.Sequential) else 3, 64, 64))
        groups: list[list[nn.Module]] = [[]]
        for b in blocks:
            b_was = b.training
            b.eval()
            out = b(h)
            b.train(b_was)
            if groups[-1] and out.shape[-1] != h.shape[-1]:
                groups.append([])
            groups[-1].append(b)
            h = out
    stem.train(was)
    return [nn.Sequential(*g) for g in groups if g]


class TimmNet(nn.Module):
    """Any timm model through `forward_intermediates`: features = its intermediates (NCHW),
    embedding = `forward_head(pre_logits=True)`, `classifier` = `get_classifier()` (a Linear)."""

    def __init__(self, spec: ModelSpec, preprocess: Preprocess, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.net = net
        clf = net.get_classifier()
        if not isinstance(clf, nn.Linear):
            raise ModelLoadError(f"timm model {spec.name!r} has a {type(clf).__name__} classifier; "
                                 "the Outputs contract needs an nn.Linear head (classifier(embedding) == logits)")
        self.num_classes = clf.out_features
        self.embed_dim = clf.in_features
        self.feature_channels: list[int] = []

    @property
    def classifier(self) -> nn.Linear:
        return self.net.get_classifier()

    def forward(self, x: torch.Tensor) -> Outputs:
        final, maps = self.net.forward_intermediates(self.preprocess(x))   # maps: [(B, C_l, H_l, W_l)]
        embedding = self.net.forward_head(final, pre_logits=True)         # (B, D)
        return Outputs(logits=self.classifier(embedding), features=list(maps), embedding=embedding)


def _timm(spec: ModelSpec, num_classes: int, preprocess: Preprocess) -> nn.Module:
    import timm
    from timm.models.resnet import ResNet as TimmResNet

    kwargs = dict(spec.kwargs)
    kwargs.pop("pretrained", None)  # weights only ever come from spec.weights (no network)
    try:
        net = timm.create_model(spec.name, pretrained=False, num_classes=num_classes,
                                in_chans=preprocess.spec.channels, **kwargs)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"timm cannot build {spec.name!r}: {exc}") from None
    if isinstance(net, TimmResNet):
        model: nn.Module = StagedNet(spec, preprocess, nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool),
                                     [net.layer1, net.layer2, net.layer3, net.layer4], net.fc, _resnet_channels(net))
    else:
        if not hasattr(net, "forward_intermediates"):
            raise ModelLoadError(f"timm model {spec.name!r} has no forward_intermediates(); pick another model")
        model = TimmNet(spec, preprocess, net)
        model.feature_channels = _probe_channels(model)
    return _set_native(model, net)


# --------------------------------------------------------------------------------------------
# building, weights
# --------------------------------------------------------------------------------------------
def build_model(spec: ModelSpec, num_classes: int | None, class_names: list[str] | None = None) -> nn.Module:
    """ModelSpec -> a wrapper returning Outputs; weights from `spec.weights` when given.

    `num_classes` is `len(data.classes)` (spec.num_classes wins when set). Weights never come from
    the network: project/torchvision/timm models start random unless `spec.weights` names a file;
    open_clip takes `spec.pretrained` (a tag, offline only when cached, or a local file).
    """
    k = spec.num_classes or num_classes
    if spec.library == "open_clip":
        if spec.weights:
            raise ModelLoadError("open_clip teachers load their checkpoint through `pretrained: <file>`, not `weights`")
        from webkd.training.zero_shot import build_zero_shot  # here: zero_shot imports Outputs/Preprocess from us

        return build_zero_shot(spec, class_names, k)
    if not k:
        raise ModelLoadError(f"model {spec.name!r}: num_classes is needed (data.classes or the spec's num_classes)")
    preprocess = Preprocess(spec.preprocess)
    if spec.library == "project":
        if spec.name not in ARCHS:
            raise ModelLoadError(f"unknown project arch {spec.name!r}; known: {', '.join(ARCHS)}")
        try:
            bb = ARCHS[spec.name](in_chans=spec.preprocess.channels, **spec.kwargs)
        except TypeError as exc:
            raise ModelLoadError(f"project arch {spec.name!r}: bad kwargs {spec.kwargs} ({exc})") from None
        model: nn.Module = StagedNet(spec, preprocess, bb.stem, bb.stages, nn.Linear(bb.channels[-1], k), bb.channels)
        _set_native(model, None)
    elif spec.library == "torchvision":
        model = _torchvision(spec, k, preprocess)
    elif spec.library == "timm":
        model = _timm(spec, k, preprocess)
    else:  # pragma: no cover - the config schema restricts library
        raise ModelLoadError(f"unknown library {spec.library!r}")
    if spec.weights:
        load_weights(model, spec.weights)
    return model


_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (`torch.load(weights_only=True)`).

    Accepts `{"state_dict" | "model": {...}}` nesting and strips `module.` (DataParallel) and
    `_orig_mod.` (torch.compile) prefixes. A pickle holding anything but tensors and plain
    containers is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for arbitrary objects, RuntimeError for junk
            raise ModelLoadError(
                f"{path}: refused by torch.load(weights_only=True): it is not a plain state dict of tensors "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Save weights with "
                f"torch.save(model.state_dict(), path) or as .safetensors") from None
    for _ in range(3):
        if isinstance(sd, dict):
            inner = next((sd[k] for k in _NESTED_KEYS if isinstance(sd.get(k), dict)), None)
            if inner is not None and not all(isinstance(v, torch.Tensor) for v in sd.values()):
                sd = inner
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"{path}: no state dict found (got {type(sd).__name__})")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ModelLoadError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _mismatch(target: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    own = target.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    return missing, unexpected, shapes


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weights file into a wrapper, strictly.

    Accepts the wrapper's own keys (`save_weights`) or, for torchvision/timm adapters, the plain
    library model's keys (`conv1.weight`, `fc.weight`, ...). Errors name the missing, unexpected
    and wrongly shaped keys.
    """
    sd = read_state_dict(path)
    targets = [model] + ([model.__dict__["_native"]] if model.__dict__.get("_native") is not None else [])
    reports = []
    for target in targets:
        missing, unexpected, shapes = _mismatch(target, sd)
        if not missing and not unexpected and not shapes:
            target.load_state_dict(sd, strict=True)
            log.info("loaded %d tensors from %s", len(sd), path)
            return model
        reports.append((len(missing) + len(unexpected) + len(shapes), missing, unexpected, shapes))
    _, missing, unexpected, shapes = min(reports, key=lambda r: r[0])

    def head(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {head(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {head(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {head(shapes)}")
    name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
    raise ModelLoadError(f"{path} does not fit model {name!r}: " + "; ".join(parts))


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path


# --------------------------------------------------------------------------------------------
# frozen teachers, fingerprints, counts
# --------------------------------------------------------------------------------------------
def _stay_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement `train()` of a frozen module: it stays in eval mode whoever asks."""
    return self


def freeze(model: nn.Module) -> nn.Module:
    """Teacher frozen: eval mode, no grads, and `.train()` (on it or on a parent) keeps it eval."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        m.train = types.MethodType(_stay_eval, m)  # nn.Module.train recurses through children
    model.__dict__["frozen"] = True
    return model


def fingerprint(model: nn.Module, spec: ModelSpec) -> str:
    """sha256 over the weights' bytes (state dict, sorted keys, with dtype and shape) and the
    preprocessing JSON; the library/name/kwargs are folded in too. Same weights + same inputs ->
    same fingerprint, wherever the weights file lives."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())   # the raw bytes, no copy
    pre = getattr(model, "preprocess", None)
    pspec = pre.spec if isinstance(pre, Preprocess) else spec.preprocess
    h.update(pspec.model_dump_json().encode())
    h.update(json.dumps({"library": spec.library, "name": spec.name, "kwargs": spec.kwargs},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
