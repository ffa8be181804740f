"""Raw (not yet validated) config dicts: `ConfigError`, dotted `key.sub=value` overrides, the
one rule for relative paths, and the preprocessing sidecar stored next to a weights file.

Path rule: an input path written in a YAML file (a source, `weights`, a `pretrained` file,
`train.warm_start`) is relative to that YAML file's folder; a path given on the command line
(an override) is relative to the working directory. Both are made absolute at load, whether or
not the file exists yet (existence is checked before work starts, naming the key). `run_dir` is
an output and stays relative to the working directory.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml

PATH_RULE = ("relative paths in a config file are taken from that file's folder, "
             "on the command line from the working directory")
SOURCE_PREFIXES = ("folder", "manifest", "wds")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# --------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------
def is_override(token: str) -> bool:
    """True for a `key.sub=value` command-line token (not a flag)."""
    key = token.split("=", 1)[0]
    return "=" in token and not token.startswith("-") and bool(key) and "/" not in key


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.1` -> (["train", "lr"], 0.1). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({' '.join(str(exc).split())})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply dotted overrides to a raw (un-validated) config dict; list items by index."""
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, parts[: i + 1])
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: '{'.'.join(parts[:i])}' is not a section")
                nxt = node.get(part)
                if nxt is None:
                    nxt = [] if parts[i + 1].isdigit() else {}
                    node[part] = nxt
                node = nxt
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last) if last.isdigit() else -1
            if not 0 <= idx < len(node):
                raise ConfigError(f"override {text!r}: no list item {last!r}")
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {text!r}: '{'.'.join(parts[:-1])}' is not a section")
    return out


def _list_item(node: list, part: str, where: list[str]) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"no list item '{'.'.join(where)}' (list has {len(node)} items)")
    return node[int(part)]


# --------------------------------------------------------------------------------------------
# relative paths
# --------------------------------------------------------------------------------------------
def looks_like_path(value: str, base: Path) -> bool:
    """An open_clip `pretrained` value is a file (not a tag) when it looks like one."""
    return (any(s in value for s in ("/", "\\")) or value.startswith(("~", "."))
            or Path(value).suffix in _CHECKPOINT_SUFFIXES or (base / value).exists())


def resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make every relative input path of a raw config absolute against `base` (see PATH_RULE)."""
    def fix(p: str) -> str:
        p = os.path.expanduser(p)
        return p if not p or Path(p).is_absolute() else os.path.normpath(base / p)

    def fix_source(s: str) -> str:
        prefix, sep, rest = s.partition(":")
        return f"{prefix}:{fix(rest)}" if sep and prefix in SOURCE_PREFIXES and rest else s

    out = copy.deepcopy(raw)
    data = out.get("data")
    if isinstance(data, dict):
        for key in ("sources", "decontaminate"):
            if isinstance(data.get(key), list):
                data[key] = [fix_source(s) if isinstance(s, str) else s for s in data[key]]
        for k in ("val_source", "test_source"):
            if isinstance(data.get(k), str):
                data[k] = fix_source(data[k])
    teachers = out.get("teachers") if isinstance(out.get("teachers"), list) else []
    for spec in [*teachers, out.get("student")]:
        if isinstance(spec, dict):
            if isinstance(spec.get("weights"), str):
                spec["weights"] = fix(spec["weights"])
            if isinstance(spec.get("pretrained"), str) and looks_like_path(spec["pretrained"], base):
                spec["pretrained"] = fix(spec["pretrained"])
    train = out.get("train")
    if isinstance(train, dict) and isinstance(train.get("warm_start"), str):
        train["warm_start"] = fix(train["warm_start"])
    return out


# --------------------------------------------------------------------------------------------
# the preprocessing stored with a weights file
# --------------------------------------------------------------------------------------------
def sidecar_path(weights: str | Path) -> Path:
    """`teacher.safetensors` -> `teacher.json` (flows/assets/fmnist_teacher.json is one)."""
    return Path(weights).with_suffix(".json")


def read_sidecar(weights: str | Path) -> dict[str, Any] | None:
    """The sidecar JSON of a weights file: `{"preprocess": {...PreprocessSpec fields},
    "arch": {"library", "name", "kwargs"}, ...}` (any other keys are notes), or None."""
    p = sidecar_path(weights)
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: not a readable JSON sidecar of {Path(weights).name} ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{p}: a weights sidecar must be a JSON object")
    return meta


def write_sidecar(weights: str | Path, preprocess: dict[str, Any], arch: dict[str, Any] | None = None,
                  **notes: Any) -> Path:
    """Store the preprocessing (and arch) a weights file was trained with next to it."""
    from webkd.pipeline.storage import atomic_write_json

    p = sidecar_path(weights)
    atomic_write_json(p, {**notes, **({"arch": arch} if arch else {}), "preprocess": preprocess})
    return p
