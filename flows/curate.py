"""The curate flow: ingest -> features -> index -> teacher-only selection -> gallery.

A short recipe of Prefect tasks, each one call into `flows.stages`. Tasks hand each other the
run directory (through the Config), never arrays. I/O-bound tasks retry (`flows.retries`,
`flows.retry_delay_s`). Stage tasks are cached on content: the key of each covers the run
directory and the content of what the stage reads (the source listing with sizes and mtimes,
the manifest ids, the encoder spec and weights file, the feature cache metadata, the
overrides store, the ledgers), so new data, new weights or a new override change the key and
the stage runs. Keys also carry the run directory's incarnation id (`flow_cache_token.txt`), so
a run directory deleted and built again starts with a clean cache, and a stage whose outputs
are missing runs with `refresh_cache` (rebuilt and re-cached, never answered from the cache).
The stages are incremental underneath anyway
(ingest state, feature cache by fingerprint), so a cache miss costs only the new work.

Summaries go out as artifacts: a markdown table of kept / rejected per class with the top
rejection reasons, and links to the gallery page (and, in distill / refresh, the model card).

Prefect runs locally: with no `PREFECT_API_URL` a temporary server starts (SQLite in
`PREFECT_HOME`, the project's `.prefect/` unless set), analytics off, a generous start-up
timeout (the first start migrates its database). These defaults are set here, before Prefect
is imported; the other flow modules import this one first.
"""
import os
from pathlib import Path


def _prefect_defaults() -> None:
    """Local Prefect settings, unless the environment already says otherwise."""
    root = Path(__file__).resolve().parent.parent
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "webkd")
    # library log lines outside a flow run (the demo's no-flow baseline) go to the console only,
    # without Prefect's "attempted to send logs to the API without a flow run id" warning
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


_prefect_defaults()

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Callable  # noqa: E402

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.tasks import Task  # noqa: E402

from webkd.flows import stages  # noqa: E402
from webkd.pipeline.config import Config, load_config  # noqa: E402
from webkd.pipeline.paths import RunPaths  # noqa: E402
from webkd.pipeline.storage import sha256_file  # noqa: E402

log = logging.getLogger(__name__)

CACHE_VERSION = "webkd-cache-1"      # bump when a stage's outputs change meaning
SMALL_FILE = 16 * 2**20              # files up to this size are keyed by content, larger by size+mtime


# --------------------------------------------------------------------------------------------
# content fingerprints for cache keys
# --------------------------------------------------------------------------------------------
def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_signature(path: str | Path | None) -> Any:
    """Content hash of a small file, (size, mtime_ns) of a large one, None when missing."""
    if path is None:
        return None
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    if not p.is_file():
        return ["dir", st.st_mtime_ns]
    if st.st_size > SMALL_FILE:
        return [st.st_size, st.st_mtime_ns]
    return sha256_file(p)


def listing_digest(cfg: Config) -> str:
    """Hash of what the sources list now (uri, label, size, mtime, offset; no image bytes read):
    a new file, shard or manifest row changes it."""
    from webkd.pipeline.sources import iter_source

    h = hashlib.sha256()
    notes: Counter = Counter()
    for source in cfg.data.sources:
        for e in iter_source(source, cfg.ingest, notes):
            h.update(repr((e.source, e.uri, e.web_label, e.caption, e.size, e.mtime_ns, e.offset, e.error)).encode())
    h.update(repr(sorted(notes.items())).encode())
    return h.hexdigest()


def manifest_digest(paths: RunPaths, with_status: bool = False) -> str | None:
    """Hash of the manifest's ids (and statuses); None without a manifest."""
    if not paths.manifest.exists():
        return None
    import pyarrow.parquet as pq

    cols = ["id", "status"] if with_status else ["id"]
    t = pq.read_table(paths.manifest, columns=cols).to_pydict()
    return digest(*[t[c] for c in cols])


