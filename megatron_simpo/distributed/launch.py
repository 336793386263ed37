"""Run a function on several local ranks (spawned processes) and collect what each returns.

Used where a command needs a small world of its own without torchrun: the checkpoint converter
(one process per TP x PP rank, on CPU) and the tests. ``run_on_ranks`` starts fresh processes
for one call; :class:`LocalWorld` keeps its processes for many calls (each call still gets a new
process group and Megatron parallel state), which saves the start-up of Python, torch and
Megatron-Core per call: the test suite's main cost on a small machine.
"""

from __future__ import annotations

import contextlib
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
    """Run ``fn(rank, *args)`` as ``rank`` of a world on ``port``; its result (or traceback) is
    saved to ``out_dir``; the process group and parallel state are torn down after it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = ("ok", fn(rank, *args))
    except BaseException:  # report every failure to the parent, with its traceback
        result = ("error", traceback.format_exc())
    finally:
        try:
            from megatron_simpo.distributed import runtime

            runtime.shutdown()
        except Exception:  # shutting down after a failure must not hide the failure
            pass
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _fresh_entry(parent: int, *args) -> None:
    """A :func:`run_on_ranks` rank: it dies with its parent, process ``parent`` (a killed
    converter publishes nothing), then runs as :func:`_entry`."""
    import signal

    from megatron_simpo.distributed.lifecycle import die_with_parent

    die_with_parent(signal.SIGKILL, parent)
    _entry(*args)


@contextlib.contextmanager
def _ctrl_c_left_to_this_process():
    """Processes started in the block ignore SIGINT (an ignored signal stays ignored across
    exec, and Python then installs no KeyboardInterrupt handler): Ctrl-C reaches the whole
    process group, and the parent alone acts on it, ending its ranks."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_on_ranks(world_size: int, fn, *args, timeout: float | None = None) -> list:
    """Call ``fn(rank, *args)`` in ``world_size`` fresh processes; return their results by rank.

    ``fn`` must be a module-level function. A failure on any rank raises with that rank's
    traceback. However this call ends (a stop signal, Ctrl-C), no rank outlives it.
    """
    port = _free_port()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        processes = [context.Process(target=_fresh_entry,
                                     args=(os.getpid(), r, world_size, port, out_dir, fn, args))
                     for r in range(world_size)]
        try:
            with _ctrl_c_left_to_this_process():
                for process in processes:
                    process.start()
            for process in processes:
                process.join(timeout)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return _collect(out_dir, world_size,
                        lambda rank: f"exit code {processes[rank].exitcode}; timeout {timeout}s?")


def _collect(out_dir: str, world_size: int, why_missing) -> list:
    results = []
    for rank in range(world_size):
        path = Path(out_dir) / f"rank{rank}.pt"
        if not path.exists():
            raise RuntimeError(f"rank {rank} produced no result ({why_missing(rank)})")
        status, value = torch.load(path, weights_only=False)
        if status == "error":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        results.append(value)
    return results


def _serve(rank: int, world_size: int, connection) -> None:
    """A :class:`LocalWorld` rank: run the calls it is sent until told to stop (None)."""
    import gc

    while True:
        task = connection.recv()
        if task is None:
            _exit_now()
        port, out_dir, fn, args = task
        _entry(rank, world_size, port, out_dir, fn, args)
        gc.collect()
        connection.send(_thread_count())


def _exit_now() -> None:
    """End a served rank without the interpreter's shutdown, which takes seconds here (torch's
    leftover gloo groups, dist checkpointing's result-queue manager): the rank's results are
    already on disk, so only its own child processes need stopping."""
    import multiprocessing
    import sys

    for child in multiprocessing.active_children():
        child.kill()  # a checkpoint writer's queue manager ignores SIGTERM (writer_process)
        child.join(5)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _thread_count() -> int:
    """Threads of this process (Linux; 0 elsewhere): a call that leaves a model alive keeps its
    gloo process groups' threads, so a caller can replace a rank that holds many."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


class LocalWorld:
    """``world_size`` spawned ranks kept for many :meth:`run` calls.

    Every call gets a fresh process group (a new port) and Megatron parallel state, torn down
    after it; what a call leaves in its processes' own module state stays, so calls must not
    depend on a fresh interpreter (those use :func:`run_on_ranks`). A call that fails on a rank
    raises with that rank's traceback and the world stays usable; one that times out kills it.
    """

    def __init__(self, world_size: int):
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.threads = 0
        """The most threads a rank held after the last call (see ``_thread_count``)."""
        self._connections, self._processes = [], []
        for rank in range(world_size):
            parent, child = context.Pipe()
            # Not daemonic: a rank may start processes itself (dist checkpointing does).
            process = context.Process(target=_serve, args=(rank, world_size, child))
            process.start()
            self._connections.append(parent)
            self._processes.append(process)

    @property
    def alive(self) -> bool:
        return all(process.is_alive() for process in self._processes)

    def run(self, fn, *args, timeout: float | None = None) -> list:
        """Call ``fn(rank, *args)`` on every rank; their results by rank (as ``run_on_ranks``)."""
        import time

        port = _free_port()
        with tempfile.TemporaryDirectory() as out_dir:
            for connection in self._connections:
                connection.send((port, out_dir, fn, args))
            deadline = None if timeout is None else time.monotonic() + timeout
            threads = []
            for rank, connection in enumerate(self._connections):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    if not connection.poll(left):
                        raise TimeoutError(f"no result within {timeout}s")
                    threads.append(connection.recv())
                except (TimeoutError, EOFError, OSError) as error:
                    self.close(kill=True)
                    raise RuntimeError(f"rank {rank} failed: {error or 'its process died'}; the "
                                       f"world was stopped") from None
            self.threads = max(threads)
            return _collect(out_dir, self.world_size, lambda rank: "no result file")

    def close(self, kill: bool = False) -> None:
        for connection, process in zip(self._connections, self._processes):
            if process.is_alive() and not kill:
                try:
                    connection.send(None)
                except (BrokenPipeError, OSError):
                    pass
            process.join(0 if kill else 30)
            if process.is_alive():
                process.kill()
                process.join()
