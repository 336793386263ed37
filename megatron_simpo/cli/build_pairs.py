"""``megatron-simpo-build-pairs``: on-policy preference pairs (the SimPO v0.2 recipe's data) from a
model, prompts and a reward model or function (``evaluation.pairs_run.build_pairs``)."""

from __future__ import annotations

import dataclasses
import sys

from megatron_simpo.cli.flags import Command, Section, run_command
from megatron_simpo.evaluation.pairs_run import PairsConfig, build_pairs

COMMAND = Command(
    "build_pairs",
    "On-policy preference pairs: samples of a model scored by a reward, best vs worst",
    (Section("pairs", PairsConfig, key="config",
             fields=tuple(f.name for f in dataclasses.fields(PairsConfig)),
             names={"apply_chat_template": ("--no-apply-chat-template",)}),))


def main(argv=None) -> None:
    config = COMMAND.parse(argv)["config"]
    run_command(COMMAND.prog, lambda: build_pairs(config))


if __name__ == "__main__":
    sys.exit(main())
