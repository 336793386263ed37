"""Command lines of the two converters (thin wrappers live in tools/)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _refuse_non_empty(path: Path, force: bool, flag: str = "--save") -> None:
    if path.exists() and any(path.iterdir()) and not force:
        raise SystemExit(f"error: {flag} {path} exists and is not empty (use --force to replace)")


def _cpu_only() -> None:
    # Conversion is pure data movement: keep it on the CPU even on a GPU machine.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _import_worker(rank, hf_path, save, config_dict, tp, pp, dtype_name):
    import torch

    from megatron_simpo import runtime
    from megatron_simpo.convert.hf_to_megatron import convert_rank
    from megatron_simpo.model import ModelConfig
    from megatron_simpo.parallel import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    config = ModelConfig.from_dict(config_dict)
    runtime.initialize(parallel, seed=0, model_config=config)
    return str(convert_rank(hf_path, save, config, parallel, getattr(torch, dtype_name),
                            progress=rank == 0))


def hf_to_megatron_main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="convert_hf_to_megatron",
        description="Hugging Face checkpoint -> Megatron distributed checkpoint for training")
    parser.add_argument("--hf-path", required=True, help="HF folder (config.json, safetensors)")
    parser.add_argument("--save", required=True, help="output folder (Megatron-LM layout)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --save folder")
    args = parser.parse_args(argv)
    _cpu_only()
    from megatron_simpo.launch import run_on_ranks
    from megatron_simpo.model import ModelConfig
    from megatron_simpo.parallel import ParallelConfig

    hf_path, save = Path(args.hf_path), Path(args.save)
    try:
        config = ModelConfig.from_hf_config(hf_path)
        parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_parallel_size,
                                  pipeline_model_parallel_size=args.pipeline_parallel_size)
        parallel.check_model(config)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}".replace("--tensor-model-parallel-size",
                                                   "--tensor-parallel-size")
                         .replace("--pipeline-model-parallel-size", "--pipeline-parallel-size"))
    _refuse_non_empty(save, args.force)
    world = parallel.model_parallel_size
    try:
        [path, *_] = run_on_ranks(world, _import_worker, str(hf_path), str(save), config.to_dict(),
                                  parallel.tensor_model_parallel_size,
                                  parallel.pipeline_model_parallel_size, DTYPES[args.dtype])
    except RuntimeError as error:
        # Show the failing rank's own message (a missing tensor, a bad shape) last.
        last = str(error).strip().splitlines()[-1]
        raise SystemExit(f"error: conversion failed, nothing was published: {last}")
    print(f"saved {path} (TP={parallel.tensor_model_parallel_size}, "
          f"PP={parallel.pipeline_model_parallel_size}, {args.dtype})")


def _export_worker(rank, load, save, iteration, dtype_name, max_shard_size):
    import torch

    from megatron_simpo import runtime
    from megatron_simpo.convert.megatron_to_hf import export_rank0
    from megatron_simpo.parallel import ParallelConfig

    runtime.initialize(ParallelConfig(), seed=0)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    return str(export_rank0(load, save, iteration=iteration, dtype=dtype,
                            max_shard_size=max_shard_size))


def megatron_to_hf_main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="convert_megatron_to_hf",
        description="Megatron checkpoint (any TP/PP) -> Hugging Face folder")
    parser.add_argument("--load", required=True, help="save folder or iter_NNNNNNN folder")
    parser.add_argument("--save", required=True, help="output HF folder")
    parser.add_argument("--iteration", type=int, help="a named iteration instead of the latest")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: as saved")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --save folder")
    args = parser.parse_args(argv)
    _cpu_only()
    from megatron_simpo import checkpointing
    from megatron_simpo.launch import run_on_ranks

    try:
        if args.iteration is None:
            checkpointing.find_checkpoint(args.load, "--load")
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    _refuse_non_empty(Path(args.save), args.force)
    try:
        [path] = run_on_ranks(1, _export_worker, args.load, args.save, args.iteration,
                              DTYPES.get(args.dtype), args.max_shard_size)
    except RuntimeError as error:
        last = str(error).strip().splitlines()[-1]
        raise SystemExit(f"error: export failed: {last}")
    print(f"saved {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use tools/convert_hf_to_megatron.py or tools/convert_megatron_to_hf.py")
