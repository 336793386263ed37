"""The SimPO authors' recipes as named presets: ``--recipe NAME`` on any training command line.

A recipe is the authors' published training configuration for one model (princeton-nlp/SimPO,
``training_configs/*.yaml``; the gemma-2-9b-it DPO run from its model card), written as this
project's flags. ``--recipe NAME`` stands for those flags, placed before the user's own, so::

    megatron-simpo-train --recipe gemma2-9b-it-simpo --pretrained-checkpoint CKPT --lr 5e-7

trains with the recipe except the learning rate. A flag the user gives replaces the recipe's
flags of the same meaning, not only the same spelling (``REPLACES``): ``--simpo-gamma`` replaces
the recipe's ``--simpo-gamma-beta-ratio``, ``--train-iters`` its ``--train-epochs``,
``--max-tokens-per-microbatch`` its ``--micro-batch-size``, and any data-source flag all of its
data flags (the recipe's Hub dataset and splits). The loss is the recipe's: ``--algorithm`` other
than the recipe's is refused (a DPO run needs DPO's beta and learning rate, not SimPO's).

Shared by every recipe (the authors' configs): global batch 128, one epoch, cosine decay to 0
after a 10% linear warm-up, AdamW (0.9, 0.999, 1e-8) without weight decay, gradient clipping at
1.0, bf16, seed 42, 2 pairs per micro-batch; max length 2048 / prompt 1800 unless stated.
Unlike the authors' Trainer, the epoch's last, incomplete global batch is not trained (as in
Megatron-LM: a step fewer unless 128 divides the pairs, the schedule over those steps); the
warm-up is rounded up as the Trainer rounds ``warmup_ratio`` (``optimizer.warmup_iters``).
The model and the parallel layout are the user's (``--pretrained-checkpoint``, ``--tensor-model-
parallel-size``...): a recipe says which Hugging Face model it was tuned for (``hf_model``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

from megatron_simpo.training.losses import ALGORITHMS

_CONFIGS = "https://github.com/princeton-nlp/SimPO/blob/main/training_configs/"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One published configuration (see the module doc for what all recipes share)."""

    name: str
    hf_model: str
    """The Hugging Face model the authors started from (convert it, then --pretrained-checkpoint)."""
    algorithm: str = "simpo"
    beta: float
    gamma_beta_ratio: float | None = None
    gamma: float | None = None
    """The absolute margin, where the authors' config gives it so (Mistral); else the ratio."""
    lr: float
    dataset: str
    train_split: str = "train"
    valid_split: str = "test"
    seq_length: int = 2048
    max_prompt_length: int = 1800
    source: str
    """Where the numbers come from."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"recipe {self.name}: unknown algorithm {self.algorithm}")
        if self.algorithm == "simpo" and (self.gamma is None) == (self.gamma_beta_ratio is None):
            raise ValueError(f"recipe {self.name}: give gamma or gamma_beta_ratio")

    def flags(self) -> list[str]:
        """The recipe as training flags."""
        flags = ["--algorithm", self.algorithm, "--beta", f"{self.beta:g}"]
        if self.gamma is not None:
            flags += ["--simpo-gamma", f"{self.gamma:g}"]
        if self.gamma_beta_ratio is not None:
            flags += ["--simpo-gamma-beta-ratio", f"{self.gamma_beta_ratio:g}"]
        return flags + [
            "--lr", f"{self.lr:g}", "--min-lr", "0", "--lr-decay-style", "cosine",
            "--lr-warmup-fraction", "0.1", "--weight-decay", "0", "--adam-beta1", "0.9",
            "--adam-beta2", "0.999", "--adam-eps", "1e-8", "--clip-grad", "1.0",
            "--global-batch-size", "128", "--micro-batch-size", "2", "--train-epochs", "1",
            "--seq-length", str(self.seq_length), "--max-prompt-length", str(self.max_prompt_length),
            "--bf16", "--seed", "42",
            "--train-data-path", self.dataset, "--train-split", self.train_split,
            "--valid-data-path", self.dataset, "--valid-split", self.valid_split,
        ]


RECIPES = {recipe.name: recipe for recipe in (
    Recipe(name="gemma2-9b-it-simpo", hf_model="google/gemma-2-9b-it", beta=10,
           gamma_beta_ratio=0.5, lr=8e-7, dataset="princeton-nlp/gemma2-ultrafeedback-armorm",
           source=_CONFIGS + "gemma-2-9b-it-simpo.yaml"),
    Recipe(name="gemma2-9b-it-dpo", hf_model="google/gemma-2-9b-it", algorithm="dpo", beta=0.01,
           lr=5e-7, dataset="princeton-nlp/gemma2-ultrafeedback-armorm",
           source="https://huggingface.co/princeton-nlp/gemma-2-9b-it-DPO (model card: lr 5e-7, "
                  "beta 0.01, the rest as gemma-2-9b-it-simpo.yaml)"),
    Recipe(name="llama3-8b-instruct-simpo-v0.2", hf_model="meta-llama/Meta-Llama-3-8B-Instruct",
           beta=10, gamma_beta_ratio=0.3, lr=1e-6,
           dataset="princeton-nlp/llama3-ultrafeedback-armorm",
           source=_CONFIGS + "llama-3-8b-instruct-simpo-v2.yaml"),
    Recipe(name="llama3-8b-instruct-simpo", hf_model="meta-llama/Meta-Llama-3-8B-Instruct",
           beta=2.5, gamma_beta_ratio=0.55, lr=1e-6, dataset="princeton-nlp/llama3-ultrafeedback",
           source=_CONFIGS + "llama-3-8b-instruct-simpo.yaml"),
    Recipe(name="llama3-8b-base-simpo", hf_model="princeton-nlp/Llama-3-Base-8B-SFT", beta=2.0,
           gamma_beta_ratio=0.5, lr=6e-7, dataset="HuggingFaceH4/ultrafeedback_binarized",
           train_split="train_prefs", valid_split="test_prefs",
           source=_CONFIGS + "llama-3-8b-base-simpo.yaml"),
    Recipe(name="mistral-7b-instruct-simpo", hf_model="mistralai/Mistral-7B-Instruct-v0.2",
           beta=2.5, gamma=0.3, lr=5e-7, dataset="snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset",
           source=_CONFIGS + "mistral-7b-instruct-simpo.yaml"),
    Recipe(name="mistral-7b-base-simpo", hf_model="alignment-handbook/zephyr-7b-sft-full",
           beta=2.0, gamma=1.6, lr=3e-7, dataset="HuggingFaceH4/ultrafeedback_binarized",
           train_split="train_prefs", valid_split="test_prefs", seq_length=1024,
           max_prompt_length=512, source=_CONFIGS + "mistral-7b-base-simpo.yaml"),
)}

REPLACES = (
    frozenset({"train_iters", "train_epochs"}),
    frozenset({"gamma", "gamma_beta_ratio"}),
    frozenset({"micro_batch_size", "max_tokens_per_microbatch"}),
    frozenset({"train_data_path", "valid_data_path", "train_split", "valid_split",
               "valid_fraction", "dataset_config"}),
)
"""Settings that one flag of the user's replaces together (by the fields they set)."""