def _encoder_specs(cfg: Config) -> list[Any]:
    specs = list(cfg.teachers) if "teachers" in cfg.features.encoders else []
    if "student" in cfg.features.encoders:
        specs.append(cfg.student)
    return [[s.model_dump(mode="json"), file_signature(s.weights),
             file_signature(s.pretrained) if s.pretrained and Path(s.pretrained).exists() else s.pretrained]
            for s in specs]


def _feature_keys(cfg: Config) -> list[str]:
    keys = [t.cache_key for t in cfg.teachers] if "teachers" in cfg.features.encoders else []
    return keys + (["student"] if "student" in cfg.features.encoders else [])


def run_token(paths: RunPaths) -> str:
    """The run directory's incarnation id, created on first use. A run directory deleted and
    built again gets a new one, so no cache entry of its previous life can answer for it."""
    import uuid

    from webkd.pipeline.storage import atomic_write_text

    try:
        token = paths.cache_token.read_text().strip()
    except OSError:
        token = ""
    if not token:
        token = uuid.uuid4().hex
        atomic_write_text(paths.cache_token, token + "\n")
    return token


def _root(cfg: Config) -> list[str]:
    """The run directory: its absolute path and its incarnation."""
    return [str(cfg.paths.root.resolve()), run_token(cfg.paths)]


def ingest_key(_ctx: Any, params: dict[str, Any]) -> str:
    cfg: Config = params["cfg"]
    return digest("ingest", CACHE_VERSION, _root(cfg), cfg.data.sources, cfg.ingest.model_dump(mode="json"),
                  listing_digest(cfg))


def features_key(_ctx: Any, params: dict[str, Any]) -> str:
    cfg: Config = params["cfg"]
    return digest("features", CACHE_VERSION, _root(cfg), cfg.data.image_size, cfg.data.fit, cfg.data.classes,
                  cfg.features.model_dump(mode="json"), _encoder_specs(cfg), manifest_digest(cfg.paths))


def index_key(_ctx: Any, params: dict[str, Any]) -> str:
    cfg: Config = params["cfg"]
    key = stages.index_key(cfg)
    return digest("index", CACHE_VERSION, _root(cfg), key, cfg.index.model_dump(mode="json"),
                  cfg.data.image_size, cfg.data.fit,   # near duplicates may be found in the pixel cache
                  file_signature(cfg.paths.features_meta(key)), manifest_digest(cfg.paths))


def selection_key(_ctx: Any, params: dict[str, Any]) -> str:
    cfg: Config = params["cfg"]
    p = cfg.paths
    data = cfg.data.model_dump(mode="json", include={"classes", "label_map", "class_groups", "val_fraction"})
    return digest("selection", CACHE_VERSION, _root(cfg), data, cfg.selection.model_dump(mode="json"),
                  cfg.train.epochs, cfg.train.label_source, [file_signature(p.features_meta(k)) for k in _feature_keys(cfg)],
                  manifest_digest(p, with_status=True), file_signature(p.overrides),
                  [file_signature(f) for f in outputs_of(cfg, "index")] if cfg.selection.knn.enabled else None,
                  file_signature(p.labels) if cfg.train.label_source == "refined" else None)


def gallery_key(_ctx: Any, params: dict[str, Any]) -> str:
    cfg: Config = params["cfg"]
    p = cfg.paths
    ledgers = [x for _, x in p.ledgers()]
    return digest("gallery", CACHE_VERSION, _root(cfg), cfg.data.classes,
                  [[x.name, file_signature(x)] for x in ledgers], manifest_digest(p, with_status=True),
                  file_signature(p.overrides), file_signature(p.quarantine))


def outputs_of(cfg: Config, stage: str) -> list[Path]:
    """Files a stage leaves behind; any missing one makes its task run with refresh_cache."""
    p = cfg.paths
    if stage == "ingest":
        return [p.manifest, p.ingest_state]
    if stage == "features":
        return [f for k in _feature_keys(cfg) for f in (p.features(k), p.logits(k), p.features_meta(k))] + \
            [p.pixels(cfg.data.image_size, cfg.data.fit)]
    if stage == "index":
        from webkd.pipeline.index import index_meta_path

        return [p.index(stages.index_key(cfg)), index_meta_path(p.index(stages.index_key(cfg)))]
    if stage == "selection":
        return [p.ledger(0)]
    if stage == "gallery":
        return [p.gallery, p.gallery_dir / "data" / "meta.js"]
    raise ValueError(f"unknown stage {stage!r}")


