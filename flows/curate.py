"""The curate flow: ingest -> features -> index -> teacher-only selection -> gallery.

A short recipe of Prefect tasks, each one call into `flows/stages/curate.py`. Tasks hand each other
the run directory (through the Config), never arrays. I/O-bound tasks retry (`flows.retries`,
`flows.retry_delay_s`). There is one cache mechanism, the stages' own: ingest reads only new or
changed files, features encode only new rows, the index is rebuilt only when its inputs changed,
the epoch-0 ledger and the gallery are rewritten only when their content changes. A stage that
found nothing to do is listed in the flow's `up_to_date`.

Summaries go out as artifacts: a markdown table of kept / rejected per class with the top
rejection reasons, and links to the gallery page (and, in distill / refresh, the model card).

Prefect runs locally: with no `PREFECT_API_URL` a temporary server starts (SQLite in
`PREFECT_HOME`, Prefect's per-user `~/.prefect` unless set). The CLI applies the project's local
Prefect defaults (`flows/prefect_env.py`) before Prefect is imported.
"""
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Callable

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import Task
from prefect.utilities.annotations import unmapped

from webkd.flows.checks import check_run
from webkd.flows.stages import curate as curate_stages
from webkd.pipeline.config import Config, load_config
from webkd.pipeline.storage import run_lock
from webkd.selection.counts import query_shares_line

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# tasks: one library call each (no Prefect cache: the stages cache on content themselves)
# --------------------------------------------------------------------------------------------
# Shard tasks take their bulky arguments as one opaque value (pickled bytes, a JSON string):
# Prefect walks every parameter of every task looking for upstream futures, in the flow's process
# and again in the worker, and Dask tokenizes it. A shard's 1,000 listing entries as a list of
# dataclasses cost more than reading its images: on the 100k-image scale bench (py-spy, 2 Dask
# workers) the flow's process was busy 83 s of an 89 s ingest, in Prefect's visit_collection,
# Dask's tokenize and cloudpickle, and the workers spent a quarter of their time on the same.
@task(name="ingest-shard", cache_policy=NO_CACHE)
def ingest_shard_task(entries: bytes, shard: Any, root: str, ingest_cfg: Any):
    """One ingest shard on the task runner (idempotent: its output is keyed on its content).
    `entries`: the shard's listing entries, pickled (`pack_entries`)."""
    from webkd.pipeline.ingest import ingest_shard

    return ingest_shard(pickle.loads(entries), shard, root, ingest_cfg)


@task(name="features-shard", cache_policy=NO_CACHE)
def feature_shard_task(cfg_json: str, key: str, shard: Any):
    """One features shard on the task runner (idempotent, keyed on encoder and rows); the config
    travels as its JSON."""
    return curate_stages.encode_feature_shard(Config.model_validate_json(cfg_json), key, shard)


def pack_entries(entries: list) -> bytes:
    return pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)


def _results(futures: Any) -> list:
    return [f.result() for f in futures]


def map_ingest_shards(cfg: Config) -> Callable[[Any], list]:
    """`run_shards` for the ingest stage: its shards mapped over the flow's task runner."""
    t = with_retries(ingest_shard_task, cfg)
    return lambda plan: _results(t.map([pack_entries(plan.entries(s)) for s in plan.shards], plan.shards,
                                       unmapped(str(cfg.paths.root)), unmapped(cfg.ingest)))


def map_feature_shards(cfg: Config) -> Callable[[str, list], list]:
    t = with_retries(feature_shard_task, cfg)
    return lambda key, shards: _results(t.map(unmapped(cfg.model_dump_json()), unmapped(key), shards))


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(cfg: Config):
    return curate_stages.ingest(cfg, run_shards=map_ingest_shards(cfg))


@task(name="features", cache_policy=NO_CACHE)
def features_task(cfg: Config):
    return curate_stages.features(cfg, run_shards=map_feature_shards(cfg))


@task(name="index", cache_policy=NO_CACHE)
def index_task(cfg: Config):
    return curate_stages.index(cfg)


@task(name="teacher-selection", cache_policy=NO_CACHE)
def selection_task(cfg: Config):
    return curate_stages.teacher_selection(cfg)


