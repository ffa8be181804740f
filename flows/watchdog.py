"""Stops the temporary Prefect server of a `webkd` process once that process is gone.

With no PREFECT_API_URL, Prefect runs flows against a temporary server in a child process and
stops it at a normal exit; a CLI killed by a signal (SIGKILL, the OOM killer) would leave it
running. `start(pid)` launches `python -m webkd.flows.watchdog PID` in its own session: it notes
the server among PID's children (Linux /proc) and stops it once PID has exited.
"""
import os
import signal
import subprocess
import sys
import time

MARKER = b"prefect.server.api.server:create_app"   # on the temporary server's command line


def _servers(parent: int) -> set[int]:
    found = set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or d == str(os.getpid()):
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if ppid == parent and MARKER in f.read():
                    found.add(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return found


def watch(parent: int, poll_s: float = 0.5) -> None:
    """Until `parent` is gone (this process is re-parented), then SIGTERM its servers."""
    seen: set[int] = set()
    while os.getppid() == parent:
        if not seen:
            seen = _servers(parent)
        time.sleep(poll_s)
    for pid in seen:                       # still that server (not a reused pid)? stop it
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if MARKER in f.read():
                    os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


def start(parent: int | None = None) -> subprocess.Popen | None:
    """Launch the watchdog for `parent` (default: this process); None where there is no /proc."""
    if not os.path.isdir("/proc"):
        return None
    return subprocess.Popen([sys.executable, "-m", "webkd.flows.watchdog", str(parent or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
