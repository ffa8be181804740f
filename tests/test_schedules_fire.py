"""A cron schedule that fires (issue 14, part 4), slow: `prefect server start --host 127.0.0.1`
on a free port with its own PREFECT_HOME, `webkd serve` against it with a one-minute cron on a
tiny real config (real clothing photos and PACS images as files, a small teacher trained here),
until the server's scheduler has created a curate run, the served process has run it and it is
COMPLETED; then its outputs (manifest, features, ledger, gallery, the curation artifact of that
flow run), that `webkd serve` stops cleanly on SIGTERM (exit 0, deployments paused, no traceback),
and that nothing this test started is still running once it stopped the two processes.

Run from bench/schedules_fire.py (`pytest -m slow tests/test_schedules_fire.py`); with
WEBKD_SCHEDULES_FIRE_OUT set, the timings are written there as JSON."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import procs
from test_flows import ledger_counts, table_rows, train_teacher, write_config, write_pool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")]

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_S = 300        # the first start migrates a new database: over a minute on 2 busy cores
RUN_DONE_S = 420            # serve's start + the next minute tick + the runner's poll + the curate run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or "null")


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _stop(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM the process (as systemd, `docker stop` or `kill` do); SIGKILL its process group
    (each was started in its own session) if it is still there timeout_s later. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def test_one_minute_cron_fires_a_curate_run(tmp_path, clothing, pacs_jpeg):
    write_pool(tmp_path, clothing, pacs_jpeg)
    assert train_teacher(clothing, tmp_path / "teacher.safetensors") > 0.45
    cfg = write_config(tmp_path, "Fire Test", **{"flows.curate_cron": "* * * * *", "flows.refresh_cron": None})
    run_dir = tmp_path / "served_run"
    overrides = [f"run_dir={run_dir}"]
    images = sum(1 for _ in (tmp_path / "web").rglob("*.jpg"))

    mark = secrets.token_hex(6)           # every process this test starts, and their children, carry it
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(WEBKD_FIRE_TEST=mark, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("server", "serve")}
    said = lambda name: (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]  # noqa: E731
    started: list[subprocess.Popen] = []
    timing, codes = {}, []
    try:
        t0 = time.time()
        started.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                         "--port", str(port)], env=env, cwd=tmp_path, stdout=logs["server"],
                                        stderr=subprocess.STDOUT, start_new_session=True))
        while time.time() - t0 < SERVER_START_S and started[0].poll() is None:
            try:
                if _api(f"{api}/health") is True:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"the Prefect server did not answer within {SERVER_START_S} s: {said('server')}")
        timing["server_start_s"] = round(time.time() - t0, 1)

        t1 = time.time()
        started.append(subprocess.Popen([sys.executable, "-m", "webkd.flows", "serve", str(cfg), *overrides],
                                        env={**env, "PREFECT_API_URL": api}, cwd=ROOT, stdout=logs["serve"],
                                        stderr=subprocess.STDOUT, start_new_session=True))
        deployment = done = None
        while time.time() - t1 < RUN_DONE_S and started[1].poll() is None and done is None:
            time.sleep(2)
            try:
                deployment = deployment or _api(f"{api}/deployments/name/webkd-curate/Fire-Test-curate")
                runs = _api(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}},
                                                         "sort": "EXPECTED_START_TIME_ASC"})
            except OSError:           # not registered yet (404), or a slow answer on 2 busy cores
                continue
            bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
            assert not bad, f"scheduled run {bad[0]['name']} {bad[0]['state_type']}: " \
                f"{bad[0]['state'].get('message')}\n{said('serve')}"
            done = next((r for r in runs if r["state_type"] == "COMPLETED"), None)
        assert started[1].poll() is None, f"webkd serve exited with {started[1].returncode}: {said('serve')}"
        assert deployment is not None, f"webkd serve registered no curate deployment: {said('serve')}"
        assert done is not None, f"no scheduled curate run COMPLETED within {RUN_DONE_S} s: {said('serve')}"
        timing["serve_to_completed_s"] = round(time.time() - t1, 1)
        artifacts = {a["key"]: a for a in _api(f"{api}/artifacts/filter",
                                               {"artifacts": {"flow_run_id": {"any_": [done["id"]]}}})}
    finally:
        for proc in reversed(started):             # serve first, then the server
            codes.append(_stop(proc))
        for f in logs.values():
            f.close()
    left = procs.wait_gone(lambda: procs.scan({"WEBKD_FIRE_TEST": mark}), timeout_s=15)
    procs.kill(left)
    assert not left, "still running after the test stopped serve and the server: " + "; ".join(
        procs.describe(*x) for x in left.items())
    assert codes[0] == 0, f"webkd serve exited with {codes[0]} on SIGTERM: {said('serve')}"
    stopped = said("serve")
    stopped = stopped[stopped.rfind("Finished in state"):]      # what serve said after the flow run
    assert "webkd serve: stopped" in stopped and "deployments have been paused" in stopped
    assert "Traceback" not in stopped and "Warning" not in stopped, stopped

    # ---- the run: created by the scheduler for a minute tick, with the deployment's parameters ----
    assert done["auto_scheduled"] and done["deployment_id"] == deployment["id"]
    assert done["parameters"] == {"config_path": str(cfg.resolve()), "overrides": overrides}
    tick, start, end = (_when(done[k]) for k in ("expected_start_time", "start_time", "end_time"))
    assert tick % 60 == 0, f"expected start {done['expected_start_time']} is not a minute tick"
    assert tick <= start <= end
    timing.update(tick_to_start_s=round(start - tick, 1), run_s=round(end - start, 1),
                  tick_to_completed_s=round(end - tick, 1))

    # ---- its outputs in the run directory of the override -------------------------------------
    from webkd.pipeline.paths import RunPaths

    paths = RunPaths(run_dir)
    ids = pq.read_table(paths.manifest, columns=["id"])["id"].to_pylist()
    quarantined = pq.read_table(paths.quarantine).num_rows if paths.quarantine.exists() else 0
    assert len(ids) + quarantined == images and len(ids) > 90
    assert np.load(paths.features("t"), mmap_mode="r").shape[0] == len(ids)
    assert json.loads(paths.features_meta("t").read_text())
    (epoch, ledger), = paths.ledgers()
    t = pq.read_table(ledger).to_pydict()
    assert epoch == 0 and t["id"] == ids and 0 < sum(t["kept"]) < len(ids)
    assert paths.gallery.exists()
    assert not (tmp_path / "run").exists(), "the config's own run_dir was written, not the override's"
    assert {"fire-test-curation", "fire-test-gallery"} <= set(artifacts), sorted(artifacts)
    kept, _, _ = ledger_counts(run_dir)           # the served run's table has the ledger's numbers
    rows = table_rows(artifacts["fire-test-curation"]["data"], "class (pseudo-label)")
    assert sum(int(r[0]) for r in rows.values()) == sum(kept.values()) > 0
    timing["images"] = images
    out = os.environ.get("WEBKD_SCHEDULES_FIRE_OUT")
    if out:
        Path(out).write_text(json.dumps(timing, indent=2) + "\n")
