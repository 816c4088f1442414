"""Training one task with several processes: torchrun, DistributedDataParallel, rank 0 records.

`torchrun --nproc-per-node N -m taps_cl task add …` starts N copies of the command; `joined`
puts each into one torch.distributed process group (gloo on the CPU, nccl with one GPU per local
rank) and `fit` trains with DistributedDataParallel on a DistributedSampler shard of the training
set. Every rank builds the same model from the same seed, so only rank 0 needs to write: it
records the run, and stores and finishes the task once every rank has agreed that training
succeeded (`RankGroup.agree`). A rank that fails makes its peers fail too: its process exits, which
breaks their next collective at once (a peer that hangs instead is given up after
`COLLECTIVE_TIMEOUT`), and torchrun stops the rest with SIGTERM, which rank 0 turns into
discarding its row.

`task add --nproc N` starts torchrun itself (`launch`) with a rendezvous that only uses files and
the loopback interface: torchrun's default TCP store listens on every interface.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

from taps_cl.errors import TapsError, first_line
from taps_cl.training.evaluate import EvalResult, evaluate

log = logging.getLogger(__name__)

# How long a collective waits for a peer that is alive but does not answer (a peer that dies
# closes its connections and fails the collective at once). Covers the skew between ranks
# before the first collective, when every rank loads the data and builds the model.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# A torch.distributed init_method URL the workers use instead of torchrun's env:// TCP store;
# `launch` sets it to a file so that nothing listens beyond the loopback interface.
INIT_METHOD_ENV = "TAPS_CL_INIT_METHOD"
# Seconds `launch` gives torchrun to stop its workers (rank 0 removes its row) when interrupted.
SHUTDOWN_SECONDS = 60
# What a rank says when it stops because another one failed; `Launched.error` skips these to
# find the failure that started it.
PEER_FAILED = "stopped because another training process failed or stopped"
_QUIET_LOGGERS = ("taps_cl", "registry")  # worker ranks print errors only


@dataclass(frozen=True)
class RankGroup:
    """This process's place among the processes training one task (one process: rank 0 of 1)."""

    rank: int  # global rank; rank 0 alone writes to the registry
    world_size: int  # processes training together
    local_rank: int  # rank on this machine: picks the GPU
    backend: Optional[str] = None  # "gloo" or "nccl"; None in a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sampler(self, dataset: Dataset, seed: int) -> Optional[DistributedSampler]:
        """This rank's shard of `dataset`, shuffled by `seed` the same way on every rank (call
        `set_epoch` every epoch); None in a single process, where the loader shuffles."""
        if not self.distributed:
            return None
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank,
                                  shuffle=True, seed=seed, drop_last=False)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call in training: DistributedDataParallel (gradients averaged over the
        ranks, parameters and buffers copied from rank 0 first), or `model` itself."""
        if not self.distributed:
            return model
        device = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def all_sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64), the same on every rank."""
        if not self.distributed:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(totals)
        return [float(v) for v in totals.cpu()]

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (norm statistics) to every rank: DDP copies them before each
        training step, so the last step leaves each rank with its own."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int) -> EvalResult:
        """`evaluate` over the whole dataset, each rank scoring every world_size-th sample; the
        sums are reduced, so every rank gets the same result and makes the same choice."""
        if not self.distributed:
            return evaluate(model, dataset, batch_size=batch_size)
        shard = Subset(dataset, range(self.rank, len(dataset), self.world_size))  # type: ignore[arg-type]
        mine = evaluate(model, shard, batch_size=batch_size) if len(shard) else None
        sums = (0.0, 0.0, 0.0) if mine is None else (
            round(mine.accuracy * mine.num_samples), mine.loss * mine.num_samples,
            mine.num_samples)
        correct, loss, count = self.all_sum(*sums)
        return EvalResult(accuracy=correct / count, loss=loss / count, num_samples=int(count))

    def agree(self, ok: bool = True) -> None:
        """Return only when every rank reports `ok`: rank 0 records nothing another rank did not
        finish. A rank that failed never gets here; its exit (or the timeout) fails this call."""
        if not self.distributed:
            if not ok:
                raise TapsError("training failed")
            return
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) != 1:
            raise TapsError(PEER_FAILED)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")


