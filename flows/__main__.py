"""The `webkd` command line. Each verb is a thin call into flows.stages (library level) or a
Prefect flow (curate, distill, refresh, serve).

A config verb loads its config and runs every check of flows/checks.py before any work starts;
a user error (bad key, missing file, unknown method or model, ...) is one line on stderr and
exit code 2 (`--debug` shows the traceback). Flags and `key.sub=value` overrides mix in any order.
"""
import argparse
import contextlib
import logging
import os
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


def _load(args: argparse.Namespace, sources: bool = True, lock: bool = True):
    """The checked config: schema at load, then every check that needs no work (flows/checks.py).
    With `lock` (every verb that writes the run directory) the run directory's lock is taken for
    the rest of the command (`pipeline.storage.run_lock`): a second writer fails at once."""
    from webkd.flows.checks import check_run
    from webkd.pipeline.config import load_config

    cfg = check_run(load_config(args.config, args.overrides), sources=sources)
    if lock:
        _hold_run_lock(args, cfg.paths)
    return cfg


def _hold_run_lock(args: argparse.Namespace, paths) -> None:
    from webkd.pipeline.storage import run_lock

    words = [a for a in getattr(args, "_argv", []) if a != args.verb]
    args._stack.enter_context(run_lock(paths.lock, " ".join(["webkd", args.verb, *words])[:200]))


def _counts(d: dict) -> str:
    """{'fmnist_teacher': 60} -> 'fmnist_teacher 60' (flow outputs read as text, not dicts)."""
    return ", ".join(f"{k} {v}" for k, v in d.items()) if isinstance(d, dict) else str(d)


# ---- library-level verbs ---------------------------------------------------------------------
def _run_ingest(args: argparse.Namespace) -> int:
    from webkd.flows.stages import curate as curate_stages

    report = curate_stages.ingest(_load(args))
    print(report.summary())
    return 0


verb("ingest", "Read web images from the configured sources into manifest.parquet + quarantine.parquet.",
     "webkd ingest flows/configs/fashion_web.yaml run_dir=runs/web1", _run_ingest)


def _run_features(args: argparse.Namespace) -> int:
    from webkd.flows.stages import curate as curate_stages

    for key, info in curate_stages.features(_load(args)).items():
        print(f"{key}: {info}")
    return 0


verb("features", "Compute (or update) cached teacher/student embeddings and logits for the manifest.",
     "webkd features flows/configs/fashion_web.yaml features.batch_size=512", _run_features)


def _run_index(args: argparse.Namespace) -> int:
    from webkd.flows.stages import curate as curate_stages

    print(curate_stages.index(_load(args)))
    return 0


verb("index", "Build the FAISS index over cached embeddings and mark near-duplicate groups.",
     "webkd index flows/configs/fashion_web.yaml index.factory=IVF256,Flat", _run_index)


def _run_refine(args: argparse.Namespace) -> int:
    from webkd.flows.stages import curate as curate_stages

    cfg = _load(args)
    result = curate_stages.refine(cfg)
    print(result.summary())
    print(f"labels: {cfg.paths.labels} (train with train.label_source=refined)")
    return 0


verb("refine", "Refine noisy web query labels (PLL two-hot round of linear probes on cached teacher "
     "embeddings) into labels.parquet, for train.label_source=refined.",
     "webkd refine flows/configs/fashion_web.yaml refine.loss=paper refine.epochs=60", _run_refine)


# ---- Prefect flows (flows/curate.py, distill.py, refresh.py, schedules.py) ----------------------
def _flow_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--no-flow", action="store_true",
                   help="call the library stages directly: no Prefect server, no artifacts, no caching "
                        "of stages and no registry of student versions")


def _run_curate(args: argparse.Namespace) -> int:
    if args.no_flow:
        from webkd.flows.stages import curate as curate_stages

        out = curate_stages.curate(_load(args))
        print(out["ingest"].summary())
        for key, info in out["features"].items():
            print(f"features {key}: {info}")
        print(f"teacher selection: kept {out['selection']['kept']} of {out['selection']['rows']}")
        print(f"gallery: {out['gallery']}")
        return 0
    from webkd.flows.curate import curate_flow, run_flow

    _load(args)  # checked before the flow (and its temporary server) starts
    out = run_flow(curate_flow, args.config, args.overrides)
    print(f"records {out['records']} ({out['new_records']} new), embedded now {_counts(out['computed'])}, "
          f"kept {out['kept']}, rejected {out['rejected']}")
    print(f"gallery: {out['gallery']}")
    return 0


