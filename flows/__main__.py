"""The `webkd` command line. Each verb is a thin call into flows.stages (library level) or a
Prefect flow (curate, distill, refresh, serve)."""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from typing import Callable

VERBS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def verb(name: str, summary: str, example: str, run: Callable[[argparse.Namespace], int],
         setup: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Register a sub-command: `setup(parser)` adds its arguments (default: CONFIG + overrides)."""
    VERBS[name] = (summary, example, setup or _config_args, run)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see flows/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.epochs=5 run_dir=runs/try1")


def _load(args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(args.config, args.overrides)


# ---- library-level verbs ---------------------------------------------------------------------
def _run_ingest(args: argparse.Namespace) -> int:
    from flows import stages

    report = stages.ingest(_load(args))
    print(report.summary())
    return 0


verb("ingest", "Read web images from the configured sources into manifest.parquet + quarantine.parquet.",
     "webkd ingest flows/configs/fashion_web.yaml run_dir=runs/web1", _run_ingest)


def _run_features(args: argparse.Namespace) -> int:
    from flows import stages

    for key, info in stages.features(_load(args)).items():
        print(f"{key}: {info}")
    return 0


verb("features", "Compute (or update) cached teacher/student embeddings and logits for the manifest.",
     "webkd features flows/configs/fashion_web.yaml features.batch_size=512", _run_features)


def _run_index(args: argparse.Namespace) -> int:
    from flows import stages

    print(stages.index(_load(args)))
    return 0


verb("index", "Build the FAISS index over cached embeddings and mark near-duplicate groups.",
     "webkd index flows/configs/fashion_web.yaml index.factory=IVF256,Flat", _run_index)


def _run_distill(args: argparse.Namespace) -> int:
    from flows import stages

    result = stages.distill(_load(args))
    print(result.summary())
    return 0


verb("distill", "Select, train and export a student with the configured method (library call, no Prefect).",
     "webkd distill flows/configs/fashion_web.yaml train.method=kd3 train.epochs=20", _run_distill)


# ---- entry point ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webkd",
        description="Curate webly collected images with a teacher (and the student) in the loop, "
                    "and distill a compact student.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `webkd VERB --help` for each verb, with an example.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (summary, example, setup, run) in VERBS.items():
        p = sub.add_parser(name, help=summary, description=summary,
                           epilog="example:\n  " + textwrap.indent(example, "  ").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        setup(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from pipeline.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"webkd {args.verb}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
