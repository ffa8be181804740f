"""A one-minute cron that fires a curate run: runs the slow test tests/test_schedules_fire.py
(`prefect server start` on a free port, `webkd serve` against it with cron `* * * * *` on a tiny
real config, until one scheduled curate run is COMPLETED; outputs checked, everything stopped)
and prints how long the first scheduled run took from its cron tick to completion.

    .venv/bin/python bench/schedules_fire.py

Numbers (seconds): server start (a new database is migrated), serve start to the run COMPLETED
(includes the wait for the next minute tick), tick -> the flow run's start (the server's scheduler
and the runner's poll, PREFECT_RUNNER_POLL_FREQUENCY, 10 s by default), the run itself, and tick
-> completed. Results: bench/results/schedules_fire.json.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        env = {**os.environ, "WEBKD_SCHEDULES_FIRE_OUT": str(out), "HF_HUB_OFFLINE": "1"}
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
                            "tests/test_schedules_fire.py"], cwd=ROOT, env=env)
        wall = time.time() - t0
        if r.returncode != 0 or not out.exists():
            print(f"bench/schedules_fire.py: the slow test failed (exit {r.returncode})", file=sys.stderr)
            return 1
        timing = json.loads(out.read_text())
    timing.update(test_wall_s=round(wall, 1), cpus=os.cpu_count(), python=platform.python_version())
    for key, label in (("server_start_s", "prefect server start -> healthy"),
                       ("serve_to_completed_s", "webkd serve start -> first scheduled run COMPLETED"),
                       ("tick_to_start_s", "cron tick -> flow run started"),
                       ("run_s", "flow run started -> COMPLETED"),
                       ("tick_to_completed_s", "cron tick -> COMPLETED (first scheduled run)"),
                       ("test_wall_s", "whole slow test (teacher training, pool, teardown)")):
        print(f"{label:<55} {timing[key]:>7.1f} s")
    print(f"images in the pool: {timing['images']}")
    res = ROOT / "bench" / "results" / "schedules_fire.json"
    res.write_text(json.dumps(timing, indent=2) + "\n")
    print(f"results: {res.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