verb("curate", "Prefect flow: ingest new web images, embed new rows, index, let the teacher (and the "
     "overrides store) decide what to keep, render the gallery; publishes a kept/rejected table and "
     "the gallery link as artifacts. Stages are cached on content.",
     "webkd curate flows/configs/fashion_web.yaml run_dir=runs/web1\n"
     "webkd curate flows/configs/fashion_web.yaml --no-flow   # library calls only", _run_curate, _flow_args)


def _distill_args(p: argparse.ArgumentParser) -> None:
    _flow_args(p)
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this machine (DDP: gloo on CPU, NCCL with one GPU each on CUDA; "
                        "train.batch_size is the global batch); same as train.nproc=N. On several machines start "
                        "`torchrun ... -m webkd.flows distill CONFIG --no-flow` instead (README)")


def _run_distill_torchrun(args: argparse.Namespace, world: int) -> int:
    """A rank of a torchrun group: rank 0 runs the whole distill (holding the run lock), the
    others join its training only (flows.stages.distill.fit_worker)."""
    from webkd.flows.stages import distill as distill_stages
    from webkd.pipeline.config import ConfigError
    from webkd.training import distributed

    if not args.no_flow:
        raise ConfigError(f"under torchrun (WORLD_SIZE={world}) run `webkd distill CONFIG --no-flow`: every rank is "
                          f"a process of the one training, not a Prefect flow")
    cfg = _load(args, lock=False)
    if cfg.train.nproc != 1:
        raise ConfigError(f"train.nproc={cfg.train.nproc} under torchrun (WORLD_SIZE={world}): torchrun starts the "
                          f"processes (--nproc-per-node); leave train.nproc at 1 and drop --nproc")
    distributed.check_processes(world, cfg.train.batch_size, cfg.device, where="WORLD_SIZE")
    with distributed.process_group(cfg.device) as dist:
        if dist.is_writer:
            _hold_run_lock(args, cfg.paths)
            print(distill_stages.distill(cfg, dist=dist).summary())
        else:
            logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))  # rank 0 reports
            distill_stages.fit_worker(dist, cfg, cfg.paths)
    return 0


