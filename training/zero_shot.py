"""The open_clip zero-shot teacher: an open_clip image tower behind the `Outputs` contract.

`build_zero_shot(spec, class_names, num_classes)` builds the classifier from the class names and
the spec's prompt templates (prompt-ensembled, normalised text embeddings times `logit_scale`),
then drops the text tower. Weights never come from the network at run time: `spec.pretrained`
is a local file, or a pretrained tag already in the local cache; offline or unreachable hubs
fail fast with a message that says which file to fetch and where to point the config
(`_resolve_open_clip_pretrained`). `open_clip` is imported only here, inside the builder.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from webkd.pipeline.config import ModelSpec, PreprocessSpec
from webkd.training.contract import ModelLoadError, Outputs, Preprocess

log = logging.getLogger(__name__)



class OpenClipZeroShot(nn.Module):
    """An open_clip image tower used as a zero-shot classifier.

    `classifier` is a Linear whose rows are the prompt-ensembled, normalised text embeddings of
    the class names, times `logit_scale` (plus `logit_bias` for SigLIP models), applied to the
    normalised image embedding, so `classifier(embedding) == logits` as for every wrapper.

    Deviation from the Outputs contract: `features == [embedding[:, :, None, None]]`, a pooled-only
    1x1 map (no spatial last-stage map); a method that needs spatial maps (KD^3 alignment) gets a
    pooled-only version with this teacher. The text tower is dropped after building the classifier.
    """

    def __init__(self, spec: ModelSpec, preprocess: Preprocess, visual: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.visual = visual
        self.classifier = classifier
        self.num_classes = classifier.out_features
        self.embed_dim = classifier.in_features
        self.feature_channels = [classifier.in_features]

    def forward(self, x: torch.Tensor) -> Outputs:
        embedding = F.normalize(self.visual(self.preprocess(x)), dim=-1)   # (B, D)
        logits = self.classifier(embedding)                                # (B, K)
        return Outputs(logits=logits, features=[embedding[:, :, None, None]], embedding=embedding)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to host:443 opens within `timeout` (DNS included)."""
    import socket

    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def _cached_tag_file(cfg: dict) -> str | None:
    """The local file of an open_clip pretrained tag when it was downloaded before, else None."""
    hub = cfg.get("hf_hub") or ""
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo, filename = os.path.split(hub)  # "org/repo/" (default file names) or "org/repo/file"
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo_id=repo, filename=name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    url = cfg.get("url") or ""
    if url:
        p = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(p):
            return p
    return None


def _offline_message(name: str, tag: str, cfg: dict) -> str:
    hub = (cfg.get("hf_hub") or "").rstrip("/")
    where = f"the Hugging Face hub ({hub})" if hub else f"{cfg.get('url')}"
    get = (f"`huggingface-cli download {hub} open_clip_model.safetensors --local-dir .`" if hub
           else f"download {cfg.get('url')}")
    return (
        f"open_clip model {name!r} with pretrained tag {tag!r} must be downloaded from {where}, but this "
        f"machine is offline (HF_HUB_OFFLINE=1 or no network) and the file is not in the local cache. "
        f"Pass a local checkpoint file instead: in the config set `pretrained: /path/to/open_clip_model.safetensors` "
        f"(or the override `teachers.0.pretrained=/path/to/open_clip_model.safetensors`); .pt, .bin and "
        f".safetensors files work. To get the file once on a machine with internet: {get}, or run "
        f"`python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}')\"` there and "
        f"copy the file it caches (~/.cache/huggingface/hub/...) to this machine."
    )


