"""Processes by what they carry (Linux /proc): the tests that kill a CLI and the session check of
conftest.py find what a test started by its environment, not by who its parent was (an orphan
is re-parented to init)."""
from __future__ import annotations

import os
import signal
import time

SERVER = b"prefect.server.api.server:create_app"   # on a Prefect server's command line (uvicorn)


def scan(environ: dict[str, str] | None = None, cmdline: bytes | None = None,
         env_prefix: tuple[str, str] | None = None) -> dict[int, bytes]:
    """pid -> command line of the live processes (not this one, no zombies) whose environment
    holds every KEY=VALUE of `environ`, whose command line contains `cmdline`, and (optionally)
    one of whose variables `env_prefix[0]` starts with `env_prefix[1]`."""
    needles = [f"{k}={v}".encode() for k, v in (environ or {}).items()]
    prefix = (f"{env_prefix[0]}=".encode(), env_prefix[1].encode()) if env_prefix else None
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            if not cmd or (cmdline is not None and cmdline not in cmd):
                continue
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:                       # gone meanwhile, or another user's process
            continue
        if all(n in env for n in needles) and (
                prefix is None or any(e.startswith(prefix[0]) and e[len(prefix[0]):].startswith(prefix[1])
                                      for e in env)):
            out[int(d)] = cmd
    return out


def env_of(pid: int, key: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for e in f.read().split(b"\0"):
                if e.startswith(key.encode() + b"="):
                    return e[len(key) + 1:].decode(errors="replace")
    except OSError:
        pass
    return None


def wait_gone(find, timeout_s: float, poll_s: float = 0.2) -> dict[int, bytes]:
    """Poll `find()` (pid -> command line) until it is empty or `timeout_s` passes; what is left."""
    deadline = time.monotonic() + timeout_s
    left = find()
    while left and time.monotonic() < deadline:
        time.sleep(poll_s)
        left = find()
    return left


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def describe(pid: int, cmd: bytes) -> str:
    text = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
    return f"pid {pid}: {text[:160]}"
