"""Every crash point of a whole run resumes to the same run directory (issue 12, crash-point item).

One small run - ingest -> pixels -> features -> index -> fit (2 epochs) -> evaluate -> export ->
register (archive under students/, registry, promote) - on real photos written by Pillow, with
what a user's `webkd distill` runs: `flows.stages.distill.distill` (the body of `webkd distill
--no-flow` and of the distill flow's training task) and `flows.stages.refresh.register_distilled`
(the flow's register task), under the run directory's lock, without Prefect (the flow's tasks
are these calls; a Prefect server per kill point would not fit the time).

The writes of an uninterrupted run are counted (`WEBKD_WRITE_LOG`, pipeline/storage); then for
kill point k the run is killed by a real SIGKILL right after its k-th write
(`WEBKD_KILL_AT_WRITE=k`), run again without the kill, and its run directory compared with the
uninterrupted one: the same files, the same bytes (manifest, quarantine, caches, index,
ledgers, checkpoints, metrics, exported weights and metadata, registry modulo timestamps).

A run is a process forked from a "zygote" process that has imported torch and the stages once
(importing them costs ~6 s per process here, the run itself ~2 s): the forked child is a real
process, killed by a real SIGKILL, and the zygote reports its wait status. The uninterrupted
reference itself is a fresh `python driver.py CONFIG` process, and the forked uninterrupted run
must equal it, so forking changes nothing that is compared.

The export is the safetensors one (`export.onnx: false`): the ONNX export costs ~7 s per run
here, more than the rest of the run, and its file is written into the same staged export folder.

The default suite tries a spread of kill points (the first and last write of every stage and a
few in between); `-m slow` tries every one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from webkd.pipeline.storage import KILL_AT_WRITE, WRITE_LOG

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dress", "pants"]

DRIVER = r'''
"""`python driver.py CONFIG`: one run (distill with ingest/features/index first, then register);
`python driver.py --serve`: read JSON lines {"config", "env", "log"} on stdin, fork one run per
line, answer {"status": <os.waitpid status>} per line."""
import json
import os
import sys
import traceback


def main(config):
    from webkd.flows.checks import check_run
    from webkd.flows.stages import distill, refresh
    from webkd.pipeline.config import load_config
    from webkd.pipeline.storage import run_lock

    cfg = check_run(load_config(config, []))
    with run_lock(cfg.paths.lock, "crash-point driver"):
        print("registered", refresh.register_distilled(cfg, distill.distill(cfg))["version"], flush=True)


def serve():
    # what the run imports, imported once here (the forked runs share it)
    import faiss, PIL.Image, pyarrow.parquet, safetensors.torch  # noqa: F401
    import torch, torch._dynamo, torch.optim  # noqa: F401
    import webkd.flows.checks, webkd.flows.stages.distill, webkd.flows.stages.refresh  # noqa: F401
    import webkd.pipeline.ingest, webkd.pipeline.features, webkd.pipeline.index_stage  # noqa: F401
    import webkd.training.loop, webkd.training.export, webkd.training.registry, webkd.training.card  # noqa: F401
    import webkd.selection.policy, webkd.selection.counts  # noqa: F401
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(job["env"])
                sys.argv = [__file__, job["config"]]
                main(job["config"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        main(sys.argv[1])
'''


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    for k in (KILL_AT_WRITE, WRITE_LOG, "WEBKD_CACHE"):
        env.pop(k, None)
    return env


class Zygote:
    """The forking server: `run(env)` forks one run and returns its wait status."""

    def __init__(self, driver: Path, config: Path):
        self.config, self.n = config, 0
        self.proc = subprocess.Popen([sys.executable, str(driver), "--serve"], cwd=ROOT, env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, env: dict[str, str], log: Path) -> int:
        self.proc.stdin.write(json.dumps({"config": str(self.config), "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the zygote died (exit {self.proc.poll()})"
        return json.loads(line)["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def scenario(clothing, tmp_path_factory):
    """24 real photos of two classes in query folders, a copy of one under the other query (a
    duplicate row) and a truncated JPEG (a quarantine row); every run uses the same run_dir, so
    paths written into files (config, model card) are the same in every run."""
    from conftest import write_query_folder

    root = tmp_path_factory.mktemp("crash")
    names = list(clothing.class_names)
    idx = np.concatenate([np.flatnonzero(clothing.labels == names.index(c))[:12] for c in CLASSES])
    files = write_query_folder(root / "web", clothing.images[idx], clothing.labels[idx], names)
    (root / "web" / "pants" / "copy_of_a_dress.jpg").write_bytes(files[0].read_bytes())
    (root / "web" / "pants" / "broken.jpg").write_bytes(files[1].read_bytes()[:200])
    import torch

    from webkd.pipeline.config import ModelSpec
    from webkd.training.models import build_model, save_weights

    torch.manual_seed(0)     # a saved teacher: one without weights is a new random net in every process
    save_weights(build_model(ModelSpec(name="cnn_tiny"), num_classes=len(CLASSES)), root / "teacher.safetensors")
    cfg = {"name": "crash", "run_dir": str(root / "run"), "seed": 1,
           "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32,
                    "val_fraction": 0.25},
           "teachers": [{"key": "t", "name": "cnn_tiny", "weights": str(root / "teacher.safetensors")}], "student": {"key": "s", "name": "cnn_tiny"},
           "train": {"method": "kd", "epochs": 2, "batch_size": 8}, "export": {"onnx": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (root / "driver.py").write_text(DRIVER)
    return root


# ---- what is compared ------------------------------------------------------------------------
# Left out of the comparison, each for a reason (everything else: every file by name and bytes):
#   run.lock          the lock file filelock leaves behind (empty; present or not depending on
#                     whether the lock's last holder was killed) - not a result of the run
VOLATILE_FILES = {"run.lock"}
# JSON keys that hold the wall-clock time of the run that wrote them:
#   registry.json(.bak): entries' "created" / "promoted"; export/registry_version.json: "copied"
VOLATILE_KEYS = {"created", "promoted", "copied"}
# Lines of text that hold the wall-clock time: the model card's "Created <UTC time> with torch ..."
VOLATILE_LINE = "Created "


def _drop_keys(obj):
    if isinstance(obj, dict):
        return {k: _drop_keys(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_drop_keys(v) for v in obj]
    return obj


def _content(p: Path) -> str:
    data = p.read_bytes()
    if p.name.endswith((".json", ".json.bak")):
        data = json.dumps(_drop_keys(json.loads(data)), sort_keys=True).encode()
    elif p.suffix == ".md":
        lines = data.decode().splitlines()
        data = "\n".join(ln[:ln.index(VOLATILE_LINE)] + VOLATILE_LINE + "<time>" + ln[ln.index(" with torch"):]
                         if VOLATILE_LINE in ln and " with torch" in ln else ln for ln in lines).encode()
    return hashlib.sha256(data).hexdigest()


def snapshot(run: Path) -> dict[str, str]:
    """relative path -> content hash of every file under `run` (hidden ones too), and '<dir>' for
    every folder (an empty leftover folder counts)."""
    out = {}
    for d, dirs, files in os.walk(run):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), run) + "/"] = "<dir>"
        for name in files:
            p = Path(d) / name
            rel = os.path.relpath(p, run)
            if rel not in VOLATILE_FILES:
                out[rel] = _content(p)
    return out


def diff(got: dict[str, str], want: dict[str, str]) -> list[str]:
    return ([f"missing {k}" for k in sorted(set(want) - set(got))] +
            [f"extra {k}" for k in sorted(set(got) - set(want))] +
            [f"differs {k}" for k in sorted(set(got) & set(want)) if got[k] != want[k]])


# ---- the runs ----------------------------------------------------------------------------------
_PID_IN_NAME = re.compile(r"^(\.export\.(?:new-v\d+|old))-[\d-]+")   # registry's temp folders: pid (and ns)


def read_write_log(log: Path, run: Path) -> list[str]:
    """The targets of a run's writes, in order, relative to its run directory (the pid in the
    name of a temporary export folder written as `*`)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [_PID_IN_NAME.sub(r"\1-*", os.path.normpath(os.path.relpath(ln.split("\t", 1)[1], run)))
            for ln in lines]


