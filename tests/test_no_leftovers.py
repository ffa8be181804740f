"""No process outlives what started it (issue 12, item 12).

flows/watchdog.py, with real processes killed by SIGKILL: a CLI process that starts its watchdog
twice (two flows in one process, as the demo does) gets one watchdog; once it is killed, every
temporary server carrying its token goes, whoever its parent is (a server started by a child
that has exited, i.e. already an orphan), also one that ignores SIGTERM; a server without the
token (another process's) stays. Stand-in servers are `python -c "sleep"` processes with the
server's marker on their command line. The session check of conftest.py: an inner pytest
session whose test leaves a process behind fails, names the test, and kills the process."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import procs

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")

ROOT = Path(__file__).resolve().parent.parent
MARK = procs.SERVER.decode()
SLEEP = "import time; time.sleep(120)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"

PARENT = f"""
import os, subprocess, sys, time
from webkd.flows import watchdog
w = watchdog.start()
assert watchdog.start() is w
subprocess.Popen([sys.executable, "-c", {SLEEP!r}, {MARK!r}])
subprocess.run([sys.executable, "-c", "import subprocess, sys; "
                "subprocess.Popen([sys.executable, '-c', {STUBBORN!r}, {MARK!r}], start_new_session=True)"])
env = {{k: v for k, v in os.environ.items() if k != watchdog.ENV}}
other = subprocess.Popen([sys.executable, "-c", {SLEEP!r}, {MARK!r}], env=env, start_new_session=True)
print(os.environ[watchdog.ENV], other.pid, flush=True)
time.sleep(120)
"""


def test_watchdog_stops_every_tagged_server_of_a_killed_process():
    from webkd.flows.watchdog import ENV

    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    other = None
    try:
        token, other = parent.stdout.readline().split()
        other = int(other)

        def tagged():
            return procs.scan({ENV: token}, procs.SERVER)

        deadline = time.time() + 30
        while len(tagged()) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert len(tagged()) == 2, "the stand-in servers did not start"
        dogs = procs.scan(cmdline=f"webkd.flows.watchdog\0{parent.pid}\0".encode())
        assert len(dogs) == 1, f"one watchdog per process, found {len(dogs)}"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        left = procs.wait_gone(tagged, timeout_s=15)
        procs.kill(left)
        assert not left, "servers outlived their killed process: " + "; ".join(procs.describe(*x) for x in left.items())
        assert not procs.wait_gone(lambda: procs.scan(cmdline=f"webkd.flows.watchdog\0{parent.pid}\0".encode()), 5)
        assert procs.scan(cmdline=procs.SERVER).get(other), "the watchdog stopped a server that was not its own"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if other:
            procs.kill([other])


LEAKY_TEST = """
import subprocess

def test_leaves_a_sleeper():
    subprocess.Popen(["sleep", "300"])
"""


def test_session_fails_when_a_test_leaves_a_process(tmp_path):
    import shutil

    for name in ("conftest.py", "procs.py"):
        shutil.copy(Path(__file__).parent / name, tmp_path / name)
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 passed" in out.stdout
    assert "left behind" in out.stdout and "test_leaky.py::test_leaves_a_sleeper" in out.stdout
    assert "sleep 300" in out.stdout
    pid = int(out.stdout.split("left behind:")[1].split("pid ")[1].split(":")[0])
    time.sleep(0.5)
    assert not procs.scan(cmdline=b"sleep\x00300").get(pid), "the session check did not kill what it found"
