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
    (``megatron_simpo.cli.launch``) passes the line and the code on alone."""
    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.checkpoint.metrics_file import MetricsFileError
    from megatron_simpo.cli.arguments import PROG, parse_args
    from megatron_simpo.cli.flags import note_finished, note_started, run_command
    from megatron_simpo.data.config import DataError
    from megatron_simpo.distributed.lifecycle import die_with_parent
    from megatron_simpo.distributed.runtime import PortInUse
    from megatron_simpo.training.checkpointer import RunFailed
    from megatron_simpo.training.loop import run
    from megatron_simpo.training.resume import ResumeError
    from megatron_simpo.training.run_setup import prepare

    note_started()
    config = parse_args(argv)
    prepared = run_command(PROG, lambda: prepare(config),
                           errors={(ValueError, FileNotFoundError, RuntimeError): 2})
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun: never outlive its agent
        die_with_parent()
    run_command(PROG, lambda: run(config, prepared), distributed=True,
                errors={RunFailed: 3, (checkpointing.CheckpointError, DataError, PortInUse,
                                       ResumeError, MetricsFileError): 2})
    note_finished()


if __name__ == "__main__":  # the guard matters: dist checkpointing spawns helper processes
    main()
