"""Command line -> ``TrainConfig``: Megatron-LM's flag names plus SimPO's own.

The flags are generated from the config dataclasses (``megatron_simpo.cli.flags``): types, choices,
help and defaults come from the fields, so this module only says which field goes in which help
group and where a flag's name differs from the field's.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron_simpo.data.batching import BatchingConfig
from megatron_simpo.training.config import TrainConfig
from megatron_simpo.data.config import DataConfig
from megatron_simpo.cli.flags import Parser, Section, check_coverage
from megatron_simpo.cli.recipes import add_recipe_flag, expand
from megatron_simpo.training.losses import LossConfig
from megatron_simpo.training.optimizer import OptimizerSettings
from megatron_simpo.distributed.parallel import ParallelConfig
from megatron_simpo.model.hf_config import GEMMA3_MULTIMODAL, SUPPORTED_ARCHITECTURES
from megatron_simpo.model.moe import MoESettings
from megatron_simpo.model.precision import Fp8Config

PROG = "train_simpo"

SECTIONS = (
    Section("model", TrainConfig, key="train", fields=(
        "pretrained_checkpoint", "reference_logps", "model_config_path", "transformer_impl", "recompute_granularity",
        "recompute_method", "recompute_num_layers", "logprob_chunk_size"),
        names={"model_config_path": ("--model-config",)}),
    Section("parallelism", ParallelConfig, key="parallel", fields=(
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
        "sequence_parallel", "expert_model_parallel_size", "expert_tensor_parallel_size")),
    Section("mixture of experts", MoESettings, key="moe", fields=(
        "moe_aux_loss_coeff", "moe_router_dtype", "freeze_moe_router",
        "moe_expert_capacity_factor")),
    Section("data", DataConfig, key="data", fields=(
        "train_data_path", "valid_data_path", "train_split", "valid_split", "dataset_config",
        "prompt_column", "chosen_column", "rejected_column", "valid_fraction", "tokenizer_path",
        "apply_chat_template",
        "seq_length", "max_prompt_length", "identical_pairs", "data_cache_dir",
        "rebuild_data_cache", "dataset_num_proc"),
        names={"tokenizer_path": ("--tokenizer",),
               "apply_chat_template": ("--no-apply-chat-template",),
               "data_cache_dir": ("--data-cache-dir", "--data-cache-path")}),
    Section("batching", BatchingConfig, key="batching", fields=(
        "batch_layout", "max_tokens_per_microbatch", "pack_sequences", "share_prompt")),
    Section("training", TrainConfig, key="train", fields=(
        "micro_batch_size", "global_batch_size", "train_iters", "train_epochs", "bf16", "seed",
        "max_skipped_steps")),
    Section("optimizer", OptimizerSettings, key="optimizer", fields=(
        "lr", "min_lr", "lr_decay_style", "lr_warmup_fraction", "weight_decay", "adam_beta1",
        "adam_beta2", "adam_eps", "clip_grad", "use_distributed_optimizer", "overlap_grad_reduce",
        "overlap_param_gather", "override_opt_param_scheduler",
        "use_checkpoint_opt_param_scheduler"),
        # Megatron-LM's own spellings as aliases.
        names={"override_opt_param_scheduler": ("--override-opt-param-scheduler",
                                                 "--override-opt_param-scheduler"),
               "use_checkpoint_opt_param_scheduler": (
                   "--use-checkpoint-opt-param-scheduler",
                   "--use-checkpoint-opt_param-scheduler")}),
    Section("FP8 (Transformer Engine)", Fp8Config, key="fp8", trigger="format", fields=(
        "format", "recipe", "amax_history_len", "amax_compute_algo", "margin",
        "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"),
        names={name: (f"--fp8-{name.replace('_', '-')}",)
               for name in ("format", "recipe", "amax_history_len", "amax_compute_algo",
                            "margin")}),
    Section("preference loss", LossConfig, key="loss", fields=(
        "algorithm", "loss_type", "beta", "gamma", "gamma_beta_ratio", "label_smoothing",
        "sft_weight", "length_normalization", "orpo_lambda", "rdpo_alpha", "slic_delta"),
        names={"beta": ("--simpo-beta", "--beta"), "gamma": ("--simpo-gamma",),
               "gamma_beta_ratio": ("--simpo-gamma-beta-ratio",)}),
    Section("checkpoints and logging", TrainConfig, key="train", fields=(
        "load", "override_data", "save", "save_interval", "overwrite", "eval_interval",
        "eval_dump", "log_interval",
        "tensorboard_dir", "exit_interval", "exit_duration_in_mins")),
)
_NESTED = ("data", "parallel", "batching", "loss", "optimizer", "fp8", "moe")
check_coverage(SECTIONS, skip={TrainConfig: _NESTED})


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=(
        "SimPO (or a baseline: DPO, IPO, CPO, ORPO, R-DPO, RRHF, SLiC-HF) training on "
        f"Megatron-Core. Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)} (and "
        f"the text model of a {GEMMA3_MULTIMODAL})."))
    add_recipe_flag(parser)
    for section in SECTIONS:
        section.add_to(parser)
    parser.add_argument("--fp16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(  # in Megatron-LM launch scripts; what it asks for is how runs stop here
        "--exit-signal-handler", action="store_true",
        help="Megatron-LM's switch for what every run here does: SIGTERM or SIGINT saves a "
             "checkpoint at the next step boundary and stops (accepted for its scripts)")
    return parser


def _section(key: str) -> Section:
    return next(s for s in SECTIONS if s.key == key)


def config_from_namespace(args: argparse.Namespace) -> TrainConfig:
    """Build the config from parsed flags; raises ValueError/FileNotFoundError naming a flag."""
    if args.fp16:
        raise ValueError("--fp16 is not supported: use --bf16 (SimPO's recipes train in bf16)")
    fp8_given = _section("fp8").given(args)
    if "first_last_layers_bf16" not in fp8_given and (
            "num_layers_at_start_in_bf16" in fp8_given or "num_layers_at_end_in_bf16" in fp8_given):
        raise ValueError("--num-layers-at-start-in-bf16 / --num-layers-at-end-in-bf16 need "
                         "--first-last-layers-bf16")
    top = {}
    for section in SECTIONS:
        if section.key == "train":
            top.update(section.given(args))
    return TrainConfig(**top, **{key: _section(key).build(args) for key in _NESTED})


def parse_args(argv: Sequence[str] | None = None, *, prog: str = PROG) -> TrainConfig:
    """Parse and validate; any bad flag raises SystemExit(2) with a message naming it (after
    ``prog``: the command that takes a training command line)."""
    parser = build_parser(prog)
    args = parser.parse_args(expand(sys.argv[1:] if argv is None else argv, parser))
    try:
        return config_from_namespace(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    # Check a command line's flags without training (``cli.launch`` checks these and more, once,
    # before torchrun starts any rank).
    parse_args()