# a run's writes by stage: the first target that names a stage starts it; writes that name none
# (metrics.json, the manifest rewritten by the index, the final export rename) go with the stage
# before them
STAGES = [("ingest", ("shards/ingest", ".ingest_round")), ("pixels", ("pixels/",)),
          ("features", ("features",)), ("index", ("index/",)), ("fit", ("selection/", "checkpoints/")),
          ("export", (".export.build",)), ("register", ("students/", "registry.json"))]


def stages_of(targets: list[str]) -> list[str]:
    out, stage = [], "start"
    for t in targets:
        for name, prefixes in STAGES:
            if t.startswith(prefixes):
                stage = name
        out.append(stage)
    return out


def spread(targets: list[str], n: int = 14) -> list[int]:
    """Kill points (1-based write numbers) for the default suite: the first and the last write of
    every stage, topped up with evenly spaced ones to about `n`."""
    st = stages_of(targets)
    picks = {1, len(targets)}
    for i, s in enumerate(st):
        if i == 0 or st[i - 1] != s:
            picks.add(i + 1)
        if i == len(st) - 1 or st[i + 1] != s:
            picks.add(i + 1)
    for k in np.linspace(1, len(targets), max(n - len(picks), 0) + 2).round().astype(int):
        if len(picks) >= n:
            break
        picks.add(int(k))
    return sorted(picks)


