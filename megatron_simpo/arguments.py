"""Command line (Megatron-LM's flag names plus SimPO's own) -> ``TrainConfig``."""

from __future__ import annotations

import argparse
from typing import Sequence

from megatron_simpo.config import TrainConfig
from megatron_simpo.data import DataConfig
from megatron_simpo.losses import LossConfig
from megatron_simpo.optimizer import OptimizerSettings
from megatron_simpo.parallel import ParallelConfig
from megatron_simpo.precision import FP8_FORMATS, FP8_RECIPES, Fp8Config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_simpo", description="SimPO (or DPO) training on Megatron-Core",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained-checkpoint", help="weights to start from (converted or trained)")
    g.add_argument("--model-config", help="HF config.json for a randomly initialised model")
    g.add_argument("--tokenizer", help="HF tokenizer folder (default: the checkpoint's)")
    g.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])
    g.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="activation recomputation: full layers, or only the attention core")
    g.add_argument("--recompute-method", choices=["uniform", "block"],
                   help="full recomputation: checkpoint groups of layers (uniform) or the first "
                        "--recompute-num-layers of each stage (block)")
    g.add_argument("--recompute-num-layers", type=int)
    g.add_argument("--logprob-chunk-size", type=int, default=1024,
                   help="memory-lean log-probs: score response tokens this many at a time from "
                        "the hidden states, never holding the full logits; 0 = full logits")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norm/residual activations along the sequence over TP ranks")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradient buckets over data-parallel ranks during backward")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather the distributed optimizer's updated parameters during the "
                        "next forward (needs --use-distributed-optimizer, --overlap-grad-reduce)")
    g = p.add_argument_group("data")
    g.add_argument("--train-data-path", required=True, help="JSONL: prompt, chosen, rejected")
    g.add_argument("--valid-data-path", help="held-out JSONL")
    g.add_argument("--valid-fraction", type=float, default=0.0,
                   help="hold out this share of the training file when no --valid-data-path")
    g.add_argument("--seq-length", type=int, default=2048, help="max tokens of prompt + response")
    g.add_argument("--max-prompt-length", type=int, default=1800)
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    g.add_argument("--global-batch-size", type=int, default=128, help="pairs per step")
    g.add_argument("--train-iters", type=int)
    g.add_argument("--train-epochs", type=int)
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--lr-warmup-fraction", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 weights and compute, fp32 master weights")
    g.add_argument("--fp16", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("FP8 (Transformer Engine)")
    g.add_argument("--fp8-format", choices=FP8_FORMATS,
                   help="FP8 GEMMs in the decoder layers: e4m3 everywhere, or hybrid (e5m2 "
                        "gradients); needs --transformer-impl transformer_engine and --bf16")
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES,
                   help="scaling recipe (default delayed); blockwise needs Hopper, mxfp8 Blackwell")
    g.add_argument("--fp8-amax-history-len", type=int,
                   help="delayed scaling: amax history window (Megatron default 1)")
    g.add_argument("--fp8-amax-compute-algo", choices=["most_recent", "max"],
                   help="delayed scaling: amax from the history (Megatron default most_recent)")
    g.add_argument("--fp8-margin", type=int, help="delayed scaling: scaling margin (default 0)")
    g.add_argument("--first-last-layers-bf16", action="store_true",
                   help="keep the first and last decoder layers in bf16")
    g.add_argument("--num-layers-at-start-in-bf16", type=int,
                   help="with --first-last-layers-bf16 (default 1)")
    g.add_argument("--num-layers-at-end-in-bf16", type=int,
                   help="with --first-last-layers-bf16 (default 1)")
    g = p.add_argument_group("preference loss")
    g.add_argument("--algorithm", default="simpo", choices=["simpo", "dpo"])
    g.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "hinge"])
    g.add_argument("--simpo-beta", "--beta", dest="beta", type=float, default=2.5)
    g.add_argument("--simpo-gamma", type=float, help="target reward margin (absolute)")
    g.add_argument("--simpo-gamma-beta-ratio", type=float,
                   help="target reward margin as a fraction of beta (SimPO default 0.55 "
                        "when neither margin flag is given)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--sft-weight", type=float, default=0.0,
                   help="weight of the NLL term on the chosen response (CPO-SimPO)")
    g.add_argument("--no-length-normalization", action="store_true",
                   help="sum instead of average the response log-probs (the paper's ablation)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--load", help="resume exactly from this save folder")
    g.add_argument("--save", help="save folder (checkpoints and metrics.jsonl)")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--eval-interval", type=int)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir")
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and validate; any bad flag raises SystemExit with a message naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fp16:
        parser.error("--fp16 is not supported: use --bf16 (SimPO's recipes train in bf16)")
    fp8_flags = {"--fp8-recipe": args.fp8_recipe,
                 "--fp8-amax-history-len": args.fp8_amax_history_len,
                 "--fp8-amax-compute-algo": args.fp8_amax_compute_algo,
                 "--fp8-margin": args.fp8_margin,
                 "--first-last-layers-bf16": args.first_last_layers_bf16 or None,
                 "--num-layers-at-start-in-bf16": args.num_layers_at_start_in_bf16,
                 "--num-layers-at-end-in-bf16": args.num_layers_at_end_in_bf16}
    if args.fp8_format is None and any(v is not None for v in fp8_flags.values()):
        given = [flag for flag, value in fp8_flags.items() if value is not None]
        parser.error(f"{', '.join(given)}: only with --fp8-format")
    if not args.first_last_layers_bf16 and (args.num_layers_at_start_in_bf16 is not None
                                            or args.num_layers_at_end_in_bf16 is not None):
        parser.error("--num-layers-at-start-in-bf16 / --num-layers-at-end-in-bf16 need "
                     "--first-last-layers-bf16")
    gamma, ratio = args.simpo_gamma, args.simpo_gamma_beta_ratio
    if args.algorithm == "simpo" and gamma is None and ratio is None:
        ratio = 0.55  # the authors' Llama-3-8B-Instruct recipe; --simpo-gamma 0 turns it off
    try:
        # Only the FP8 options given: their defaults live in Fp8Config.
        fp8 = None if args.fp8_format is None else Fp8Config(format=args.fp8_format, **{
            name: value for name, value in (
                ("recipe", args.fp8_recipe), ("amax_history_len", args.fp8_amax_history_len),
                ("amax_compute_algo", args.fp8_amax_compute_algo), ("margin", args.fp8_margin),
                ("first_last_layers_bf16", args.first_last_layers_bf16 or None),
                ("num_layers_at_start_in_bf16", args.num_layers_at_start_in_bf16),
                ("num_layers_at_end_in_bf16", args.num_layers_at_end_in_bf16))
            if value is not None})
        return TrainConfig(
            parallel=ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                    pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                    sequence_parallel=args.sequence_parallel),
            data=DataConfig(train_data_path=args.train_data_path,
                            valid_data_path=args.valid_data_path,
                            valid_fraction=args.valid_fraction, tokenizer_path=args.tokenizer,
                            seq_length=args.seq_length, max_prompt_length=args.max_prompt_length),
            loss=LossConfig(algorithm=args.algorithm, loss_type=args.loss_type, beta=args.beta,
                            gamma=gamma, gamma_beta_ratio=ratio,
                            label_smoothing=args.label_smoothing, sft_weight=args.sft_weight,
                            length_normalization=False if args.no_length_normalization else None),
            optimizer=OptimizerSettings(lr=args.lr, min_lr=args.min_lr,
                                        weight_decay=args.weight_decay,
                                        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                                        adam_eps=args.adam_eps, clip_grad=args.clip_grad,
                                        use_distributed_optimizer=args.use_distributed_optimizer,
                                        overlap_grad_reduce=args.overlap_grad_reduce,
                                        overlap_param_gather=args.overlap_param_gather),
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            train_iters=args.train_iters, train_epochs=args.train_epochs,
            lr_warmup_fraction=args.lr_warmup_fraction, lr_decay_style=args.lr_decay_style,
            bf16=args.bf16, transformer_impl=args.transformer_impl, fp8=fp8,
            logprob_chunk_size=args.logprob_chunk_size,
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
            model_config_path=args.model_config, pretrained_checkpoint=args.pretrained_checkpoint,
            load=args.load, save=args.save, save_interval=args.save_interval,
            eval_interval=args.eval_interval, log_interval=args.log_interval, seed=args.seed,
            tensorboard_dir=args.tensorboard_dir,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
