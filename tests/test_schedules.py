"""flows/schedules.py: the curate and refresh deployments carry the config's cron, timezone and
parameters, and building them talks to no server (the API URL points at a closed port, and no
temporary server is started). `webkd serve` refuses to serve without a running server and
says how to start one."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, flows: dict) -> Path:
    cfg = {"name": "shop/web v2", "run_dir": str(tmp_path / "run"),
           "data": {"sources": [f"folder:{tmp_path / 'web'}"], "classes": ["a", "b"]},
           "teachers": [{"key": "t", "name": "cnn_tiny"}], "flows": flows}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def no_server():
    """Any API call during the test fails (closed port); no temporary server may start."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = dict(SubprocessASGIServer._instances)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield
    assert SubprocessASGIServer._instances == before, "building deployments started a Prefect server"


def test_deployments_carry_cron_timezone_and_parameters(tmp_path, no_server):
    from webkd.flows.schedules import build_deployments

    path = _config(tmp_path, {"curate_cron": "15 1 * * *", "refresh_cron": "30 4 * * 1,4",
                              "timezone": "Europe/Berlin"})
    overrides = ["train.epochs=3", "flows.refresh_epochs=1"]
    curate, refresh = build_deployments(path, overrides)
    assert (curate.name, refresh.name) == ("shop-web-v2-curate", "shop-web-v2-refresh")
    assert curate.flow_name == "webkd-curate" and refresh.flow_name == "webkd-refresh"
    assert curate.entrypoint.endswith("flows/curate.py:curate_flow")
    assert refresh.entrypoint.endswith("flows/refresh.py:refresh_flow")
    for dep, cron in ((curate, "15 1 * * *"), (refresh, "30 4 * * 1,4")):
        assert len(dep.schedules) == 1
        sched = dep.schedules[0].schedule
        assert (sched.cron, sched.timezone) == (cron, "Europe/Berlin")
        assert dep.parameters == {"config_path": str(path.resolve()), "overrides": overrides}


def test_defaults_null_cron_and_bad_cron(tmp_path, no_server):
    from webkd.flows.schedules import build_deployments
    from webkd.pipeline.config import FlowsConfig

    curate, refresh = build_deployments(_config(tmp_path, {}))
    assert curate.schedules[0].schedule.cron == FlowsConfig().curate_cron
    assert refresh.schedules[0].schedule.cron == FlowsConfig().refresh_cron
    assert curate.schedules[0].schedule.timezone == "UTC"
    curate, refresh = build_deployments(_config(tmp_path, {"refresh_cron": None}))
    assert len(curate.schedules) == 1 and refresh.schedules == []      # refresh by hand only
    with pytest.raises(ValueError, match="cron|Invalid"):
        build_deployments(_config(tmp_path, {"curate_cron": "every monday"}))
    with pytest.raises(ValueError, match="timezone|Invalid"):
        build_deployments(_config(tmp_path, {"timezone": "Mars/Olympus"}))


def test_serve_without_a_server_says_how_to_start_one(tmp_path):
    path = _config(tmp_path, {"curate_cron": "0 5 * * *"})
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")      # no profile with an API URL
    dry = subprocess.run([sys.executable, "-m", "webkd.flows", "serve", str(path), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "shop-web-v2-curate: 0 5 * * * (UTC)" in dry.stdout and "shop-web-v2-refresh" in dry.stdout
    out = subprocess.run([sys.executable, "-m", "webkd.flows", "serve", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "prefect server start" in out.stderr and "PREFECT_API_URL" in out.stderr
