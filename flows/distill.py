"""The distill flow: curate (cached) -> train the student in the run directory -> version it
in the registry and make it the champion -> gallery -> artifacts.

An explicit distill is the user's decision, so its student becomes the champion; it is still
scored beside the previous champion on the same validation split and both numbers are kept in
`registry.json`. Scheduled refreshes (flows/refresh.py) are the ones gated on being better.
The library-level equivalent without Prefect is `webkd distill --no-flow` (`distill_stages.distill`).
"""
from webkd.flows.curate import (curation_stages, gallery_stage, publish_curation, publish_model_card,  # noqa: I001
                          run_stage, summary_task, artifact_key, with_retries)

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from webkd.flows.checks import check_run
from webkd.flows.stages import distill as distill_stages
from webkd.flows.stages import refresh as refresh_stages
from webkd.pipeline.config import load_config
from webkd.pipeline.report import pct
from webkd.pipeline.storage import run_lock


@task(name="distill", cache_policy=NO_CACHE)
def distill_task(cfg):
    return distill_stages.distill(cfg, curate_first=False)


@task(name="register-champion", cache_policy=NO_CACHE)
def register_task(cfg, result):
    return refresh_stages.register_distilled(cfg, result)


def distill_markdown(result: Any, verdict: dict[str, Any]) -> str:
    rows = [("version", verdict["version"]), ("method", result.method),
            ("student parameters", f"{result.parameters:,}"),
            ("kept at last epoch", f"{result.kept} / {result.candidates}"),
            ("best epoch (validation)", result.best_epoch),
            ("validation accuracy on query labels: student / teacher",
             f"{pct(result.val_acc)} / {pct(result.teacher_val_acc)}"),
            ("validation agreement with the teacher", pct(result.val_agreement)),
            ("test accuracy: student / teacher", f"{pct(result.test_acc)} / {pct(result.teacher_test_acc)}"),
            (f"{verdict['metric']} on the registry's split: this / previous champion",
             f"{pct(verdict['score'])} / {verdict.get('champion') or '-'} {pct(verdict.get('champion_score'))}"),
            ("decision", verdict["decision"]), ("time", f"{result.seconds:.0f}s")]
    return "\n".join(["# Distilled student", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


@flow(name="webkd-distill", log_prints=True)
def distill_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Curate (cached stages), distill the configured student, make it the champion, and
    publish the selection table, the gallery and the model card as artifacts."""
    cfg = check_run(load_config(config_path, overrides or []))  # every user error before any work
    with run_lock(cfg.paths.lock, "webkd distill (Prefect flow)"):   # one writer per run directory
        curated = curation_stages(cfg)
        result = distill_task(cfg)
        verdict = with_retries(register_task, cfg)(cfg, result)
        page = gallery_stage(cfg, curated)
        summary = run_stage(summary_task, cfg)
        publish_curation(cfg, summary, page)
        card = cfg.paths.export_dir / "model_card.md"
        publish_model_card(cfg, card)
        create_markdown_artifact(markdown=distill_markdown(result, verdict), key=artifact_key(cfg, "distill"),
                                 description=f"student distilled in {cfg.paths.root}")
        print(f"distilled {verdict['version']}: validation accuracy {pct(result.val_acc)}; {verdict['decision']}")
        return {"run_dir": str(cfg.paths.root), "version": verdict["version"], "method": result.method,
                "val_acc": result.val_acc, "teacher_val_acc": result.teacher_val_acc, "test_acc": result.test_acc,
                "teacher_test_acc": result.teacher_test_acc, "parameters": result.parameters,
                "best_epoch": result.best_epoch, "kept": result.kept, "candidates": result.candidates,
                "export_dir": str(cfg.paths.export_dir), "model_card": str(card), "gallery": str(page),
                "new_records": curated["new_records"], "computed": curated["computed"],
                "val_agreement": result.val_agreement, "metric": verdict["metric"], "score": verdict["score"],
                "champion_before": verdict.get("champion"), "champion_score": verdict.get("champion_score"),
                "decision": verdict["decision"], "seconds": result.seconds, "resumed_from": result.resumed_from,
                "summary": result.summary()}
