"""``megatron-simpo-analyze-run RUN``: plots and a JSON summary of a training run
(``evaluation.analysis.analyze``)."""

from __future__ import annotations

from megatron_simpo.cli.flags import Command, Section, run_command
from megatron_simpo.evaluation.analysis import AnalysisConfig, analyze


COMMAND = Command("analyze_run", "Plots and a JSON summary of a training run (its --save "
                  "folder; held-out analyses need --eval-dump), or the reward per round of "
                  "examples/iterative_simpo.sh (its ROOT)",
                  (Section("analysis", AnalysisConfig, key="config", positional=("run",),
                           fields=("run", "output", "reference")),))


def main(argv=None) -> None:
    config = COMMAND.parse(argv)["config"]
    run_command(COMMAND.prog, lambda: analyze(config))


if __name__ == "__main__":
    main()
