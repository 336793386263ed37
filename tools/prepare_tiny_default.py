#!/usr/bin/env python
"""Write the embedded tiny default (tokenizer, model config, synthetic pairs) to a folder."""

import inspect
from dataclasses import dataclass

from megatron_simpo.cli.flags import Command, Section, run_command
from megatron_simpo.model.tiny import write_default

_DEFAULTS = inspect.signature(write_default).parameters  # the one place they are written


@dataclass(frozen=True)
class TinyDefaultOptions:
    output: str
    """the folder written (tokenizer/, config.json, train.jsonl, valid.jsonl)"""
    train_pairs: int = _DEFAULTS["train_pairs"].default
    """synthetic training pairs"""
    valid_pairs: int = _DEFAULTS["valid_pairs"].default
    """synthetic validation pairs"""
    seed: int = _DEFAULTS["seed"].default
    """the pairs' random seed"""


COMMAND = Command("prepare_tiny_default", __doc__, (
    Section("tiny default", TinyDefaultOptions, key="options",
            fields=("output", "train_pairs", "valid_pairs", "seed")),))

if __name__ == "__main__":
    options = COMMAND.parse()["options"]
    paths = run_command(COMMAND.prog, lambda: write_default(
        options.output, train_pairs=options.train_pairs, valid_pairs=options.valid_pairs,
        seed=options.seed))
    print(" ".join(f"{name}={path}" for name, path in paths.items()))