def add_recipe_flag(parser: argparse.ArgumentParser) -> None:
    """``--recipe`` in the parser's help (it is expanded before parsing, :func:`expand`)."""
    parser.add_argument("--recipe", choices=sorted(RECIPES), help=(
        "The SimPO authors' configuration for a model (README, 'Recipes'): its loss, learning "
        "rate, schedule, batch, lengths and dataset; flags given as well replace the recipe's "
        "of the same meaning."))


def _field(parser: argparse.ArgumentParser, token: str) -> str | None:
    """The field a command-line token sets (``--simpo-gamma=1`` -> ``gamma``), None if none."""
    action = parser._option_string_actions.get(token.split("=", 1)[0])
    return None if action is None else action.dest.rsplit(".", 1)[-1]


def expand(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with ``--recipe NAME`` replaced by the recipe's flags that the rest of ``argv``
    does not replace (module doc), placed first. Calls ``parser.error`` (exit code 2) for an
    unknown recipe or an ``--algorithm`` that contradicts it."""
    argv = list(argv)
    names = [i for i, token in enumerate(argv) if token == "--recipe" or token.startswith("--recipe=")]
    if not names:
        return argv
    if len(names) > 1:
        parser.error("--recipe: give one recipe")
    at = names[0]
    if argv[at] == "--recipe":
        if at + 1 == len(argv) or argv[at + 1].startswith("--"):
            parser.error(f"--recipe: name one of {', '.join(sorted(RECIPES))}")
        name, rest = argv[at + 1], argv[:at] + argv[at + 2:]
    else:
        name, rest = argv[at].split("=", 1)[1], argv[:at] + argv[at + 1:]
    recipe = RECIPES.get(name)
    if recipe is None:
        parser.error(f"--recipe {name}: no such recipe; the recipes are {', '.join(sorted(RECIPES))}")
    given = {_field(parser, token) for token in rest if token.startswith("--")} - {None}
    for i, token in enumerate(rest):
        if token.split("=", 1)[0] == "--algorithm":
            value = token.split("=", 1)[1] if "=" in token else (rest[i + 1] if i + 1 < len(rest) else "")
            if value != recipe.algorithm:
                parser.error(f"--algorithm {value} contradicts --recipe {name} ({recipe.algorithm}): "
                             f"a recipe's beta and learning rate are for its own loss; leave out "
                             f"--recipe or pick a {value} recipe")
    replaced = set(given)
    for group in REPLACES:
        if group & given:
            replaced |= group
    flags = recipe.flags()
    kept, i = [], 0
    while i < len(flags):
        width = 2 if i + 1 < len(flags) and not flags[i + 1].startswith("--") else 1
        if _field(parser, flags[i]) not in replaced:
            kept += flags[i:i + width]
        i += width
    return kept + rest
