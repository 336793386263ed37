"""``megatron-simpo-reference-logps [--output FILE] <training flags>``: the frozen
reference model's summed log-probs of every pair, written once for DPO/IPO/R-DPO runs
(``training.reference_logps``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_simpo.checkpoint import checkpointing, layout
from megatron_simpo.cli.arguments import build_parser, parse_args
from megatron_simpo.cli.flags import Parser, Section, run_command
from megatron_simpo.data.config import DataError
from megatron_simpo.training.reference_logps import compute, prepare


@dataclass(frozen=True)
class ReferenceLogpsOptions:
    """``megatron-simpo-reference-logps``'s own options, taken out of the training command
    line before it is parsed (the file they name does not exist yet)."""

    output: str | None = None
    """where the log-probs are written (default: --reference-logps)"""
    reference_logps: str | None = None
    """the training command line's file of precomputed log-probs: here, the file written"""

    def __post_init__(self) -> None:
        if not (self.output or self.reference_logps):
            raise ValueError("give --output FILE (or the training command line's "
                             "--reference-logps FILE)")

    @property
    def path(self) -> str:
        return self.output or self.reference_logps


def _check_output(path: str, flag: str) -> None:
    """A file the log-probs can be written to (``flag`` names it), checked before they are
    computed."""
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder: give the file to write")
    layout.check_writable_folder(Path(path).absolute().parent, flag, path)


PROG = "compute_reference_logps"
_OPTIONS = Section("reference log-probs", ReferenceLogpsOptions, key="reference",
                   fields=("output", "reference_logps"))


def main(argv: Sequence[str] | None = None) -> None:
    """``megatron-simpo-reference-logps [--output FILE] <training flags>``."""
    own = Parser(prog=PROG, description=__doc__, add_help=False,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _OPTIONS.add_to(own)
    known, rest = own.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(own.format_help() + "\n" + build_parser(PROG).format_help())
        return
    options = run_command(PROG, lambda: _OPTIONS.build(known))
    config = parse_args(rest, prog=PROG)
    flag = "--output" if options.output else "--reference-logps"
    # the checks before any process group, as training's (a missing Transformer Engine, FP8 on
    # a GPU without it: RuntimeError, the machine's answer to a flag); then the computation
    source = run_command(PROG, lambda: (_check_output(options.path, flag), prepare(config))[1],
                         errors={(ValueError, FileNotFoundError, RuntimeError, DataError,
                                  checkpointing.CheckpointError): 2})
    run_command(PROG, lambda: compute(config, options.path, source), distributed=True, errors={
        (ValueError, FileNotFoundError, DataError, checkpointing.CheckpointError): 2})


if __name__ == "__main__":  # the guard matters: dist checkpointing spawns helper processes
    main()
