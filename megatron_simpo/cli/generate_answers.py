"""``megatron-simpo-generate-answers``: answer files for AlpacaEval 2, Arena-Hard and
MT-Bench (``evaluation.generation.generate_answers``)."""

from __future__ import annotations

import dataclasses
import sys

from megatron_simpo.cli.flags import USER_ERRORS, Command, Section, run_command
from megatron_simpo.evaluation.answers import SAMPLING
from megatron_simpo.evaluation.generation import AnswersConfig, generate_answers


def _sampling_defaults(what: str) -> str:
    return ", ".join(f"{b} {getattr(s, what)}" for b, s in SAMPLING.items())


COMMAND = Command(
    "generate_answers",
    "Answer files for AlpacaEval 2, Arena-Hard and MT-Bench from a trained model",
    (Section("answers", AnswersConfig, key="config",
             fields=tuple(f.name for f in dataclasses.fields(AnswersConfig)),
             names={"apply_chat_template": ("--no-apply-chat-template",)},
             notes={"temperature": f"(defaults: {_sampling_defaults('temperature')} with "
                                   "FastChat's per-category values)",
                    "top_p": f"(defaults: {_sampling_defaults('top_p')})",
                    "max_new_tokens": f"(defaults: {_sampling_defaults('max_new_tokens')})"}),))


def main(argv=None) -> None:
    config = COMMAND.parse(argv)["config"]
    # Data errors (a question or answer file, a folder that cannot be written): one line, no
    # usage, exit code 2.
    run_command(COMMAND.prog, lambda: generate_answers(config), errors={(*USER_ERRORS, OSError): 2})


if __name__ == "__main__":
    sys.exit(main())
