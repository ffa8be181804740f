"""What every model wrapper shares: the `Outputs` dataclass, the in-model `Preprocess`, and
`ModelLoadError`. Both `training/models.py` and `training/zero_shot.py` import it, so neither
imports the other for these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from webkd.pipeline.config import PreprocessSpec

LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights, as PIL's convert("L")


class ModelLoadError(RuntimeError):
    """A model or its weights cannot be built/loaded; the message says what to change."""


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


class Preprocess(nn.Module):
    """Float RGB [0, 1] (B, 3, H, W) at any size -> the model's input (B, C, S, S).

    Steps, in order: antialiased bilinear resize to `spec.size` (`F.interpolate(antialias=True)`,
    one ONNX `Resize(antialias=1)` from opset 18; the identity at the same size); ITU-R 601 luma
    when `channels == 1`; `1 - x` when `invert`; with `background == "border"`, |x - b| where b is
    the median of the image's outer ring of `border_width` pixels per channel (the object comes
    out bright on black whatever the background: a white-on-black domain such as Fashion-MNIST
    is left unchanged, a photo on a grey or coloured backdrop is brought to it); then
    `(x - mean) / std`.
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

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, S, S); no size branch, so an export keeps H and W dynamic."""
        s = self.spec.size
        return F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)

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
