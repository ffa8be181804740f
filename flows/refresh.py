"""The refresh flow: new web data arrived (new files in a folder, new shards, a new manifest).

    curate (cached, incremental: only new files are read, only new ids embedded)
    -> plan: train only if the pool ids, the overrides or the training config changed since the
       newest trained student
    -> challenger: warm-started from the champion's export, trained into students/<version>/
       (the champion's export/ stays intact)
    -> judge: champion and challenger scored on the same validation split; promoted only when
       strictly better (tie: the champion stays); registry.json keeps every version
    -> gallery and artifacts

The overrides store (`overrides.json`) applies to the teacher selection and to every epoch of
the challenger's training. A refresh with nothing new answers every stage from the cache and
trains nothing.
"""
from webkd.flows.curate import (artifact_key, curation_stages, gallery_stage, publish_curation,  # noqa: I001
                          publish_model_card, run_stage, summary_task, with_retries)

import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from webkd.flows.checks import check_run
from webkd.flows.stages import refresh as refresh_stages
from webkd.pipeline.config import load_config
from webkd.pipeline.report import pct
from webkd.pipeline.storage import run_lock


@task(name="refresh-plan", cache_policy=NO_CACHE)
def plan_task(cfg):
    return refresh_stages.refresh_plan(cfg)


@task(name="train-challenger", cache_policy=NO_CACHE)
def challenger_task(cfg, plan):
    return refresh_stages.train_challenger(cfg, plan)


@task(name="judge-challenger", cache_policy=NO_CACHE)
def judge_task(cfg, plan, result):
    return refresh_stages.judge_challenger(cfg, plan, result)


def refresh_markdown(out: dict[str, Any]) -> str:
    computed = ", ".join(f"{k} {v}" for k, v in out["computed"].items()) or "-"
    rows = [("new records", out["new_records"]), ("records in the pool", out["records"]),
            ("embedded now", computed), ("stages with nothing to do", ", ".join(out["up_to_date"]) or "-"),
            ("trained a challenger", "yes" if out["trained"] else "no"), ("why", out["reason"])]
    if out["trained"]:
        rows += [("challenger", f"{out['version']} ({out['warm_note']})"),
                 ("validation rows (same split for both)", out["validation_rows"]),
                 (f"champion {out['metric']}", f"{out['champion'] or '-'} {pct(out['champion_score'])}"),
                 (f"challenger {out['metric']}", pct(out["challenger_score"])), ("decision", out["decision"])]
    rows += [("champion now", out["champion_now"] or "-"), ("time", f"{out['seconds']:.1f}s")]
    return "\n".join(["# Refresh", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


@flow(name="webkd-refresh", log_prints=True)
def refresh_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Take in new web data: curate what is new, and when anything changed train a warm-started
    challenger and promote it only if it beats the champion on the same validation split."""
    t0 = time.time()
    cfg = check_run(load_config(config_path, overrides or []))  # every user error before any work
    with run_lock(cfg.paths.lock, "webkd refresh (Prefect flow)"):   # one writer per run directory
        curated = curation_stages(cfg)
        plan = with_retries(plan_task, cfg)(cfg)
        verdict: dict[str, Any] = {}
        if plan["train"]:
            result = challenger_task(cfg, plan)
            verdict = with_retries(judge_task, cfg)(cfg, plan, result)
        page = gallery_stage(cfg, curated)
        summary = run_stage(summary_task, cfg)
        out = {"run_dir": str(cfg.paths.root), **{k: curated[k] for k in ("new_records", "records", "computed", "up_to_date")},
               "trained": bool(plan["train"]), "reason": plan["reason"], "version": plan["version"],
               "warm_start": plan["warm_start"], "warm_note": plan["warm_note"], "champion": plan["champion"],
               "metric": verdict.get("metric"), "validation_rows": verdict.get("rows"),
               "champion_score": verdict.get("champion_score"), "challenger_score": verdict.get("score"),
               "promoted": bool(verdict.get("promoted")),
               "decision": verdict.get("decision", "no challenger"),
               "champion_now": verdict.get("champion_now", plan["champion"]), "gallery": str(page),
               "model_card": str(cfg.paths.export_dir / "model_card.md"), "kept": summary.kept,
               "rejected": summary.rejected}
        out["seconds"] = time.time() - t0
        publish_curation(cfg, summary, page)
        if (cfg.paths.export_dir / "model_card.md").exists():
            publish_model_card(cfg, cfg.paths.export_dir / "model_card.md")
        create_markdown_artifact(markdown=refresh_markdown(out), key=artifact_key(cfg, "refresh"),
                                 description=f"refresh of {cfg.paths.root}")
        print(f"refresh: {out['new_records']} new records, embedded {out['computed']}; "
              + (f"{out['version']}: {out['decision']}" if out["trained"] else f"no training ({out['reason']})"))
        return out