def _run_distill(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        args.overrides = [*args.overrides, f"train.nproc={args.nproc}"]
    from webkd.training.distributed import torchrun_world

    world = torchrun_world()
    if world > 1:
        return _run_distill_torchrun(args, world)
    if args.no_flow:
        from webkd.flows.stages import distill as distill_stages

        result = distill_stages.distill(_load(args))
        print(result.summary())
        return 0
    from webkd.flows.curate import run_flow
    from webkd.flows.distill import distill_flow

    _load(args)
    out = run_flow(distill_flow, args.config, args.overrides)
    print(out["summary"])
    print(f"version {out['version']} is the champion ({out['decision']})")
    print(f"gallery: {out['gallery']}")
    return 0


verb("distill", "Prefect flow: curate (cached), then select, train and export a student with the configured "
     "method; it becomes the champion in registry.json (previous champion scored on the same validation "
     "split for the record). --no-flow runs the library call without Prefect.",
     "webkd distill flows/configs/fashion_web.yaml train.method=kd3 train.epochs=20\n"
     "webkd distill flows/configs/fashion_web.yaml --no-flow\n"
     "webkd distill flows/configs/fashion_web.yaml --nproc 2   # DDP on 2 processes", _run_distill, _distill_args)


def _run_refresh(args: argparse.Namespace) -> int:
    from webkd.flows.curate import run_flow
    from webkd.flows.refresh import refresh_flow
    from webkd.pipeline.report import pct

    _load(args)
    out = run_flow(refresh_flow, args.config, args.overrides)
    print(f"new records {out['new_records']}, embedded now {_counts(out['computed'])}, pool {out['records']}")
    if out["trained"]:
        print(f"challenger {out['version']}: {out['metric']} {pct(out['challenger_score'])} vs champion "
              f"{out['champion'] or '-'} {pct(out['champion_score'])} on the same {out['validation_rows']} "
              f"validation rows -> {out['decision']}")
    else:
        print(f"no challenger trained: {out['reason']}")
    print(f"champion: {out['champion_now'] or '-'}; gallery: {out['gallery']}")
    return 0


verb("refresh", "Prefect flow: take in new web data (new files, shards or manifest rows): ingest and embed "
     "only what is new, re-select over the whole pool, train a challenger warm-started from the champion "
     "and promote it only if it beats the champion on the same validation split. Nothing new: no training.",
     "webkd refresh flows/configs/fashion_web.yaml flows.refresh_epochs=5", _run_refresh)


def _serve_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--limit", type=int, default=1, help="flow runs at the same time (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the deployments and exit")


def _run_serve(args: argparse.Namespace) -> int:
    from webkd.flows.schedules import api_url, build_deployments, serve_deployments

    _load(args, sources=False, lock=False)   # the sources may be filled later; each flow run takes the lock
    deps = build_deployments(args.config, args.overrides)
    for d in deps:
        crons = ", ".join(f"{s.schedule.cron} ({s.schedule.timezone})" for s in d.schedules) or "no schedule"
        print(f"deployment {d.name}: {crons}; parameters {d.parameters}")
    if args.dry_run:
        return 0
    if not api_url():
        print("webkd serve: cron schedules fire only against a running Prefect server. Start one with\n"
              "  prefect server start --host 127.0.0.1\n"
              "and point this shell at it:\n"
              "  export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    serve_deployments(args.config, args.overrides, limit=args.limit)
    return 0


verb("serve", "Serve the curate and refresh flows as deployments on the cron schedules of the config "
     "(flows.curate_cron, flows.refresh_cron, flows.timezone); needs a running Prefect server.",
     "prefect server start --host 127.0.0.1 &\n"
     "PREFECT_API_URL=http://127.0.0.1:4200/api webkd serve flows/configs/fashion_web.yaml run_dir=runs/web1\n"
     "webkd serve flows/configs/fashion_web.yaml --dry-run   # show the deployments only",
     _run_serve, _serve_args)


# ---- review: overrides and inspection (selection.overrides, selection.gallery) -----------------
def _override_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (the store is RUN_DIR/overrides.json)")
    p.add_argument("file", nargs="?", help="overrides JSON exported by the gallery page (same format)")
    p.add_argument("--accept", nargs="+", action="extend", default=[], metavar="ID",
                   help="force keep these record ids (reason 'override')")
    p.add_argument("--reject", nargs="+", action="extend", default=[], metavar="ID",
                   help="force reject these record ids (reason 'override')")
    p.add_argument("--remove", nargs="+", action="extend", default=[], metavar="ID",
                   help="drop these ids from the store (the policy decides again)")
    p.add_argument("--relabel", nargs="+", action="extend", default=[], metavar="ID=CLASS",
                   help="correct the label of these record ids: CLASS is one of data.classes, or "
                        "'off-class' (its web query maps to no teacher class); with --accept / --reject "
                        "of the same id both are stored")
    p.add_argument("--note", default="", help="note stored with --accept/--reject/--relabel entries")


def _relabels(items: list[str], root) -> dict[str, str | None]:
    """`ID=CLASS` arguments -> id -> class (None for off-class), checked against data.classes."""
    from webkd.selection.overrides import OFF_CLASS_LABEL, OverridesError
    from webkd.selection.run_data import run_classes

    classes = run_classes(root)
    out: dict[str, str | None] = {}
    for item in items:
        i, sep, label = item.partition("=")
        if not sep or not i.strip() or not label.strip():
            raise OverridesError(f"--relabel {item!r}: expected ID=CLASS (CLASS one of data.classes, or "
                                 f"{OFF_CLASS_LABEL})")
        label = label.strip()
        if label == OFF_CLASS_LABEL and label not in classes:
            out[i.strip()] = None
        elif classes and label not in classes:
            raise OverridesError(f"--relabel {item!r}: {label!r} is not a class of this run "
                                 f"({', '.join(classes)}, or {OFF_CLASS_LABEL})")
        else:
            out[i.strip()] = label
    return out


def _run_override(args: argparse.Namespace) -> int:
    from pathlib import Path

    from webkd.pipeline.paths import RunPaths
    from webkd.pipeline.report import printable
    from webkd.selection.overrides import (OverridesError, describe, import_overrides_file, load_entries,
                                           record_overrides)

    paths = RunPaths(Path(args.run_dir))
    if not paths.root.is_dir():
        print(f"webkd override: {paths.root}: no such run directory", file=sys.stderr)
        return 2
    try:
        relabel = _relabels(args.relabel, paths.root)
        if args.file or args.accept or args.reject or args.remove or relabel:
            _hold_run_lock(args, paths)
        changes = []
        if args.file:
            changes.append(import_overrides_file(paths.overrides, args.file))
        if args.accept or args.reject or args.remove or relabel:
            changes.append(record_overrides(paths.overrides, accept=args.accept, reject=args.reject,
                                            remove=args.remove, note=args.note, relabel=relabel))
        if not changes:  # nothing to record: list the store
            entries = load_entries(paths.overrides)
            for i, e in entries.items():
                print(f"{printable(describe(e)):<6} {printable(i)}  {printable(e['time'])}  {printable(e['note'])}")
            print(f"{len(entries)} override(s) in {paths.overrides}")
            return 0
    except OverridesError as exc:
        print(f"webkd override: {printable(exc)}", file=sys.stderr)
        return 2
    touched = {i for c in changes for i in (*c.added, *c.changed)}
    if paths.manifest.exists() and touched:
        import pyarrow.parquet as pq

        known = set(pq.read_table(paths.manifest, columns=["id"])["id"].to_pylist())
        for i in sorted(touched - known):
            print(f"warning: {printable(i)} is not in the manifest (recorded anyway; check the id)")
    for c in changes:
        print("\n".join(c.lines()))
    print(f"store: {paths.overrides} (applied at the next curate / refresh)")
    return 0


verb("override", "Record human overrides (forced keep / reject, corrected labels) in the run's overrides "
     "store; FILE is the JSON the gallery page exports.",
     "webkd override runs/web1 ~/Downloads/overrides.json\n"
     "webkd override runs/web1 --relabel 3fa2...e9=pants 77c1...04=off-class\n"
     "webkd override runs/web1 --reject 3fa2...e9 --accept 77c1...04 --note 'wrong class'\n"
     "webkd override runs/web1 --remove 3fa2...e9", _run_override, _override_args)


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--render", action="store_true",
                   help="re-render the gallery page even if it is up to date (it is re-rendered anyway "
                        "when missing or older than the ledgers / overrides)")
    p.add_argument("--serve", action="store_true",
                   help="then serve the page on 127.0.0.1 (a free port, printed) until Ctrl-C: decisions made "
                        "in the page are written to the run's overrides store at once")
    p.add_argument("--port", type=int, default=0, help="port for --serve (default: a free one)")


def _run_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from webkd.pipeline.paths import RunPaths
    from webkd.selection.gallery import render_gallery
    from webkd.selection.run_data import GalleryError, summarize_run

    paths = RunPaths(Path(args.run_dir))
    inputs = [paths.manifest, paths.overrides, paths.student_predictions, *(p for _, p in paths.ledgers())]
    newest = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    from webkd.pipeline.storage import RunLocked

    busy = None
    try:
        print(summarize_run(paths.root).text())
        stale = paths.gallery.exists() and paths.gallery.stat().st_mtime < newest
        fresh = args.render or stale or not paths.gallery.exists()
        if fresh:
            try:     # rendering writes the run directory: only when no other command is writing it
                if args.serve:  # (held for the render only: the server takes it again per write)
                    from webkd.pipeline.storage import run_lock

                    with run_lock(paths.lock, "webkd inspect --serve (rendering)"):
                        render_gallery(paths.root)
                else:
                    _hold_run_lock(args, paths)
                    render_gallery(paths.root)
            except RunLocked as exc:
                busy, fresh, stale = str(exc), False, False
    except GalleryError as exc:
        print(f"webkd inspect: {exc}", file=sys.stderr)
        return 2
    if busy:
        print(f"webkd inspect: gallery not rendered: {busy}", file=sys.stderr)
    note = " (re-rendered: older than the ledgers / overrides)" if stale else " (rendered now)" if fresh else ""
    print(f"gallery: {paths.gallery}{note}")
    return _serve(paths, args.port) if args.serve else 0


def _serve(paths, port: int) -> int:
    import signal

    from webkd.selection.gallery_server import ReviewServer

    try:
        server = ReviewServer(paths.root, port)
    except (FileNotFoundError, OSError) as exc:
        print(f"webkd inspect --serve: {exc}", file=sys.stderr)
        return 2

    def stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    print(f"serving the gallery at {server.url} (127.0.0.1 only; Ctrl-C to stop); decisions go to "
          f"{paths.overrides}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


verb("inspect", "Print a run's summary (records, quarantine, kept/rejected per class, reasons, "
     "overrides) and the path of its gallery page, rendering the page if missing.",
     "webkd inspect runs/web1 --render\nwebkd inspect runs/web1 --serve", _run_inspect, _inspect_args)


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", metavar="RUN_OR_EXPORT_DIR", help="a run directory or its export/ folder")
    p.add_argument("source", metavar="SOURCE",
                   help="a folder of images (query sub-folders are read as labels), a .csv/.parquet manifest, "
                        ".tar shards (brace ranges allowed), one image file, or folder:/manifest:/wds: as in configs")
    p.add_argument("--out", default="predictions.parquet", metavar="FILE",
                   help="output table, .parquet or .csv (default predictions.parquet)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
    p.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                   help="onnx: student.onnx through onnxruntime (default); torch: the PyTorch student")
    p.add_argument("--int8", action="store_true", help="run student.int8.onnx (exported with export.int8=true)")


def _run_predict(args: argparse.Namespace) -> int:
    from webkd.training.predict import predict

    report = predict(args.export, args.source, out=args.out, batch_size=args.batch_size, top_k=args.top_k,
                     backend=args.backend, int8=args.int8)
    print(report.summary())
    return 0


verb("predict", "Classify images with an exported student (ONNX through onnxruntime by default): one row per "
     "image (id, path, label, class, probability, top-k classes and probabilities, error for an unreadable "
     "file) in Parquet or CSV, and the accuracy where the source's labels name the classes.",
     "webkd predict runs/web1 photos/ --out predictions.parquet\n"
     "webkd predict runs/web1/export shots.csv --out preds.csv --top-k 3 --backend torch", _run_predict,
     _predict_args)


def _run_demo(args: argparse.Namespace) -> int:
    from webkd.flows import demo

    missing = demo.check_data(args.data_dir)
    if missing:
        print("webkd demo needs data that is not on this machine:\n  - " + "\n  - ".join(missing), file=sys.stderr)
        return 2
    result = demo.run_demo(args.data_dir, out=args.out, epochs=args.epochs, pacs_images=args.pacs,
                           train_teacher=args.train_teacher, baseline=not args.no_baseline,
                           use_flows=not args.no_flow)
    print(demo.format_demo(result))
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="folder holding clothing_small/ and pacs/ (default: "
                   "$WEBKD_DATA_DIR, ../shared/data); Fashion-MNIST from there or the Debian package")
    p.add_argument("--out", default="runs/demo", help="where the demo's run directories go")
    p.add_argument("--epochs", type=int, default=8, help="training epochs for both students")
    p.add_argument("--pacs", type=int, default=1500, help="PACS images added as off-class web noise")
    p.add_argument("--train-teacher", action="store_true",
                   help="train the Fashion-MNIST teacher here (~30 min on 2 cores) instead of the shipped one")
    p.add_argument("--no-baseline", action="store_true", help="skip the vanilla-KD baseline")
    p.add_argument("--no-flow", action="store_true", help="library calls instead of the Prefect flows")


verb("demo", "The fashion-web scenario on real data: web images found by clothing queries (plus PACS "
     "off-class noise) curate and distill a Fashion-MNIST teacher into a small student; prints the "
     "student's Fashion-MNIST accuracy next to the teacher's and a vanilla-KD baseline, and the "
     "paths of the gallery and the model card.",
     "webkd demo\nwebkd demo --epochs 4 --out runs/demo_fast", _run_demo, _demo_args)


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


# library loggers whose INFO lines say nothing a user needs (faiss.loader: which SIMD build loaded)
QUIET_LOGGERS = ("faiss", "httpx", "httpcore", "urllib3", "PIL", "numexpr", "matplotlib", "filelock")
# exceptions that are the user's to fix (matched by class name: no heavy imports to catch them)
USER_ERRORS = {"ConfigError", "ModelLoadError", "DataNotFound", "GalleryError", "OverridesError", "RunLocked",
               "PredictError", "RegistryError", "DiskFull", "WorkerFailed"}


def _user_error(exc: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS for c in type(exc).__mro__)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags and `key.sub=value` overrides in any order: argparse fills CONFIG and the first run
    of overrides, every later `key=value` token joins `overrides` (in command-line order)."""
    args, extra = parser.parse_known_args(argv)
    rest = [t for t in extra if not (hasattr(args, "overrides") and "=" in t and not t.startswith("-"))]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + [t for t in extra if t not in rest]
    return args


def main(argv: list[str] | None = None) -> int:
    from webkd.flows.prefect_env import local_defaults

    local_defaults()  # before any flow module imports Prefect
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = parse_args(parser, [a for a in argv if a != "--debug"])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        os.environ.setdefault("TQDM_DISABLE", "1")   # library bars too (pipeline/progress.py: ours)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with contextlib.ExitStack() as stack:   # holds the run directory's lock (_load) until the verb ends
            args._stack, args._argv = stack, argv
            return int(args._run(args) or 0)
    except Exception as exc:
        if debug or not _user_error(exc):
            raise
        print(f"webkd {args.verb}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
