"""``megatron-simpo-train`` (also ``torchrun ... -m megatron_simpo.cli.train``): parse the
training flags, prepare, run.

This module imports nothing heavy at its top: Megatron-Core's checkpoint writer starts a helper
process by ``spawn`` on each process's first save, and that process imports the main module
(this one, under torchrun) before anything else; torch and Megatron-Core are imported by
:func:`main` alone."""

from __future__ import annotations

import os


def main(argv=None) -> None:
    """CLI entry point. A user's mistake (flags, data, checkpoints, disk, a taken MASTER_PORT)
    ends in one ``train_simpo: error: ...`` line from rank 0 and exit code 2; a run that cannot
    go on (non-finite steps, unsavable weights) in one such line and exit code 3. Under raw
    torchrun, torchrun's failure report and exit code 1 follow; the launcher
    (``megatron_simpo.cli.launch``) passes the line and the code on alone.

    A stop signal (SIGTERM, SIGINT) before training begins ends setup at once: nothing was
    saved, and the same command starts again. Alone, the command says so in one line and exits
    0; under torchrun a rank exits 128 + the signal, so that the agent ends the other ranks at
    once (a signal that reached one rank), and the launcher (or rank 0 under raw torchrun)
    says it. From the first step on, the ranks save at the next step boundary
    (``lifecycle``)."""
    from megatron_simpo.cli.flags import (LAUNCHER_ERRORS, note_finished, note_started,
                                          note_training_began)
    from megatron_simpo.distributed.lifecycle import StopRequests, stopped_before_training

    note_started()
    stop_requests = StopRequests(before_training=True, when_training_begins=note_training_began)
    try:
        with stop_requests:
            _prepare_and_run(argv, stop_requests)
    except BaseException as error:
        number = stop_requests.setup_stop(error)
        if not number:
            raise
        if os.environ.get("RANK", "0") == "0" and not os.environ.get(LAUNCHER_ERRORS):
            print(stopped_before_training(number), flush=True)
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            raise SystemExit(128 + number) from None
    note_finished()


def _prepare_and_run(argv, stop_requests) -> None:
    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.checkpoint.metrics_file import MetricsFileError
    from megatron_simpo.cli.arguments import PROG, parse_args
    from megatron_simpo.cli.flags import run_command
    from megatron_simpo.data.config import DataError
    from megatron_simpo.distributed.runtime import PortInUse
    from megatron_simpo.training.checkpointer import RunFailed
    from megatron_simpo.training.loop import run
    from megatron_simpo.training.resume import ResumeError
    from megatron_simpo.training.run_setup import prepare

    config = parse_args(argv)
    stop_requests.limit(config.exit_duration_in_mins, config.exit_interval)
    prepared = run_command(PROG, lambda: prepare(config),  # (under torchrun: dies with it)
                           errors={(ValueError, FileNotFoundError, RuntimeError): 2})
    run_command(PROG, lambda: run(config, prepared, stop_requests), distributed=True,
                errors={RunFailed: 3, (checkpointing.CheckpointError, DataError, PortInUse,
                                       ResumeError, MetricsFileError): 2})


if __name__ == "__main__":  # the guard matters: dist checkpointing spawns helper processes
    main()