# --------------------------------------------------------------------------------------------
# tasks: one library call each
# --------------------------------------------------------------------------------------------
@task(name="ingest", cache_key_fn=ingest_key, persist_result=True)
def ingest_task(cfg: Config):
    return stages.ingest(cfg)


@task(name="features", cache_key_fn=features_key, persist_result=True)
def features_task(cfg: Config):
    return stages.features(cfg)


@task(name="index", cache_key_fn=index_key, persist_result=True)
def index_task(cfg: Config):
    return stages.index(cfg)


@task(name="teacher-selection", cache_key_fn=selection_key, persist_result=True)
def selection_task(cfg: Config):
    return stages.teacher_selection(cfg)


@task(name="gallery", cache_key_fn=gallery_key, persist_result=True)
def gallery_task(cfg: Config):
    return stages.gallery(cfg)


@task(name="summary", cache_policy=NO_CACHE)
def summary_task(cfg: Config):
    from webkd.selection.gallery import summarize_run

    return summarize_run(cfg.paths.root, list(cfg.data.classes) or None)


IO_BOUND = {"ingest", "features", "gallery"}    # read files (maybe over a network mount): retried


def with_retries(t: Task, cfg: Config) -> Task:
    """The task with the config's retries (for I/O-bound steps: file copies, registry writes)."""
    return t.with_options(retries=cfg.flows.retries, retry_delay_seconds=cfg.flows.retry_delay_s)


def run_stage(t: Task, cfg: Config, stage: str | None = None) -> tuple[Any, bool]:
    """Run a stage task with the config's retries (I/O-bound stages) and, when any of the
    stage's outputs is missing, `refresh_cache`. Returns (result, answered from cache)."""
    if stage in IO_BOUND:
        t = with_retries(t, cfg)
    if stage is not None:
        t = t.with_options(refresh_cache=not all(p.exists() for p in outputs_of(cfg, stage)))
    state = t(cfg, return_state=True)
    return state.result(), state.name == "Cached"