SINGLE = RankGroup(rank=0, world_size=1, local_rank=0)
_active: list[RankGroup] = [SINGLE]


def active_group() -> RankGroup:
    """The group `joined` opened in this process, or SINGLE."""
    return _active[-1]


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher with its variables) started this process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _environment() -> RankGroup:
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise TapsError(f"torchrun variables RANK/WORLD_SIZE/LOCAL_RANK unreadable: {exc}") \
            from None
    return RankGroup(rank=rank, world_size=world, local_rank=local)


def training_device(device: str, local_rank: int) -> torch.device:
    """This rank's device for the task's --device: cuda:<local rank> for "cuda" (and for "auto"
    where CUDA is available), else the CPU; TapsError for what cannot be shared out."""
    if device.startswith("mps"):
        raise TapsError("DistributedDataParallel trains on the CPU (gloo) or on CUDA GPUs "
                        "(nccl), not on mps")
    if device.startswith("cuda:"):
        raise TapsError(f"--device {device}: with several processes each trains on its own GPU "
                        "(cuda:<local rank>); give --device cuda")
    if device not in ("auto", "cpu", "cuda"):
        raise TapsError(f"unknown device {device!r} (auto, cpu or cuda with several processes)")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count <= local_rank:
        raise TapsError(f"process {local_rank} of this machine needs GPU cuda:{local_rank} but "
                        f"{count} GPU(s) are visible; start fewer processes or use --device cpu")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def joined(device: str) -> Iterator[tuple[RankGroup, str]]:
    """Join torchrun's process group for one task's training, and leave it afterwards.

    Yields the group and the device this rank trains on (`device` unchanged in a single
    process). Not under torchrun, or with one process, it is SINGLE and nothing is set up.
    Worker ranks log errors only. A collective broken by a failed peer is re-raised as a
    TapsError saying so (`PEER_FAILED`).
    """
    if not under_torchrun() or _environment().world_size == 1:
        yield SINGLE, device
        return
    where = _environment()
    target = training_device(device, where.local_rank)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    group = RankGroup(where.rank, where.world_size, where.local_rank, backend)
    dist.init_process_group(
        backend, init_method=os.environ.get(INIT_METHOD_ENV) or "env://", rank=group.rank,
        world_size=group.world_size, timeout=COLLECTIVE_TIMEOUT,
    )
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    if not group.is_main:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    _active.append(group)
    try:
        yield group, str(target)
    except BaseException as exc:
        # This rank is failing and torchrun is about to stop the others with SIGTERM: one
        # arriving here would cut short the clean-up (closing the registry) and the error line.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if _broken_collective(exc):
            raise TapsError(f"{PEER_FAILED} ({first_line(exc)})") from exc
        raise
    finally:
        _active.remove(group)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        dist.destroy_process_group()


