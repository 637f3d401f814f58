"""Start a data-parallel run's ranks as processes of one torch.distributed group, and supervise them.

`launch(world, device_type, job, args, hooks)` spawns `world` processes (a fresh interpreter each, safe
beside the caller's threads) that call `job(ranks, device, hooks, *args)` on devices cuda:0..N-1 (NCCL), or
on the CPU (gloo), where rank 0's `hooks` pass its reports on to the caller's. The caller's process stays the
supervisor:

- rank 0 reports each epoch to it and waits until the caller's `on_epoch` has recorded it (which may raise,
  e.g. to cancel: the ranks are then ended), so a report is never lost to a crash after its checkpoint;
  progress inside an epoch goes the same way without the wait (`on_progress` may raise to cancel too);
- the caller's `stop_requested` reaches rank 0, which stops every rank after its next checkpoint
  (`TrainingInterrupted` is raised here once they have);
- a rank that raises ends the run with its message (`RankFailed`): the others' errors are gathered for up
  to ERROR_GRACE_S and the run reports the cause, not a peer's "connection reset" that the supervisor may
  have read first (`root_cause`); a rank that dies without a message (killed, out of memory) ends it with
  `RankLost` within a poll interval; the others are killed either way, and the last checkpoint stays
  valid for a resume;
- no rank outlives the supervisor: each is killed by the kernel when its parent dies, and every exit of
  `launch` (return, exception, KeyboardInterrupt) kills and reaps whatever is still running.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from models.contract.metrics import EpochMetrics, StepProgress
from models.core.ranks import Ranks

R = TypeVar("R")
POLL_S = 0.2  # how soon a dead rank, a stop request or a finished run is noticed
ERROR_GRACE_S = 2.0  # after a rank raised, how long the others may take to report theirs (to find the cause)
COLLECTIVE_TIMEOUT = timedelta(hours=2)  # a rank waits this long for the others (rank 0 evaluates meanwhile)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TrainingHooks:
    """How a training reports to whoever runs it, and learns it should stop (after its next checkpoint)."""

    on_epoch: Callable[[EpochMetrics], None] | None = None
    on_progress: Callable[[StepProgress], None] | None = None
    stop_requested: Callable[[], bool] = lambda: False


class RankFailed(Exception):
    """A rank raised an exception: the run fails with its message."""

    def __init__(self, rank: int, type_name: str, text: str, details: str, secondary: bool = False) -> None:
        super().__init__(f"{type_name}: {text}" if rank == 0 else f"rank {rank}: {type_name}: {text}")
        self.rank, self.type_name, self.text, self.details = rank, type_name, text, details
        # a consequence of another rank's failure: a collective whose peer went away, or a rank that died after
        self.secondary = secondary or _lost_peer(type_name, text)


# What a rank's collective raises when a peer has gone: not the cause of the run's failure.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited", "Socket Timeout")


def _lost_peer(type_name: str, text: str) -> bool:
    return type_name in ("DistBackendError", "DistNetworkError") or any(sign in text for sign in _PEER_GONE)


def root_cause(failures: dict[int, RankFailed]) -> RankFailed:
    """The failure a run reports when several ranks failed: the lowest rank's own error, before any rank's
    error about a peer that went away (whichever the supervisor happened to read first)."""
    ordered = [failures[rank] for rank in sorted(failures)]
    return next((f for f in ordered if not f.secondary), ordered[0])


class RankLost(Exception):
    """A rank died without raising (killed, out of memory): the run can resume from its last checkpoint."""

    def __init__(self, rank: int, exitcode: int) -> None:
        how = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}"
        super().__init__(f"training process of rank {rank} {how}")
        self.rank, self.exitcode = rank, exitcode


def _die_with(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), so a killed worker leaves no rank."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor's cleanup still ends the ranks
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _send(conn: multiprocessing.connection.Connection, message: tuple) -> None:
    # plain pickle: tensors travel by value, not as shared memory that dies with the rank
    conn.send_bytes(pickle.dumps(message))


def _rank_main(rank: int, world: int, rendezvous: str, device_type: str, conn: multiprocessing.connection.Connection,
               stop: Any, parent_pid: int, job: Callable[..., Any], args: tuple) -> None:
    _die_with(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which stops the ranks
    import torch
    import torch.distributed as dist

    from models.core.train import TrainingInterrupted

    ranks = Ranks(rank, world)
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // world))  # the ranks share the host's cores

    def report_epoch(metrics: EpochMetrics) -> None:
        _send(conn, ("epoch", metrics.model_dump()))
        conn.recv_bytes()  # the supervisor has recorded it (or kills this process)

    def report_progress(progress: StepProgress) -> None:
        _send(conn, ("progress", progress.model_dump()))

    hooks = TrainingHooks(report_epoch, report_progress, stop.is_set) if ranks.main else TrainingHooks(
        stop_requested=stop.is_set)

    try:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{rendezvous}",
                                rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        try:
            result = job(ranks, device, hooks, *args)
        finally:
            dist.destroy_process_group()
        _send(conn, ("done", result if ranks.main else None))
    except TrainingInterrupted as exc:
        _send(conn, ("interrupted", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - whatever it was, the supervisor reports it
        _send(conn, ("error", type(exc).__name__, str(exc), traceback.format_exc()))
        raise SystemExit(1) from None


def launch(world: int, device_type: str, job: Callable[..., R], args: tuple,
           hooks: TrainingHooks = TrainingHooks()) -> R:
    """Run `job` on `world` ranks and return rank 0's result (see the module's docstring). `job` and `args`
    must pickle (a module-level function and plain data)."""
    from models.core.train import TrainingInterrupted

    if device_type == "cuda":
        import torch

        if torch.cuda.device_count() < world:
            raise ValueError(f"this run needs {world} GPUs; this process sees {torch.cuda.device_count()}")
    context = multiprocessing.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="h2t-ranks-")
    stop = context.Event()
    links = [context.Pipe() for _ in range(world)]
    processes = [
        context.Process(target=_rank_main, name=f"h2t-rank-{rank}", daemon=False, args=(
            rank, world, os.path.join(folder, "rendezvous"), device_type, links[rank][1], stop, os.getpid(),
            job, args))
        for rank in range(world)
    ]
    results: dict[int, Any] = {}
    failures: dict[int, RankFailed] = {}  # ranks that raised, gathered for ERROR_GRACE_S to find the cause
    failed_by: float | None = None
    try:
        for process in processes:
            process.start()
        for _, child_end in links:
            child_end.close()
        while len(results) < world:
            if failures and (time.monotonic() >= failed_by or len(results) + len(failures) == world):
                raise root_cause(failures)
            if hooks.stop_requested():
                stop.set()
            live = [r for r in range(world) if r not in results and r not in failures]
            multiprocessing.connection.wait([links[r][0] for r in live] + [processes[r].sentinel for r in live],
                                            timeout=POLL_S)
            for rank in live:
                conn = links[rank][0]
                while rank not in results and rank not in failures and conn.poll():
                    try:
                        message = pickle.loads(conn.recv_bytes())
                    except EOFError:  # the rank died: judged by its exit code below
                        break
                    kind = message[0]
                    if kind == "epoch":
                        if hooks.on_epoch is not None:
                            hooks.on_epoch(EpochMetrics.model_validate(message[1]))
                        conn.send_bytes(b"recorded")
                    elif kind == "progress":
                        if hooks.on_progress is not None:
                            hooks.on_progress(StepProgress.model_validate(message[1]))
                    elif kind == "done":
                        results[rank] = message[1]
                    elif kind == "interrupted":
                        raise TrainingInterrupted(message[1])
                    else:
                        failures[rank] = RankFailed(rank, *message[1:])
                        failed_by = failed_by or time.monotonic() + ERROR_GRACE_S
                ended = rank not in results and rank not in failures and processes[rank].exitcode is not None
                if ended and not failures:
                    raise RankLost(rank, processes[rank].exitcode)
                if ended:  # it died after another rank raised: that rank's error is the run's
                    failures[rank] = RankFailed(rank, "RankLost", str(RankLost(rank, processes[rank].exitcode)),
                                                "", secondary=True)
        return results[0]
    finally:
        _end_all(processes)
        for parent_end, _ in links:
            parent_end.close()
        shutil.rmtree(folder, ignore_errors=True)


def _end_all(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Kill every rank still running and reap them all: nothing outlives `launch`."""
    for process in processes:
        if process.pid is not None and process.exitcode is None:
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join()