@pytest.fixture(scope="module")
def zygote(scenario):
    z = Zygote(scenario / "driver.py", scenario / "cfg.yaml")
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference(scenario, zygote):
    """The uninterrupted run, in a fresh process: its snapshot and the targets of its writes (run
    while the zygote imports)."""
    log = scenario / "reference.writes"
    p = subprocess.run([sys.executable, str(scenario / "driver.py"), str(scenario / "cfg.yaml")], cwd=ROOT,
                       env=dict(_env(), **{WRITE_LOG: str(log)}), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "registered v0001" in p.stdout, p.stdout
    targets = read_write_log(log, scenario / "run")
    os.rename(scenario / "run", scenario / "reference")
    return snapshot(scenario / "reference"), targets


def kill_and_resume(scenario: Path, zygote: Zygote, k: int, want: dict[str, str], targets: list[str]) -> list[str]:
    """Run killed after write k, then again to the end: what differs from the reference ([] = same)."""
    run = scenario / "run"
    shutil.rmtree(run, ignore_errors=True)
    log = scenario / f"kill{k}.writes"
    log.unlink(missing_ok=True)
    status = zygote.run({KILL_AT_WRITE: str(k), WRITE_LOG: str(log)}, scenario / f"kill{k}.out")
    out = (scenario / f"kill{k}.out").read_text()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status, out[-3000:])
    done = read_write_log(log, run)
    assert done == targets[:k], f"kill point {k}: the killed run's writes were not the reference's first {k}"
    status = zygote.run({}, scenario / f"resume{k}.out")
    out = (scenario / f"resume{k}.out").read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (k, status, out[-3000:])
    return ([] if "registered v0001" in out else [f"re-run said {out.strip().splitlines()[-1]!r}"]) + \
        diff(snapshot(run), want)


# ---- the tests ---------------------------------------------------------------------------------
def test_reference_run_covers_every_stage_and_a_forked_run_is_the_same(scenario, reference, zygote):
    want, targets = reference
    assert [s for s, _ in STAGES] == list(dict.fromkeys(s for s in stages_of(targets) if s != "start"))
    # what the run must have produced, so a comparison of two empty folders cannot pass
    for f in ("manifest.parquet", "quarantine.parquet", "pixels/rgb32_squash.npy", "features/t.npy",
              "index/t.faiss", "selection/epoch_001.parquet", "checkpoints/last.pt", "checkpoints/best.pt",
              "metrics.json", "export/student.safetensors", "export/student.json", "export/model_card.md",
              "students/v0001/export/student.safetensors", "registry.json"):
        assert f in want, f
    reasons = pq.read_table(scenario / "reference" / "quarantine.parquet").column("reason").to_pylist()
    assert "duplicate" in reasons and len(reasons) >= 2, reasons
    reg = json.loads((scenario / "reference" / "registry.json").read_text())
    assert reg["champion"] == "v0001" and [e["version"] for e in reg["entries"]] == ["v0001"]

    log = scenario / "forked.writes"
    status = zygote.run({WRITE_LOG: str(log)}, scenario / "forked.out")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (scenario / "forked.out").read_text()[-3000:]
    assert read_write_log(log, scenario / "run") == targets
    assert diff(snapshot(scenario / "run"), want) == []


def test_spread_of_crash_points_resume_identical(scenario, reference, zygote):
    want, targets = reference
    points = spread(targets)
    assert {1, len(targets)} <= set(points) and len(points) >= 12, points
    bad = {k: d for k in points if (d := kill_and_resume(scenario, zygote, k, want, targets))}
    assert not bad, "\n".join(f"kill after write {k} ({targets[k - 1]}): {d}" for k, d in bad.items())


@pytest.mark.slow
def test_every_crash_point_resumes_identical(scenario, reference, zygote):
    want, targets = reference
    bad = {k: d for k in range(1, len(targets) + 1) if (d := kill_and_resume(scenario, zygote, k, want, targets))}
    print(f"crash points: {len(targets)} writes, {len(targets)} tried, {len(targets) - len(bad)} resumed identical")
    assert not bad, "\n".join(f"kill after write {k} ({targets[k - 1]}): {d}" for k, d in bad.items())