# --------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------
def artifact_key(cfg: Config, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", cfg.name.lower()).strip("-") or "webkd"
    return f"{slug}-{what}"


def _cell(s: Any) -> str:
    """A web string made safe for one markdown table cell."""
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def selection_markdown(summary: Any, title: str) -> str:
    """Kept / rejected per class (pseudo-label) and per web query, with top rejection reasons."""
    def reasons(rs: list[tuple[str, int]]) -> str:
        return ", ".join(f"{_cell(r)} ({n})" for r, n in rs[:3]) or "-"

    lines = [f"# {title}", "",
             f"{summary.records} records ({summary.images} with a decision): kept **{summary.kept}**, "
             f"rejected **{summary.rejected}**; quarantined at ingest {sum(summary.quarantine.values())}; "
             f"overrides {sum(summary.overrides.values())}.", "",
             "| class (pseudo-label) | kept | rejected | top rejection reasons |", "|---|---:|---:|---|"]
    lines += [f"| {_cell(c.name)} | {c.kept} | {c.rejected} | {reasons(c.reasons)} |" for c in summary.by_pseudo]
    lines += ["", "| web query | kept | rejected | top rejection reasons |", "|---|---:|---:|---|"]
    lines += [f"| {_cell(c.name)} | {c.kept} | {c.rejected} | {reasons(c.reasons)} |" for c in summary.by_query]
    top = ", ".join(f"{_cell(r)} {n}" for r, n in summary.reasons[:6]) or "-"
    lines += ["", f"Top rejection reasons overall: {top}."]
    return "\n".join(lines)


def publish_curation(cfg: Config, summary: Any, gallery: Path, extra: str = "") -> None:
    """The selection table and the gallery link, as artifacts of the running flow."""
    create_markdown_artifact(markdown=selection_markdown(summary, f"Curation of {_cell(cfg.name)}") + extra,
                             key=artifact_key(cfg, "curation"),
                             description=f"kept / rejected per class in {cfg.paths.root}")
    create_link_artifact(link=Path(gallery).resolve().as_uri(), link_text="gallery: kept vs rejected images",
                         key=artifact_key(cfg, "gallery"), description=f"review page of {cfg.paths.root}")


def publish_model_card(cfg: Config, card: Path) -> None:
    create_link_artifact(link=Path(card).resolve().as_uri(), link_text="model card of the champion student",
                         key=artifact_key(cfg, "model-card"), description=f"{card}")


# --------------------------------------------------------------------------------------------
# the flow
# --------------------------------------------------------------------------------------------
def curation_stages(cfg: Config) -> dict[str, Any]:
    """ingest -> features -> index -> teacher selection as cached tasks; shared by the curate,
    distill and refresh flows. Stages answered from the cache did no work now, and count so."""
    cached: list[str] = []

    def stage(t: Task, name: str) -> Any:
        result, hit = run_stage(t, cfg, name)
        if hit:
            cached.append(name)
        return result

    report = stage(ingest_task, "ingest")
    feats = stage(features_task, "features")
    index_report = stage(index_task, "index") if cfg.teachers else None
    selection = stage(selection_task, "selection")
    return {"new_records": 0 if "ingest" in cached else report.kept,
            "quarantined_now": 0 if "ingest" in cached else report.n_quarantined,
            "records": report.total_records,
            "computed": {k: 0 if "features" in cached else v.computed for k, v in feats.items()},
            "near_duplicates": getattr(index_report, "near_duplicates", 0), "selection": selection,
            "cached": cached}


def gallery_stage(cfg: Config, curated: dict[str, Any]) -> Path:
    """Render the gallery (cached on the ledgers, manifest, overrides, quarantine)."""
    page, hit = run_stage(gallery_task, cfg, "gallery")
    if hit:
        curated["cached"].append("gallery")
    return page


@flow(name="webkd-curate", log_prints=True)
def curate_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Curate the web pool of a config: ingest new images, embed new rows, index, decide with
    the teacher (and the overrides store) what to keep, render the gallery, publish a summary."""
    cfg = load_config(config_path, overrides or [])
    out = curation_stages(cfg)
    page = gallery_stage(cfg, out)
    summary, _ = run_stage(summary_task, cfg)
    publish_curation(cfg, summary, page)
    out.update(run_dir=str(cfg.paths.root), gallery=str(page), kept=summary.kept, rejected=summary.rejected)
    print(f"curated {out['records']} records ({out['new_records']} new), kept {summary.kept}, "
          f"rejected {summary.rejected}; gallery: {page}")
    return out


_WATCHDOG = """
import os, signal, sys, time
parent, marker = int(sys.argv[1]), b"prefect.server.api.server:create_app"
def servers():
    found = set()
    for d in os.listdir("/proc"):
        if d == str(os.getpid()):       # this script's own command line holds the marker too
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if ppid == parent and marker in f.read():
                    found.add(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return found
seen = set()
while os.getppid() == parent:           # until the CLI is gone, however it ended
    if not seen:
        seen = servers()
    time.sleep(0.5)
for pid in seen:                        # still that server (not a reused pid)? stop it
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker in f.read():
                os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
"""


def temporary_server_dies_with_us() -> None:
    """With no PREFECT_API_URL, Prefect runs flows against a temporary server in a child
    process and stops it at exit; a CLI killed by a signal (SIGKILL, SIGTERM, the OOM killer)
    would leave it running. A tiny watchdog process (Linux /proc) notes that server among this
    process's children and stops it once this process is gone."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or not os.path.isdir("/proc"):
        return
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def run_flow(fn: Callable[..., Any], config_path: str, overrides: list[str] | None = None) -> Any:
    """Call a flow from the CLI (a temporary local server starts when no PREFECT_API_URL is set,
    and stops with this process however it ends); the HTTP client's per-request log lines are
    kept out of the console."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    temporary_server_dies_with_us()
    return fn(config_path=str(config_path), overrides=list(overrides or []))
