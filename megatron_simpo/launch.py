"""Run a function on several local ranks (spawned processes) and collect what each returns.

Used where a command needs a small world of its own without torchrun: the checkpoint converter
(one process per TP x PP rank, on CPU) and the tests.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = ("ok", fn(rank, *args))
    except BaseException:  # report every failure to the parent, with its traceback
        result = ("error", traceback.format_exc())
    finally:
        try:
            from megatron_simpo import runtime

            runtime.shutdown()
        except Exception:  # shutting down after a failure must not hide the failure
            pass
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_on_ranks(world_size: int, fn, *args, timeout: float | None = None) -> list:
    """Call ``fn(rank, *args)`` in ``world_size`` fresh processes; return their results by rank.

    ``fn`` must be a module-level function. A failure on any rank raises with that rank's traceback.
    """
    port = _free_port()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        processes = [context.Process(target=_entry, args=(r, world_size, port, out_dir, fn, args))
                     for r in range(world_size)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout)
        for process in processes:
            if process.is_alive():
                process.kill()
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} produced no result (exit code "
                                   f"{processes[rank].exitcode}; timeout {timeout}s?)")
            status, value = torch.load(path, weights_only=False)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
    return results
