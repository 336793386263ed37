"""``megatron-simpo-build-pairs``: on-policy preference pairs (the SimPO v0.2 recipe's data) from a
model, prompts and a reward model or function (``evaluation.pairs_run.build_pairs``)."""

from __future__ import annotations

import dataclasses
import os
import sys

from megatron_simpo.cli.flags import Command, Section, run_command
from megatron_simpo.evaluation.pairs_run import PairsConfig, build_pairs
from megatron_simpo.evaluation.pairs_world import OwnShareError

COMMAND = Command(
    "build_pairs",
    "On-policy preference pairs: samples of a model scored by a reward, best vs worst",
    (Section("pairs", PairsConfig, key="config",
             fields=tuple(f.name for f in dataclasses.fields(PairsConfig)),
             names={"apply_chat_template": ("--no-apply-chat-template",)}),))


def main(argv=None) -> None:
    config = COMMAND.parse(argv)["config"]
    run_command(COMMAND.prog, lambda: _said_where_found(config))


def _said_where_found(config: PairsConfig):
    """``build_pairs``; a mistake in this process's own share (``pairs_world.OwnShareError``:
    its batches, their rewards, its GPUs), which rank 0 never sees, is said by this process
    whatever its rank (``run_command`` says it from rank 0 only)."""
    try:
        return build_pairs(config)
    except OwnShareError as error:
        if os.environ.get("RANK", "0") != "0":
            print(f"{COMMAND.prog}: error: {error}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