@task(name="gallery", cache_policy=NO_CACHE)
def gallery_task(cfg: Config):
    current = curate_stages.gallery_current(cfg)
    return (cfg.paths.gallery if current else curate_stages.gallery(cfg, force=True)), current


@task(name="summary", cache_policy=NO_CACHE)
def summary_task(cfg: Config):
    from webkd.selection.run_data import summarize_run

    return summarize_run(cfg.paths.root, list(cfg.data.classes) or None)


IO_BOUND = {"ingest", "features", "gallery"}    # read files (maybe over a network mount): retried


def with_retries(t: Task, cfg: Config) -> Task:
    """The task with the config's retries (for I/O-bound steps: file copies, registry writes)."""
    return t.with_options(retries=cfg.flows.retries, retry_delay_seconds=cfg.flows.retry_delay_s)


def run_stage(t: Task, cfg: Config, stage: str | None = None) -> Any:
    """Run a stage task, with the config's retries for the I/O-bound stages."""
    return (with_retries(t, cfg) if stage in IO_BOUND else t)(cfg)


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
    """Kept / rejected per class (pseudo-label) and per web query, with top rejection reasons,
    the in-class vs off-class query shares and a warning per collapsed class."""
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
    lines += ["", f"Top rejection reasons overall: {top}.", "",
              f"Web queries (train rows): {_cell(query_shares_line(summary.in_class, summary.off_class))}."]
    lines += [f"\n**Warning:** {_cell(line)}." for line in summary.collapse_lines()]
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
    """ingest -> features -> index -> teacher selection; shared by the curate, distill and
    refresh flows. `up_to_date` lists the stages that found nothing to do."""
    report = run_stage(ingest_task, cfg, "ingest")
    feats = run_stage(features_task, cfg, "features")
    index_report = run_stage(index_task, cfg, "index") if cfg.teachers else None
    selection = run_stage(selection_task, cfg, "selection")
    done = {"ingest": report.up_to_date, "features": all(v.computed == 0 for v in feats.values()),
            "index": index_report is not None and index_report.up_to_date, "selection": selection["up_to_date"]}
    return {"new_records": report.kept, "quarantined_now": report.n_quarantined, "records": report.total_records,
            "computed": {k: v.computed for k, v in feats.items()},
            "near_duplicates": getattr(index_report, "near_duplicates", 0), "selection": selection,
            "up_to_date": [k for k, v in done.items() if v]}


def gallery_stage(cfg: Config, curated: dict[str, Any]) -> Path:
    """Render the gallery unless it is current with the ledgers, manifest, overrides, quarantine."""
    page, current = run_stage(gallery_task, cfg, "gallery")
    if current:
        curated["up_to_date"].append("gallery")
    return page


@flow(name="webkd-curate", log_prints=True)
def curate_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Curate the web pool of a config: ingest new images, embed new rows, index, decide with
    the teacher (and the overrides store) what to keep, render the gallery, publish a summary."""
    cfg = check_run(load_config(config_path, overrides or []))  # every user error before any work
    with run_lock(cfg.paths.lock, "webkd curate (Prefect flow)"):   # one writer per run directory
        out = curation_stages(cfg)
        page = gallery_stage(cfg, out)
        summary = run_stage(summary_task, cfg)
        publish_curation(cfg, summary, page)
        out.update(run_dir=str(cfg.paths.root), gallery=str(page), kept=summary.kept, rejected=summary.rejected)
        print(f"curated {out['records']} records ({out['new_records']} new), kept {summary.kept}, "
              f"rejected {summary.rejected}; gallery: {page}")
        return out


def run_flow(fn: Callable[..., Any], config_path: str, overrides: list[str] | None = None) -> Any:
    """Call a flow from the CLI (a temporary local server starts when no PREFECT_API_URL is set;
    a watchdog stops it with this process however it ends); the HTTP client's per-request log
    lines are kept out of the console."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    from webkd.flows import watchdog

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        watchdog.start()
    from webkd.flows.runners import flow_for

    return flow_for(fn, str(config_path), overrides)(config_path=str(config_path), overrides=list(overrides or []))