def _resolve_open_clip_pretrained(name: str, pretrained: str | None) -> tuple[str | None, dict]:
    """-> (value to pass as open_clip's `pretrained`, the tag's config ({} for none/file)).

    Fails fast (no 45 s hub retries) when a tag needs a download and the machine is offline.
    """
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if name.startswith("hf-hub:") and not _hub_offline() and not _reachable("huggingface.co"):
        raise ModelLoadError(
            f"open_clip model {name!r} comes from the Hugging Face hub, which cannot be reached from here. "
            "If it was downloaded before, set HF_HUB_OFFLINE=1 to use the local cache; otherwise use a "
            "built-in name with `pretrained: /path/to/open_clip_model.safetensors`, or "
            "`local-dir:/path/to/folder` holding open_clip_config.json and the weights.")
    if not pretrained:
        return None, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    cfg = get_pretrained_cfg(name, pretrained)
    if not cfg:
        looks_like_path = any(s in pretrained for s in ("/", "\\")) or Path(pretrained).suffix in (".pt", ".bin", ".safetensors", ".pth")
        if looks_like_path:
            raise ModelLoadError(f"open_clip checkpoint file not found: {pretrained}")
        raise ModelLoadError(
            f"pretrained {pretrained!r} for open_clip model {name!r} is neither a local file nor a known tag; "
            f"known tags: {list_pretrained_tags_by_model(name) or 'none'}")
    cached = _cached_tag_file(cfg)
    if cached:
        return cached, cfg
    host = "huggingface.co" if cfg.get("hf_hub") else (cfg.get("url", "").split("/")[2] if "://" in cfg.get("url", "") else "")
    if _hub_offline() or not host or not _reachable(host):
        raise ModelLoadError(_offline_message(name, pretrained, cfg))
    return pretrained, cfg


def build_zero_shot(spec: ModelSpec, class_names: list[str] | None, num_classes: int | None) -> nn.Module:
    """open_clip ModelSpec + class names -> `OpenClipZeroShot` (eval mode, text tower dropped)."""
    import open_clip

    if not class_names:
        raise ModelLoadError("an open_clip teacher is a zero-shot classifier: build_model needs class_names "
                             "(data.classes)")
    if num_classes is not None and num_classes != len(class_names):
        raise ModelLoadError(f"open_clip teacher: num_classes={num_classes} but {len(class_names)} class names")
    bad = [t for t in spec.prompts if "{}" not in t]
    if not spec.prompts or bad:
        raise ModelLoadError(f"open_clip prompt templates need a '{{}}' for the class name: {bad or spec.prompts}")
    source, tag_cfg = _resolve_open_clip_pretrained(spec.name, spec.pretrained)
    force_pp = {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg} if source and tag_cfg else None
    try:
        clip = open_clip.create_model(spec.name, pretrained=source, pretrained_image=False, pretrained_text=False,
                                      force_preprocess_cfg=force_pp or None, **spec.kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/FileNotFoundError with its own text
        raise ModelLoadError(f"open_clip cannot build {spec.name!r} (pretrained={spec.pretrained!r}): {exc}") from None
    clip.eval()
    tokenizer = open_clip.get_tokenizer(spec.name)
    names = [c.replace("_", " ") for c in class_names]
    with torch.no_grad():
        texts = tokenizer([t.format(c) for c in names for t in spec.prompts])     # (K*T, L)
        text = clip.encode_text(texts, normalize=True)                            # (K*T, D)
        text = text.view(len(names), len(spec.prompts), -1).mean(1)               # (K, D)
        text = F.normalize(text, dim=-1)
        scale = clip.logit_scale.exp().clamp(max=100.0)
        classifier = nn.Linear(text.shape[1], len(names), bias=getattr(clip, "logit_bias", None) is not None)
        classifier.weight.copy_(text * scale)
        if classifier.bias is not None:
            classifier.bias.fill_(float(clip.logit_bias.reshape(-1)[0]))
    pcfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = pcfg.get("size", getattr(clip.visual, "image_size", 224))
    size = int(max(size)) if isinstance(size, (tuple, list)) else int(size)
    pspec = PreprocessSpec(size=size, channels=3, mean=list(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                           std=list(pcfg.get("std", open_clip.OPENAI_DATASET_STD)), invert=spec.preprocess.invert)
    if spec.preprocess.channels != 3:
        log.warning("open_clip teacher %s takes RGB; preprocess.channels=%d ignored", spec.name, spec.preprocess.channels)
    return OpenClipZeroShot(spec, Preprocess(pspec), clip.visual, classifier)
