"""Starting the ranks of an expert-parallel artifact: `--nproc N`, or under `torchrun`.

`moe-runtime generate|serve|bench ARTIFACT --nproc N` starts N local processes through
torch.distributed's elastic launch API (what `torchrun` runs), each re-running the same command
as one rank; `torchrun --nnodes ... --nproc-per-node ... -m moec.runtime ...` does the same across
machines. Either way each process joins the group from the environment the launcher set
(RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL on GPUs, gloo on CPU. Collectives time out after
MOEC_COLLECTIVE_TIMEOUT_S (120 s): a rank that dies or hangs stops the others with an error
instead of a hang.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import sys
import uuid
from typing import NoReturn

import torch
import torch.distributed as dist

from moec.errors import MoecError, first_line


class RankError(MoecError):
    """A rank of an expert-parallel group failed, stopped or timed out."""


def group_failed(rank: int, world: int, error: BaseException) -> RankError:
    """The one-line error for a collective that failed because a peer died or hung."""
    return RankError(f"rank {rank} of {world}: the expert-parallel group failed ({first_line(error)}); another rank stopped "
                     f"or timed out — restart all {world} ranks")


def collective_timeout_s() -> float:
    return float(os.environ.get("MOEC_COLLECTIVE_TIMEOUT_S", "120"))


def join_group_from_env() -> None:
    """Join the process group a launcher described in the environment (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=collective_timeout_s()))
    atexit.register(leave_group)


def in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def leave_group() -> None:
    """Destroy the process group while the interpreter is still whole. Left to the interpreter's
    teardown, gloo's worker threads can still hold work whose tensors need the GIL to be freed,
    and a rank that stopped cleanly dies of SIGABRT (a follower's exit code -6 after `serve` shut
    down, once in CI on 2026-12-06). `moe-runtime` processes end through `exit_rank`, which calls
    this first; anything else that joined the group runs it at exit."""
    if in_group():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group that already failed has nothing left to tear down
            pass


def exit_rank(code: int) -> NoReturn:
    """End a rank's process: leave the group, flush, then os._exit(code). A rank that returns to
    the interpreter's teardown can still die of SIGABRT there after the group is destroyed
    ("terminate called without an active exception": a C++ thread of torch.distributed's still
    joinable when its static owner is destroyed), a follower's exit code -6 after `serve` shut
    down cleanly: 1 of 32 two-rank serve-and-stop runs on 2026-12-06, none of 96 through here.
    Ranks started by `--nproc` end the same way (multiprocessing's children leave through
    os._exit)."""
    leave_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say there
            pass
    os._exit(code)


def is_rank_zero() -> bool:
    return not in_group() or dist.get_rank() == 0


def _rank_main(argv: list[str]) -> int:
    from moec.runtime.cli import main

    return main(argv)


def run_ranks(nproc: int, argv: list[str]) -> int:
    """Run `moe-runtime argv` as `nproc` local ranks; 0 when all succeed, else a one-line error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"moec-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    try:
        codes = elastic_launch(config, _rank_main)(argv)
    except ChildFailedError as e:
        rank, failure = next(iter(e.failures.items()))
        raise RankError(f"rank {rank} of {nproc} failed (exit code {failure.exitcode}); the other ranks were "
                        "stopped — see its output above") from None
    return max(codes.values() or [0])
