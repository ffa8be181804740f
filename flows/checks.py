"""Everything about a config that can be checked before any work starts, in one call:
`check_run(cfg)`. The CLI calls it after loading a config, and each flow at its start.

The file-system checks (sources, weights and checkpoint files, warm start) are
pipeline/config_checks.py; the ones here need training/ (method names and their arguments by
`inspect.signature`, project / torchvision / timm / open_clip model names, an open_clip
pretrained tag available offline, weights files that load into their model), which
pipeline/ must not import. Each failure is a one-line `ConfigError` naming the key.
"""
from __future__ import annotations

import inspect
from typing import Any

from webkd.pipeline.config import Config, ConfigError, ModelSpec
from webkd.pipeline.config_checks import check_paths, suggest

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _params(fn: Any, skip: tuple[str, ...] = ("self",), open_kwargs: bool = True) -> list[str] | None:
    """Named parameters of `fn`, or None when it takes **kwargs (anything goes) and open_kwargs."""
    ps = inspect.signature(fn).parameters.values()
    if open_kwargs and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps):
        return None
    return [p.name for p in ps if p.kind in _NAMED and p.name not in skip]


def check_method(cfg: Config) -> None:
    """train.method is a known method; every block of train.method_args names a method and only
    arguments its constructor takes."""
    from webkd.training.methods import METHODS

    if cfg.train.method not in METHODS:
        raise ConfigError(f"train.method: unknown method {cfg.train.method!r}{suggest(cfg.train.method, METHODS)}; "
                          f"valid: {', '.join(METHODS)}")
    for name, args in cfg.train.method_args.items():
        if name not in METHODS:
            raise ConfigError(f"train.method_args.{name}: {name!r} is not a method{suggest(name, METHODS)}; "
                              f"method_args is keyed by method name ({', '.join(METHODS)})")
        valid = _params(METHODS[name].__init__, open_kwargs=False)  # as build_method
        for arg in args:
            if valid is not None and arg not in valid:
                raise ConfigError(f"train.method_args.{name}.{arg}: method {name!r} has no argument {arg!r}"
                                  f"{suggest(arg, valid)}; valid: {', '.join(valid) or 'none'}")


def _check_name(where: str, spec: ModelSpec) -> None:
    if spec.library == "project":
        from webkd.training.archs import ARCHS

        if spec.name not in ARCHS:
            raise ConfigError(f"{where}.name: unknown project arch {spec.name!r}{suggest(spec.name, ARCHS)}; "
                              f"known: {', '.join(ARCHS)} (or set {where}.library to torchvision, timm, open_clip)")
        valid = _params(ARCHS[spec.name], skip=("in_chans",))
        for k in spec.kwargs:
            if valid is not None and k not in valid:
                raise ConfigError(f"{where}.kwargs.{k}: project arch {spec.name!r} has no argument {k!r}"
                                  f"{suggest(k, valid)}; valid: {', '.join(valid) or 'none'}")
    elif spec.library == "torchvision":
        from torchvision.models import list_models

        names = list_models()
        if spec.name not in names:
            raise ConfigError(f"{where}.name: torchvision has no model {spec.name!r}{suggest(spec.name, names)}")
    elif spec.library == "timm":
        import timm

        if not timm.is_model(spec.name):
            raise ConfigError(f"{where}.name: timm has no model {spec.name!r}"
                              f"{suggest(spec.name, timm.list_models())}")
    elif spec.library == "open_clip":
        import open_clip

        names = open_clip.list_models()
        if not spec.name.startswith(("hf-hub:", "local-dir:")) and spec.name not in names:
            raise ConfigError(f"{where}.name: open_clip has no model {spec.name!r}{suggest(spec.name, names)}")


def _teacher_outputs(spec: ModelSpec, k: int | None, classes: list[str]) -> int | None:
    """How many classes a (non open_clip) teacher predicts: its spec's num_classes, else the rows
    of the classifier in its weights file; None when neither says."""
    from webkd.training.models import ModelLoadError, build_model, read_state_dict

    if spec.num_classes:
        return spec.num_classes
    if not spec.weights:
        return None
    try:
        model = build_model(spec.model_copy(update={"weights": None}), num_classes=k or 1, class_names=classes)
        clf = getattr(model, "classifier", None)
        wkey = next((n for n, p in model.named_parameters() if clf is not None and p is clf.weight), None)
        if wkey is None:
            return None
        keys = [wkey] + [f for f, w in (getattr(model, "native_keys", None) or {}).items() if w == wkey]
        sd = read_state_dict(spec.weights)
    except ModelLoadError:
        return None    # reported by the weights check below
    hit = next((sd[key] for key in keys if key in sd), None)
    return int(hit.shape[0]) if hit is not None and hit.ndim == 2 else None


def check_teacher_classes(cfg: Config) -> None:
    """data.classes names every output of each teacher, in order: a teacher predicting more (or
    fewer) classes than data.classes lists would have its logits read against the wrong names."""
    k = len(cfg.data.classes)
    if not k:
        return
    for i, spec in enumerate(cfg.teachers):
        if spec.library == "open_clip":    # its classifier is built from data.classes: always k
            continue
        n = _teacher_outputs(spec, k, list(cfg.data.classes))
        if n is not None and n != k:
            src = f"num_classes={n}" if spec.num_classes else f"its weights {spec.weights}"
            raise ConfigError(f"data.classes: lists {k} classes but teachers.{i} predicts {n} ({src}); list the "
                              f"teacher's {n} class names in data.classes, in its output order (data.label_map "
                              f"maps web queries onto them), or use a teacher trained on these {k} classes")


def check_models(cfg: Config) -> None:
    """Model names exist; weights files load into their model; an open_clip pretrained tag is
    available (cached locally, or the network reachable)."""
    from webkd.training.models import ModelLoadError, build_model

    specs = [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)] + [("student", cfg.student)]
    k = len(cfg.data.classes) or None
    for where, spec in specs:
        _check_name(where, spec)
        try:
            if spec.library == "open_clip":
                if spec.weights:
                    raise ConfigError(f"{where}.weights: open_clip models load their checkpoint through "
                                      f"{where}.pretrained, not weights")
                from webkd.training.zero_shot import _resolve_open_clip_pretrained

                _resolve_open_clip_pretrained(spec.name, spec.pretrained)
            elif (spec.weights or spec.library == "project") and (spec.num_classes or k):
                build_model(spec, num_classes=k, class_names=cfg.data.classes)   # loads the weights
        except ModelLoadError as exc:
            key = "weights" if spec.weights and str(spec.weights) in str(exc) else (
                "pretrained" if spec.library == "open_clip" else "name")
            raise ConfigError(f"{where}.{key}: {exc}") from None


def check_run(cfg: Config, sources: bool = True) -> Config:
    """All checks, cheapest first; returns cfg so `cfg = check_run(load_config(...))` reads well.
    `sources=False` leaves the web sources' existence to the runs (webkd serve)."""
    check_paths(cfg, sources=sources)
    from webkd.training.distributed import check_processes

    check_processes(cfg.train.nproc, cfg.train.batch_size, cfg.device)
    check_method(cfg)
    check_teacher_classes(cfg)
    check_models(cfg)
    from webkd.flows.runners import check_runner

    check_runner(cfg.flows)
    return cfg