def _broken_collective(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because a peer went away or timed out."""
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(mark in text for mark in ("gloo/transport", "Connection closed by peer",
                                         "Connection reset by peer", "Timed out", "NCCL"))


# -------------------------------------------------------------------- launching torchrun


@dataclass(frozen=True)
class Launched:
    """What a torchrun run of N processes gave back."""

    returncode: int  # torchrun's exit status (non-zero when any rank failed)
    stdout: str  # the ranks' standard output (only rank 0 prints)
    rank_stderr: dict[int, str] = field(default_factory=dict)  # each rank's standard error
    torchrun_stderr: str = ""  # torchrun's own log and failure report

    @property
    def error(self) -> Optional[str]:
        """One line for a failed run: the first rank's error that did not just follow another
        rank's failure, naming the rank; None when the run succeeded."""
        if self.returncode == 0:
            return None
        found = [(rank, line[len("Error: "):]) for rank, text in sorted(self.rank_stderr.items())
                 for line in text.splitlines() if line.startswith("Error: ")]
        first = [(rank, msg) for rank, msg in found if not msg.startswith(PEER_FAILED)]
        for rank, msg in first or found:
            return f"rank {rank} of {len(self.rank_stderr)}: {msg}"
        tail = [line for line in self.torchrun_stderr.splitlines() if line.strip()]
        return (f"torchrun exited with status {self.returncode}"
                + (f": {tail[-1].strip()}" if tail else ""))


def _loopback_interface() -> Optional[str]:
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def torchrun_command(nproc: int, target: Sequence[str], workdir: Path) -> tuple[list[str],
                                                                                dict[str, str]]:
    """The command line and environment that run `target` (["-m", "taps_cl", …] or a script and
    its arguments) as `nproc` processes on this machine.

    The rendezvous goes through files in `workdir` (which must be new), the process group
    through a FileStore, gloo and nccl over the loopback interface: nothing listens beyond
    127.0.0.1. Each rank's standard error lands in `workdir/logs`.
    """
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc-per-node", str(nproc), "--max-restarts", "0",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", str(workdir / "rendezvous"),
        "--rdzv-conf", "store_type=file", "--rdzv-id", f"taps-cl-{uuid.uuid4().hex[:12]}",
        "--local-addr", "127.0.0.1", "--log-dir", str(workdir / "logs"), "--redirects", "2",
        *target,
    ]
    env = dict(os.environ)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # no TCP store in torchrun itself
    env[INIT_METHOD_ENV] = (workdir / "group").as_uri()
    # torchrun would set 1 thread and say so; share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    loopback = _loopback_interface()
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
        env.setdefault("NCCL_SOCKET_IFNAME", loopback)
    return argv, env


def _rank_logs(logs: Path, name: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for path in sorted(logs.glob(f"*/attempt_*/*/{name}")):
        if path.parent.name.isdigit():
            found[int(path.parent.name)] = path.read_text(errors="replace")
    return found


def launch(nproc: int, target: Sequence[str]) -> Launched:
    """Run `target` as `nproc` processes under torchrun and wait for them.

    Interrupted (Ctrl-C, SIGTERM), it asks torchrun to stop its workers, so that rank 0 removes
    its unfinished task, and waits for that before re-raising.
    """
    with tempfile.TemporaryDirectory(prefix="taps-cl-torchrun-") as tmp:
        argv, env = torchrun_command(nproc, target, Path(tmp))
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=SHUTDOWN_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
        return Launched(proc.returncode, out, _rank_logs(Path(tmp) / "logs", "stderr.log"), err)


def check_launch(nproc: int, device: str, batch_size: int) -> None:
    """Refuse, with one line, a `--nproc` that cannot work here (before starting anything)."""
    if under_torchrun():
        raise TapsError("--nproc starts torchrun itself: under torchrun leave it out "
                        "(torchrun's --nproc-per-node says how many processes)")
    if nproc <= 1:
        return
    if batch_size % nproc:
        raise TapsError(f"--batch-size {batch_size} does not split evenly over {nproc} "
                        "processes (it counts the samples of one step, over all processes)")
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise TapsError(f"--nproc {nproc} with --device auto: {torch.cuda.device_count()} GPU(s) "
                        f"for {nproc} processes; give --device cpu or at most "
                        f"--nproc {torch.cuda.device_count()}")
    if device == "cuda" and torch.cuda.device_count() < nproc:
        raise TapsError(f"--nproc {nproc} with --device cuda needs {nproc} GPUs; "
                        f"{torch.cuda.device_count()} visible")
    training_device(device, 0)  # mps, cuda:N and unknown names are refused the same way


def without_option(args: Sequence[str], option: str) -> list[str]:
    """`args` with every `option VALUE` / `option=VALUE` removed (the launcher's own option)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
