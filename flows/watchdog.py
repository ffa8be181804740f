"""Stops the temporary Prefect servers of a `webkd` process once that process is gone.

With no PREFECT_API_URL, Prefect runs flows against a temporary server in a child process and
stops it at a normal exit; a CLI killed by a signal (SIGKILL, the OOM killer) would leave it
running. `start()` (once per process, however many flows it runs) tags this process's
environment with `WEBKD_WATCHDOG_TOKEN=<pid>-<random>`, which every process it starts from then
on inherits (Prefect hands `os.environ` to the server), and launches
`python -m webkd.flows.watchdog PID TOKEN` in its own session. Once PID has exited, the watchdog
stops every temporary server that carries the token (Linux /proc): not only the first one it
could have seen. Prefect starts a second server on another port when the first exits with
code 3 (uvicorn binds its port only after the database migration, so another process can take
the port in the meantime), and a child of PID may start a server of its own. SIGTERM first,
SIGKILL for a server still there `GRACE_S` later.
"""
import os
import secrets
import signal
import subprocess
import sys
import time

MARKER = b"prefect.server.api.server:create_app"   # on the temporary server's command line
ENV = "WEBKD_WATCHDOG_TOKEN"
GRACE_S = 5.0                                       # SIGTERM -> SIGKILL (Prefect's own stop waits 5 s)

_started: dict[int, subprocess.Popen | None] = {}  # pid -> its watchdog (a forked child gets its own)


def servers(token: str) -> set[int]:
    """Live processes (not this one) with the server's command line and ENV=token in their environment."""
    needle = f"{ENV}={token}".encode()
    found = set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if MARKER not in f.read():             # also skips zombies (empty command line)
                    continue
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.add(int(d))
        except OSError:                                # gone meanwhile, or another user's
            pass
    return found


def stop_servers(token: str, grace_s: float = GRACE_S, settle_s: float = 1.0, poll_s: float = 0.2,
                 limit_s: float = 60.0) -> list[int]:
    """Stop every server carrying `token`; scan again until none has been seen for `settle_s`
    (a server whose start was under way when its parent died shows up a moment later).
    Returns the pids signalled."""
    termed: dict[int, float] = {}
    start = quiet_since = time.monotonic()
    while time.monotonic() - start < limit_s:
        now = time.monotonic()
        live = servers(token)
        for pid in live:
            if pid not in termed:
                termed[pid] = now
                _signal(pid, signal.SIGTERM)
            elif now - termed[pid] >= grace_s:
                _signal(pid, signal.SIGKILL)
        if live:
            quiet_since = now
        elif now - quiet_since >= settle_s:
            break
        time.sleep(poll_s)
    return sorted(termed)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def watch(parent: int, token: str, poll_s: float = 0.5) -> None:
    """Until `parent` is gone (this process is re-parented), then stop its servers."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    stop_servers(token)


def start() -> subprocess.Popen | None:
    """Tag this process's environment and launch its watchdog, once per process; None where
    there is no /proc."""
    pid = os.getpid()
    if pid in _started:
        return _started[pid]
    proc = None
    if os.path.isdir("/proc"):
        token = f"{pid}-{secrets.token_hex(6)}"
        os.environ[ENV] = token                     # every server started from here on carries it
        proc = subprocess.Popen([sys.executable, "-m", "webkd.flows.watchdog", str(pid), token],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    _started[pid] = proc
    return proc


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
