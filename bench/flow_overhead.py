"""What the Prefect flow adds to a small curate: `webkd curate` on 60 real clothing photos with the
shipped Fashion-MNIST teacher, as library calls (`--no-flow`) and as the Prefect flow (temporary
local server), each cold (new run directory) and again with nothing new (every stage up to date).

    python bench/flow_overhead.py [--images 60] [--repeats 2]

Each call is a fresh `webkd` process, timed from the outside (interpreter start and imports
included), so the numbers are what a user waits for. The flow runs twice over: with no
PREFECT_API_URL (Prefect starts a temporary server for every call) and against a running local
server (`prefect server start`, as `webkd serve` needs anyway), which leaves what the flow itself
adds. Results: bench/results/flow_overhead.json.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "flows" / "configs" / "fashion_web.yaml"


def write_pool(folder: Path, n: int) -> None:
    """n clothing photos (64 px JPEG) in query folders, in the demo's query names."""
    from PIL import Image

    from webkd.pipeline import datasets

    clothing = datasets.load_clothing()
    picked = list(range(0, len(clothing.labels), max(1, len(clothing.labels) // n)))[:n]  # spread over classes
    for i in picked:
        d = folder / clothing.class_names[clothing.labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(clothing.images[i]).save(d / f"c{i}.jpg", quality=90)


def timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "webkd.flows", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"webkd {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def start_server(env: dict[str, str], port: int = 4281) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1 in this PREFECT_HOME; returns (process, api url)."""
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("prefect server did not start within 180 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2, help="cold + no-op pairs per mode (median reported)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="webkd-flow-overhead-"))
    try:
        write_pool(work / "web", args.images)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=str(work / "prefect"), OMP_WAIT_POLICY="PASSIVE")
        common = [str(CONFIG), f"data.sources=[folder:{work / 'web'}]", "data.test_source=null"]
        # the first flow call of a new PREFECT_HOME migrates the server's database: not counted
        timed(["curate", *common, f"run_dir={work / 'warmup'}"], env)
        times: dict[str, list[float]] = {k: [] for k in ("no_flow_cold", "no_flow_noop", "flow_cold", "flow_noop")}
        for r in range(args.repeats):
            for mode, flag in (("no_flow", ["--no-flow"]), ("flow", [])):
                run = work / f"{mode}_{r}"
                times[f"{mode}_cold"].append(timed(["curate", *flag, *common, f"run_dir={run}"], env))
                times[f"{mode}_noop"].append(timed(["curate", *flag, *common, f"run_dir={run}"], env))
        server, url = start_server(env)
        try:
            senv = {**env, "PREFECT_API_URL": url}
            times.update(server_cold=[], server_noop=[])
            for r in range(args.repeats):
                run = work / f"server_{r}"
                times["server_cold"].append(timed(["curate", *common, f"run_dir={run}"], senv))
                times["server_noop"].append(timed(["curate", *common, f"run_dir={run}"], senv))
        finally:
            server.terminate()
            server.wait(timeout=30)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        out = {"images": args.images, "repeats": args.repeats, "seconds": times, "median": med,
               "flow_overhead_cold_s": med["flow_cold"] - med["no_flow_cold"],
               "flow_overhead_noop_s": med["flow_noop"] - med["no_flow_noop"],
               "flow_overhead_with_server_cold_s": med["server_cold"] - med["no_flow_cold"],
               "flow_overhead_with_server_noop_s": med["server_noop"] - med["no_flow_noop"],
               "command": "python bench/flow_overhead.py " + " ".join(sys.argv[1:]), "machine": f"{os.cpu_count()} cores"}
        print(f"| curate of {args.images} images | --no-flow | flow, temporary server | overhead | "
              "flow, running server | overhead |\n|---|---:|---:|---:|---:|---:|")
        for k in ("cold", "noop"):
            base = med["no_flow_" + k]
            print(f"| {'new run directory' if k == 'cold' else 'again, nothing new'} | {base:.1f} s | "
                  f"{med['flow_' + k]:.1f} s | {med['flow_' + k] - base:+.1f} s | "
                  f"{med['server_' + k]:.1f} s | {med['server_' + k] - base:+.1f} s |")
        from webkd.pipeline.storage import atomic_write_json

        atomic_write_json(ROOT / "bench" / "results" / "flow_overhead.json", out)
        print(json.dumps(med))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
