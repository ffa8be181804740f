"""Task runners for the curate / refresh flows (`flows.task_runner` in the config).

- `local` (default): Prefect's thread-pool runner in this process; the shards run here.
- `dask`: `prefect_dask.DaskTaskRunner` on the cluster at `flows.address` (a running
  `dask scheduler`), or on a temporary `distributed.LocalCluster` of `flows.n_workers`
  single-threaded worker processes when no address is given.
- `ray`: `prefect_ray.RayTaskRunner` on the Ray cluster at `flows.address` (or a local one).

Only the shard tasks (ingest shards, feature shards) are submitted to the runner; the plans,
merges and every other stage run in the flow's own process. Shard tasks are idempotent (their
outputs are keyed on their content, pipeline/shards.py), so a task Dask recomputes after a worker
died (PrefectHQ/prefect#15442) finds its file and does no work twice. Workers read and write the
run directory: it must be on storage every worker sees (one machine, NFS, a shared volume).
"""
import os
from typing import Any, Callable

from webkd.pipeline.config import Config, ConfigError, FlowsConfig, load_config

_PACKAGES = {"dask": ("prefect_dask", "prefect-dask", "webkd[dask]"), "ray": ("prefect_ray", "prefect-ray", "webkd[ray]")}


def check_runner(fc: FlowsConfig) -> None:
    """flows.task_runner's package is installed (one line naming the key and the install)."""
    if fc.task_runner == "local":
        return
    module, dist, extra = _PACKAGES[fc.task_runner]
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"flows.task_runner: {fc.task_runner} needs the {dist} package, which is not installed: "
                          f"pip install '{extra}' (or flows.task_runner=local)") from None


def build_task_runner(fc: FlowsConfig) -> Any:
    """The Prefect task runner of `fc`, or None for `local` (the flow's default)."""
    check_runner(fc)
    if fc.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if fc.address:
            return DaskTaskRunner(address=fc.address)
        # the LocalCluster's workers without Dask's statistical profiler (a stack sample every 10 ms
        # under the GIL): feature shards at 100k on 2 workers 120.7 / 120.6 s without it against
        # 132.7 / 128.8 / 131.1 s with it (BENCHMARKS.md, Scale). A value the user set wins; a
        # cluster of the user's own (flows.address) keeps its configuration.
        os.environ.setdefault("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False")
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": fc.n_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if fc.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=fc.address) if fc.address else RayTaskRunner()
    return None


def with_task_runner(flow_fn: Any, cfg: Config) -> Any:
    """`flow_fn` set to run its tasks on the config's task runner."""
    runner = build_task_runner(cfg.flows)
    return flow_fn if runner is None else flow_fn.with_options(task_runner=runner)


def flow_for(flow_fn: Any, config_path: str, overrides: list[str] | None = None) -> Callable[..., Any]:
    """The flow as the config wants it run (the task runner is fixed before the flow starts)."""
    return with_task_runner(flow_fn, load_config(config_path, overrides or []))
