"""Checks of a config that need no model code: error formatting with 'did you mean' hints, the
preprocessing stored next to a weights file (config_io.read_sidecar), and the input paths that
must exist before any work starts. Checks that need training/ (method names and arguments,
architectures, loadable weights) live in flows/checks.py, which calls `check_paths` first.

Every failure is a `ConfigError` whose one-line message names the key or file and the fix.
This module does not import pipeline/config.py (which calls it while loading): the schema
reaches it as arguments (`root`, the validated Config).
"""
from __future__ import annotations

import difflib
import glob
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from webkd.pipeline.config_io import PATH_RULE, ConfigError, looks_like_path, read_sidecar, sidecar_path


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    near = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _fields_at(loc: tuple, root: type[BaseModel]) -> list[str]:
    """Valid keys of the section at `loc` (list indices skipped), for 'did you mean' hints."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        todo, model = [field.annotation], None
        while todo and model is None:
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
            todo += list(typing.get_args(t))
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def format_errors(err: ValidationError, origin: str, root: type[BaseModel] | None = None) -> str:
    """One line: every schema error with its dotted key; unknown keys get the closest valid one
    (among the fields of `root`, the model validated, at that key's place)."""
    root = root or BaseModel
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1], root), n=1)
            hint = f" (did you mean '{'.'.join(map(str, loc[:-1] + (near[0],)))}'?)" if near else ""
            lines.append(f"unknown key '{key}'{hint}")
            continue
        sub = re.match(r"([A-Za-z_]\w*(?:\.[^\s:]+)*): (.*)", msg)   # a validator naming a sub-key
        if sub and sub.group(1).split(".")[0] in _fields_at(loc, root):
            key, msg = f"{key}.{sub.group(1)}" if loc else sub.group(1), sub.group(2)
        lines.append(f"'{key}': {msg}")
    return f"invalid config ({origin}): " + "; ".join(" ".join(line.split()) for line in lines)


# --------------------------------------------------------------------------------------------
def apply_stored_preprocess(cfg: "Config", given: list[bool]) -> "Config":
    """A model whose weights file has a sidecar JSON takes its stored preprocessing when the
    config gives none, and is refused when the config contradicts it (or the stored arch).
    `given[i]`: spec i (teachers..., student) set `preprocess` itself."""
    specs = [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)] + [("student", cfg.student)]
    for (where, spec), explicit in zip(specs, given):
        meta = read_sidecar(spec.weights) if spec.weights and spec.library != "open_clip" else None
        if not meta:
            continue
        side = sidecar_path(spec.weights)
        arch = meta.get("arch") or {}
        for k in ("library", "name", "kwargs"):
            if k in arch and arch[k] != getattr(spec, k):
                raise ConfigError(f"{where}.{k}: {getattr(spec, k)!r} contradicts {arch[k]!r} stored with the "
                                  f"weights in {side}; set {where}.{k}={arch[k]!r} or use other weights")
        if "preprocess" not in meta:
            continue
        try:
            preprocess_spec = type(spec.preprocess)
            stored = preprocess_spec.model_validate(meta["preprocess"])
        except ValidationError as err:
            raise ConfigError(format_errors(err, f"preprocess in {side}", preprocess_spec)) from None
        if not explicit:
            spec.preprocess = stored
        elif spec.preprocess != stored:
            diff = ", ".join(f"{k} {getattr(spec.preprocess, k)!r} vs stored {getattr(stored, k)!r}"
                             for k in type(stored).model_fields if getattr(spec.preprocess, k) != getattr(stored, k))
            raise ConfigError(f"{where}.preprocess contradicts the preprocessing stored with its weights in "
                              f"{side} ({diff}); drop {where}.preprocess to use the stored one")
    return cfg


# --------------------------------------------------------------------------------------------
def _missing_source(source: str) -> str | None:
    """Why a `prefix:PATH` source cannot be read, or None."""
    prefix, _, rest = source.partition(":")
    p = Path(rest)
    if prefix == "folder":
        return None if p.is_dir() else f"folder not found: {p}" if not p.exists() else f"not a folder: {p}"
    if prefix == "manifest":
        if p.suffix.lower() not in (".csv", ".parquet"):
            return f"manifest {p} must be a .csv or .parquet file"
        return None if p.is_file() else f"manifest file not found: {p}"
    if prefix == "wds":
        from braceexpand import braceexpand

        shards = [s for pat in braceexpand(rest) for s in (glob.glob(pat) if glob.has_magic(pat) else [pat])]
        gone = [s for s in shards if not Path(s).is_file()]
        if not shards or gone:
            return f"shard not found: {gone[0] if gone else rest}" + (f" ({len(gone)} of {len(shards)} missing)"
                                                                     if len(gone) > 1 else "")
    return None


def check_paths(cfg: "Config", sources: bool = True) -> None:
    """Every input path the config names exists (sources, weights, checkpoint files, warm start).
    `sources=False` (webkd serve): web sources may be filled before a scheduled run, which checks them."""
    todo = [(f"data.sources.{i}", s) for i, s in enumerate(cfg.data.sources)] if sources else []
    todo += [(f"data.{k}", getattr(cfg.data, k)) for k in ("val_source", "test_source") if getattr(cfg.data, k)]
    todo += [(f"data.decontaminate.{i}", s) for i, s in enumerate(cfg.data.decontaminate)]
    for key, src in todo:
        why = _missing_source(src)
        if why:
            raise ConfigError(f"{key}: {why} ({PATH_RULE})")
    specs = [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)] + [("student", cfg.student)]
    for where, spec in specs:
        if spec.weights and not Path(spec.weights).is_file():
            raise ConfigError(f"{where}.weights: weights file not found: {spec.weights} ({PATH_RULE})")
        if (spec.library == "open_clip" and spec.pretrained and looks_like_path(spec.pretrained, Path.cwd())
                and not Path(spec.pretrained).is_file()):
            raise ConfigError(f"{where}.pretrained: open_clip checkpoint file not found: {spec.pretrained} "
                              f"({PATH_RULE}; a pretrained tag has no '/' or file suffix)")
    if cfg.train.warm_start and not Path(cfg.train.warm_start).exists():
        raise ConfigError(f"train.warm_start: not found: {cfg.train.warm_start} ({PATH_RULE})")
