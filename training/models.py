"""Model wrappers behind one `Outputs` contract (`training.contract`): `StagedNet` over the project
archs (`training.archs`), torchvision/timm adapters, `build_model` (which hands open_clip specs to
`training.zero_shot`); weight loading; frozen teachers (`Frozen`); encoder fingerprints.

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
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from webkd.pipeline.config import ModelSpec
from webkd.pipeline.storage import atomic_path
from webkd.training.archs import ARCHS
from webkd.training.contract import ModelLoadError, Outputs, Preprocess
from webkd.training.zero_shot import build_zero_shot

log = logging.getLogger(__name__)

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
    """Set `model.native_keys`: the library model's own state-dict keys (`conv1.weight`,
    `fc.weight`) -> the wrapper's keys of the same tensors, so a checkpoint saved from plain
    torchvision/timm loads as well (`load_weights`). Empty for project archs."""
    if native is None:
        model.native_keys = {}
        return model
    own = {id(t): k for k, t in reversed(list(model.state_dict(keep_vars=True).items()))}
    model.native_keys = {k: own[id(t)] for k, t in native.state_dict(keep_vars=True).items() if id(t) in own}
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


def _mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
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
    own = model.state_dict()
    native_keys = getattr(model, "native_keys", {})
    renames = [{k: k for k in own}] + ([native_keys] if native_keys else [])   # file key -> wrapper key
    reports = []
    for rename in renames:
        missing, unexpected, shapes = _mismatch({k: own[w] for k, w in rename.items()}, sd)
        if not missing and not unexpected and not shapes:
            model.load_state_dict({rename[k]: v for k, v in sd.items()}, strict=True)
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
class Frozen(nn.Module):
    """A frozen teacher: the wrapped model in eval mode whoever calls `train()` (on it or on a
    parent), parameters without gradients. Calls go to the wrapped model; attribute reads it does
    not have itself (`classifier`, `preprocess`, `spec`, ...) too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.training = False

    def train(self, mode: bool = True) -> "Frozen":
        return self                                     # nn.Module.eval() calls train(False) too

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or name.startswith("__"):
                raise
            return getattr(super().__getattr__("model"), name)


def freeze(model: nn.Module) -> Frozen:
    """Teacher frozen: `Frozen(model)` (an already frozen model is returned as is)."""
    return model if isinstance(model, Frozen) else Frozen(model)


def fingerprint(model: nn.Module, spec: ModelSpec) -> str:
    """sha256 over the weights' bytes (state dict, sorted keys, with dtype and shape) and the
    preprocessing JSON; the library/name/kwargs are folded in too. Same weights + same inputs ->
    same fingerprint, wherever the weights file lives."""
    if isinstance(model, Frozen):
        model = model.model                             # the wrapped model's keys, frozen or not
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
