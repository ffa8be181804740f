"""Deployments of the curate and refresh flows on cron schedules from the config, and `serve`.

    webkd serve flows/configs/fashion_web.yaml run_dir=runs/web1

builds two deployments, `<name>-curate` (cron `flows.curate_cron`) and `<name>-refresh`
(`flows.refresh_cron`), both in `flows.timezone`, with the parameters `config_path` (absolute)
and `overrides`, and serves them from this process (at most one flow run at a time). A cron of
`null` gives a deployment without a schedule (run it by hand from the UI or
`prefect deployment run`). Schedules fire only against a running Prefect server
(`prefect server start --host 127.0.0.1`, then `PREFECT_API_URL=http://127.0.0.1:4200/api`).
"""
from webkd.flows.curate import curate_flow  # noqa: I001  (sets the local Prefect defaults first)

import os
import re
from pathlib import Path
from typing import Any

from prefect.schedules import Cron

from webkd.flows.refresh import refresh_flow
from webkd.pipeline.config import Config, load_config


def deployment_name(cfg: Config, what: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", cfg.name).strip("-") or "webkd"
    return f"{slug}-{what}"


def build_deployments(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[Any]:
    """RunnerDeployments of curate and refresh for a config (nothing is sent to a server)."""
    cfg = load_config(config_path, list(overrides))
    params = {"config_path": str(Path(config_path).resolve()), "overrides": list(overrides)}
    out = []
    for fl, what, cron in ((curate_flow, "curate", cfg.flows.curate_cron),
                           (refresh_flow, "refresh", cfg.flows.refresh_cron)):
        schedules = [Cron(cron, timezone=cfg.flows.timezone)] if cron else []
        out.append(fl.to_deployment(
            name=deployment_name(cfg, what), schedules=schedules, parameters=params,
            description=f"webkd {what} of {cfg.name} ({cfg.run_dir}), cron {cron or 'none'} {cfg.flows.timezone}",
            tags=["webkd", what]))
    return out


def api_url() -> str | None:
    """The Prefect API this process would talk to (None: a temporary local server)."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()


def serve_deployments(config_path: str | Path, overrides: list[str] | tuple[str, ...] = (), limit: int = 1) -> None:
    """Register the deployments and run their scheduled flow runs from this process (blocks until
    Ctrl-C or SIGTERM; the deployments are paused then, and resumed by the next `serve`).

    What `prefect.serve` does, but SIGTERM (systemd, `docker stop`, `kill`) takes the path of
    Ctrl-C (the main task is cancelled, the runner pauses its deployments and returns): Prefect's
    own SIGTERM handler calls `sys.exit` from inside the event loop, which printed a
    RuntimeWarning ("coroutine 'Runner.astop' was never awaited") and, after a flow run, an
    asyncio traceback."""
    import asyncio

    from prefect.runner import Runner

    deps = build_deployments(config_path, overrides)
    runner = Runner(pause_on_shutdown=True, limit=limit)
    for d in deps:
        runner.add_deployment(d)

    async def main() -> None:
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        # Runner.start installs this as the SIGTERM handler (it runs between bytecodes of the loop)
        runner.handle_sigterm = lambda *_: loop.call_soon_threadsafe(task.cancel)
        await runner.start()

    print(f"serving {', '.join(d.name for d in deps)} against {api_url()} (at most {limit} flow run(s) at a "
          "time); Ctrl-C or SIGTERM stops", flush=True)
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    print("webkd serve: stopped; the deployments are paused until the next `webkd serve`", flush=True)
