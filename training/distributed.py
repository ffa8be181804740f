"""Training on several processes: data-parallel with torchrun's conventions and one explicit
gradient all-reduce per step (gloo on CPU, NCCL on CUDA, one GPU per process).

A `Dist` says who this process is (rank, world size, device); `LOCAL` is the single process,
for which every method is a no-op, so `fit` runs the same code on one process as on N.

How a global batch is shared. Every rank walks the same globally ordered batches (the same
seeded shuffle) and takes the contiguous slice `shard(B)` of each: B / N rows. The augmentation
draws are made for the whole batch and sliced, so every row is cropped as on one process. A
rank's loss is the weighted sum over its rows divided by the weight sum of the whole batch (one
small all-reduce), and the gradients are summed across ranks (one flat all-reduce after
backward), so the update equals the single-process update of the same batch up to float
rounding, for any model whose forward treats images independently (GroupNorm, LayerNorm, no
norm; frozen teachers in eval mode). BatchNorm in training mode normalises with its own
shard's statistics, as torch DDP does without SyncBatchNorm (not available on CPU); its running
statistics are averaged across ranks after every step: running means are then those of the
global batch, running variances the mean of the shard variances. Randomness a method draws per
batch (mixup, teacher dropping) comes from a stream of its own per rank, and batch-wide terms
(MixSKD's mixing, contrastive terms) see the rank's shard: same distribution, not the same
numbers as one process.

Scoring (the per-epoch reselection, validation) is split across ranks in blocks of the
evaluation batch and all-gathered (`gather_rows`), so every rank holds the same logits, computed
with the same block boundaries as on one process; the selection rank 0 made is broadcast.
Rank 0 alone reads the checkpoint to resume from and broadcasts its decision and state, and
alone writes checkpoints, ledgers and metrics (`is_writer`).

`process_group()` joins a group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); `launch(fn, nproc, ...)` spawns nproc local processes with those set
(MASTER_ADDR 127.0.0.1, a free port) and returns rank 0's result.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from webkd.pipeline.config import ConfigError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "WEBKD_DDP_TIMEOUT_S"   # how long a rank waits in a collective (rank 0 may score the whole pool)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class WorkerFailed(RuntimeError):
    """A training process was killed or exited without a result (one line for the CLI)."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes checkpoints, ledgers and metrics."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n rows (the sizes of `np.array_split(range(n), world)`)."""
        q, r = divmod(n, self.world)
        start = self.rank * q + min(self.rank, r)
        return slice(start, start + q + int(self.rank < r))

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `t` (a new tensor on t's device); `t` itself on one process."""
        if not self.active:
            return t
        out = t.detach().to(self.device, copy=True)
        tdist.all_reduce(out)
        return out.to(t.device)

    def reduce_step(self, params: Iterable[torch.Tensor], buffers: Iterable[torch.Tensor],
                    loss: torch.Tensor) -> torch.Tensor:
        """After backward: gradients summed over ranks (each rank's loss is its part of the global
        mean), floating buffers (BatchNorm running statistics) averaged; returns the global loss."""
        if not self.active:
            return loss.detach()
        grads = [p.grad for p in params if p.grad is not None]
        bufs = [b for b in buffers if b.is_floating_point()]
        total = loss.detach().reshape(1).clone()
        _all_reduce_sum([*grads, *bufs, total])
        for b in bufs:
            b.div_(self.world)
        return total[0]

    @torch.no_grad()
    def broadcast_modules(self, modules: Sequence[torch.nn.Module]) -> None:
        """Parameters and buffers of `modules` as rank 0 has them, on every rank."""
        if self.active:
            ts = [t for m in modules for t in (*m.parameters(), *m.buffers())]
            for group in _by_kind(ts):
                flat = _flatten_dense_tensors(group).to(self.device)
                tdist.broadcast(flat, src=0)
                for t, f in zip(group, _unflatten_dense_tensors(flat, group)):
                    t.copy_(f)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable) on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_writer else None]
        tdist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def share_start(self, resumed: Any, stateful: Sequence[Any]) -> Any:
        """Rank 0's resume decision, and the state of `stateful` (models, optimiser, scheduler: anything
        with state_dict / load_state_dict) as rank 0 has it, on every rank."""
        if not self.active:
            return resumed
        payload = (resumed, [_to_cpu(s.state_dict()) for s in stateful]) if self.is_writer else None
        resumed, states = self.broadcast_object(payload)
        if not self.is_writer:
            for s, state in zip(stateful, states):
                s.load_state_dict(state)
        return resumed

    def gather_rows(self, fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, block: int) -> np.ndarray:
        """fn(rows), computed in blocks of `block` rows shared out across ranks and all-gathered in
        order: every rank gets the whole result, with the block boundaries of one process."""
        if not self.active:
            return fn(rows)
        s = self.shard(-(-len(rows) // block))
        parts: list[Any] = [None] * self.world
        tdist.all_gather_object(parts, fn(rows[s.start * block:s.stop * block]))
        full = [p for p in parts if p.size]
        return np.concatenate(full) if full else parts[0]


LOCAL = Dist()


def _by_kind(ts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in ts:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def _all_reduce_sum(ts: list[torch.Tensor]) -> None:
    """In-place sum over ranks of every tensor of `ts`, one all-reduce per dtype and device."""
    for group in _by_kind(ts):
        flat = _flatten_dense_tensors(group)
        tdist.all_reduce(flat)
        for t, f in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(f)


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# checks, process groups, the local launcher
# --------------------------------------------------------------------------------------------
def torchrun_world() -> int:
    """The world size torchrun (or any launcher with its conventions) started this process in; 1 if none."""
    if not all(os.environ.get(k) for k in TORCHRUN_ENV):
        return 1
    try:
        return max(int(os.environ["WORLD_SIZE"]), 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number (set by torchrun)") from None


def _wants_cuda(device_name: str | None) -> bool:
    name = (device_name or "auto").strip().lower()
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def check_processes(nproc: int, batch_size: int, device_name: str | None, where: str = "train.nproc") -> None:
    """One-line `ConfigError` for a multi-process training that cannot run as configured."""
    if nproc < 1:
        raise ConfigError(f"{where}={nproc}: needs at least 1 process")
    if nproc == 1:
        return
    if batch_size % nproc:
        raise ConfigError(f"train.batch_size={batch_size} is not a multiple of {where}={nproc}: each process takes "
                          f"batch_size / nproc rows of every global batch; use a batch size divisible by {nproc}")
    if _wants_cuda(device_name):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device={device_name}: {where}={nproc} on CUDA (NCCL) needs GPUs and none is visible "
                              f"here; use device=cpu (gloo) or run on a machine with GPUs")
        if where == "train.nproc" and n < nproc:
            raise ConfigError(f"{where}={nproc}: NCCL training takes one GPU per process and {n} are visible; "
                              f"use --nproc {n} or less, or device=cpu")


def check_rows(nproc: int, rows: int) -> None:
    """Every process needs rows to train on."""
    if nproc > 1 and nproc > rows:
        raise ConfigError(f"train.nproc={nproc}: the pool has only {rows} training row(s); use --nproc {max(rows, 1)} "
                          f"or less")


def _device(device_name: str | None, local_rank: int) -> torch.device:
    if not _wants_cuda(device_name):
        return torch.device("cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= n:
        raise ConfigError(f"LOCAL_RANK={local_rank}: NCCL training takes one GPU per process and {n} are visible "
                          f"on this machine; start at most {n} processes per node")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device_name: str | None = "auto") -> Iterator[Dist]:
    """Join the process group torchrun's environment describes (NCCL when the device is CUDA,
    one GPU per local rank; gloo otherwise); left at exit."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = _device(device_name, local)
    kw: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kw["device_id"] = device
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 7200))), **kw)
    try:
        yield Dist(rank=rank, world=world, local_rank=local, device=device)
    finally:
        tdist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logger_levels() -> dict[str, int]:
    return {name: lg.level for name, lg in logging.Logger.manager.loggerDict.items()
            if isinstance(lg, logging.Logger) and lg.level}


def _entry(rank: int, world: int, port: int, device_name: str | None, levels: dict[str, int],
           fn: Callable[..., Any], args: tuple, results) -> None:
    # the launcher's death (spawn's PR_SET_PDEATHSIG is SIGINT) or a Ctrl-C ends a worker at once,
    # also while it waits inside a collective
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    root = levels.pop("", logging.INFO)
    logging.basicConfig(level=root if rank == 0 else max(root, logging.WARNING),
                        format=f"%(levelname)s %(name)s{'' if rank == 0 else f' [rank {rank}]'}: %(message)s")
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    with process_group(device_name) as d:
        out = fn(d, *args)
    if rank == 0:
        results.send(out)


def launch(fn: Callable[..., Any], nproc: int, args: tuple = (), device_name: str | None = "auto") -> Any:
    """Run `fn(dist, *args)` on `nproc` spawned local processes joined in one group (MASTER_ADDR
    127.0.0.1, a free port) and return rank 0's result. A worker that is killed or fails ends the
    others; a kill is reported as one line (`WorkerFailed`), a Python error with its traceback."""
    import torch.multiprocessing as mp

    results, sender = mp.get_context("spawn").Pipe(duplex=False)
    levels = {**_logger_levels(), "": logging.getLogger().getEffectiveLevel()}
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")   # "Terminating process ..." per survivor
    spawn_level, _ = spawn_log.level, spawn_log.setLevel(logging.ERROR)
    pc = mp.start_processes(_entry, args=(nproc, free_port(), device_name, levels, fn, args, sender),
                            nprocs=nproc, join=False, start_method="spawn")
    out: list[Any] = []
    try:
        while not pc.join(timeout=0.2):
            while results.poll():          # read while they run: a large result must not fill the pipe
                out.append(results.recv())
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        codes = [p.exitcode for p in pc.processes]
        killed = [(i, c) for i, c in enumerate(codes) if c is not None and c < 0 and -c != signal.SIGTERM]
        if killed:
            i, c = killed[0]
            raise WorkerFailed(f"training process {i} of {nproc} was killed ({signal.Signals(-c).name}); the others "
                               f"were stopped. Run the same command again to resume from the last checkpoint") from None
        if isinstance(exc, mp.ProcessExitedException):
            raise WorkerFailed(f"training process {exc.error_index} of {nproc} exited with code {exc.exit_code}; "
                               f"the others were stopped") from None
        raise
    finally:
        spawn_log.setLevel(spawn_level)
        for p in pc.processes:
            if p.is_alive():
                p.kill()
                p.join()
    while results.poll():
        out.append(results.recv())
    if not out:
        raise WorkerFailed(f"the {nproc} training processes ended without a result")
    return out[-1]
