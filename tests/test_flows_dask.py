"""The curate flow on a Dask cluster (flows.task_runner=dask) under a real temporary Prefect
server, on real clothing / PACS JPEG files plus broken and duplicate files: the ingest and
feature shards run on 2 worker processes of a real `distributed.LocalCluster`, and the manifest,
quarantine and feature arrays equal those of the local runner. A worker SIGKILLed while shards
run does not change the outcome (its shards are redone on the other worker; shard outputs are
keyed on content, so a shard done twice is not done differently)."""
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

pytest.importorskip("prefect_dask")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

CLASSES = ["dress", "pants", "shoes"]


@pytest.fixture(scope="module")
def pool_root(tmp_path_factory, clothing, pacs_jpeg) -> Path:
    from PIL import Image

    from webkd.pipeline.config import ModelSpec, PreprocessSpec
    from webkd.training.models import build_model, save_weights
    import torch

    root = tmp_path_factory.mktemp("dask")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        k = clothing.class_names.index(name)
        for i in rng.choice(np.flatnonzero(clothing.labels == k), 20, replace=False):
            p = root / "web" / name / f"c{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(clothing.images[i]).save(p, quality=90)
    blobs, _ = pacs_jpeg
    for i in rng.choice(len(blobs), 10, replace=False):
        (root / "web" / "dress" / f"pacs{i}.jpg").write_bytes(blobs[i])
    first = sorted((root / "web" / "dress").glob("c*.jpg"))[0]
    (root / "web" / "pants" / "copy.jpg").write_bytes(first.read_bytes())          # duplicate
    (root / "web" / "shoes" / "cut.jpg").write_bytes(first.read_bytes()[:300])      # truncated
    (root / "web" / "shoes" / "page.jpg").write_bytes(b"<html><body>404</body></html>")
    torch.manual_seed(0)
    spec = ModelSpec(name="cnn_small", kwargs={"width": 8}, preprocess=PreprocessSpec(size=32))
    save_weights(build_model(spec, len(CLASSES)), root / "teacher.safetensors")
    return root


def _config(root: Path, run: str, **flows) -> Path:
    cfg = {"name": f"dask-{run}", "run_dir": str(root / run),
           "data": {"sources": [f"folder:{root / 'web'}"], "classes": CLASSES, "image_size": 32},
           "teachers": [{"key": "t", "name": "cnn_small", "kwargs": {"width": 8},
                         "weights": str(root / "teacher.safetensors"), "preprocess": {"size": 32}}],
           "student": {"name": "cnn_tiny", "preprocess": {"size": 32}},
           "flows": {"retry_delay_s": 0, "shard_size": 8, **flows}}
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _outcome(run: Path) -> dict:
    man = pq.read_table(run / "manifest.parquet").to_pydict()
    quar = pq.read_table(run / "quarantine.parquet").to_pydict()
    return {"ids": man["id"], "uris": [Path(u).name for u in man["uri"]], "status": man["status"],
            "quarantine": sorted((Path(u).name, r, i or "") for u, r, i in zip(quar["uri"], quar["reason"], quar["id"])),
            "emb": np.load(run / "features" / "t.npy"), "logits": np.load(run / "features" / "t.logits.npy")}


def _same(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"] and a["uris"] == b["uris"] and a["status"] == b["status"]
    assert a["quarantine"] == b["quarantine"]
    np.testing.assert_array_equal(a["emb"], b["emb"])
    np.testing.assert_array_equal(a["logits"], b["logits"])


def _run(config: Path) -> dict:
    from webkd.flows.curate import curate_flow
    from webkd.flows.runners import flow_for

    return flow_for(curate_flow, str(config))(config_path=str(config))


def test_dask_runner_matches_local_and_survives_a_killed_worker(prefect_server, pool_root):
    from distributed import Client, LocalCluster

    local = _run(_config(pool_root, "local"))
    ref = _outcome(pool_root / "local")
    assert local["records"] == len(ref["ids"]) >= 60
    assert {r for _, r, _ in ref["quarantine"]} >= {"duplicate", "truncated", "not_an_image"}

    # a temporary LocalCluster of 2 worker processes, made by the DaskTaskRunner
    _run(_config(pool_root, "dask", task_runner="dask", n_workers=2))
    _same(_outcome(pool_root / "dask"), ref)
    assert not (pool_root / "dask" / "shards").exists()          # shard files merged and removed

    # an existing cluster (flows.address); one worker SIGKILLed once shards are being written
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = sorted(client.run(os.getpid).values())
        killed: list[int] = []

        def kill_when_shards_appear() -> None:
            shards = pool_root / "kill" / "shards"
            deadline = time.time() + 240
            while time.time() < deadline and not killed:
                if shards.exists() and any(shards.rglob("*.json")):
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=kill_when_shards_appear, daemon=True)
        watcher.start()
        _run(_config(pool_root, "kill", task_runner="dask", address=cluster.scheduler_address))
        watcher.join(5)
        assert killed, "no worker was killed: the shards never started"
        _same(_outcome(pool_root / "kill"), ref)
