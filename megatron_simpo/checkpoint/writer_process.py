"""Megatron-Core's checkpoint writer kept alive through a stop signal.

Megatron-Core's filesystem writer returns each save's results through a queue served by a
``multiprocessing`` manager process, which it starts (by spawn) at a process's first save and
keeps for the later ones. A stop signal for the whole run reaches that process too: torchrun's
agent passes SIGTERM on to each rank's process group (``killpg``), and Slurm's ``scancel``
signals every process of the job. The manager ended, and the save that the signal asked for
failed on its dead queue: a run stopped after its first periodic save lost its last steps.

:func:`keep_through_stop_signals` starts that queue before training, in a manager process that
ignores SIGTERM and SIGINT (the rank decides when to stop) and is killed when its rank dies.
This module imports nothing heavy at its top: the manager process imports it to start.
"""

from __future__ import annotations

import signal


def _serve_queue_only(rank_pid: int) -> None:
    """The manager process's start (its initializer): stop signals are its rank's to act on."""
    import os

    from megatron_simpo.distributed.lifecycle import die_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)  # never outlives the rank (PR_SET_PDEATHSIG; Linux)
    if os.getppid() != rank_pid:  # the rank died before that took effect
        os._exit(1)


def _megatron_queue_getter():
    """Megatron-Core's getter of the writer's results queue (renamed in 0.17)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    for name in ("get_write_results_queue", "_get_write_results_queue"):
        if hasattr(filesystem_async, name):
            return filesystem_async, getattr(filesystem_async, name)
    raise RuntimeError("megatron.core.dist_checkpointing.strategies.filesystem_async has no "
                       "write-results queue getter: this Megatron-Core is not supported")


_queue = None
"""The queue this process started (None: none yet)."""


def keep_through_stop_signals():
    """Start the queue Megatron-Core's checkpoint writer reports through, in a manager process
    that a stop signal leaves running, and return it; a later call keeps it. Call from the main
    thread (the manager dies with that thread), while no save is in flight."""
    import multiprocessing
    import os
    from multiprocessing.managers import SyncManager

    global _queue
    module, getter = _megatron_queue_getter()
    if _queue is None or getattr(module, "_results_queue", None) is not _queue:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_serve_queue_only, initargs=(os.getpid(),))
        _queue = manager.Queue()  # the proxy keeps its manager alive
        module._results_queue = _queue
    if getter() is not _queue:
        raise RuntimeError("Megatron-Core's checkpoint writer did not take the prepared "
                           "results queue: this Megatron-Core is not supported")
    return _queue
