"""Command lines of the two converters: console scripts ``megatron-simpo-convert-hf-to-megatron``
and ``megatron-simpo-convert-megatron-to-hf`` (and the thin callers in tools/)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_DTYPE_FLAGS = {name: flag for flag, name in DTYPES.items()}


def _refuse_non_empty(path: Path, force: bool, flag: str = "--save") -> None:
    if path.exists() and any(path.iterdir()) and not force:
        raise SystemExit(f"error: {flag} {path} exists and is not empty (use --force to replace)")


def _rank_message(error: RuntimeError) -> str:
    """The failing rank's own message (a missing tensor, a bad shape, a damaged shard): the
    last line of its traceback, without the exception's class name."""
    last = str(error).strip().splitlines()[-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


def _cpu_only() -> None:
    # Conversion is pure data movement: keep it on the CPU even on a GPU machine.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _import_worker(rank, hf_path, save, config_dict, tp, pp, dtype_name):
    import torch

    from megatron_simpo import runtime
    from megatron_simpo.convert.hf_to_megatron import convert_rank
    from megatron_simpo.architecture import ModelConfig
    from megatron_simpo.parallel import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    config = ModelConfig.from_dict(config_dict)
    runtime.initialize(parallel, seed=0, model_config=config)
    return str(convert_rank(hf_path, save, config, parallel, getattr(torch, dtype_name),
                            progress=rank == 0))


def hf_to_megatron_main(argv=None, *, run_on_ranks=None) -> None:
    """``run_on_ranks(world_size, fn, *args)`` starts the ranks: fresh processes
    (:func:`megatron_simpo.launch.run_on_ranks`) unless a caller that keeps ranks passes its own."""
    parser = argparse.ArgumentParser(
        prog="convert_hf_to_megatron",
        description="Hugging Face checkpoint -> Megatron distributed checkpoint for training")
    parser.add_argument("--hf-path", required=True, help="HF folder (config.json, safetensors)")
    parser.add_argument("--save", required=True, help="output folder (Megatron-LM layout)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default: the checkpoint's own (config.json's dtype/torch_dtype; "
                             "fp32 when it names none)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --save folder")
    args = parser.parse_args(argv)
    _cpu_only()
    from megatron_simpo.architecture import ModelConfig, hf_config_dtype
    from megatron_simpo import launch
    from megatron_simpo.convert.hf_to_megatron import check_hf_checkpoint
    from megatron_simpo.parallel import ParallelConfig

    hf_path, save = Path(args.hf_path), Path(args.save)
    try:
        config = ModelConfig.from_hf_config(hf_path)
        if args.dtype:
            dtype, why = args.dtype, "--dtype"
        else:
            config_file = hf_path / "config.json"
            saved = hf_config_dtype(json.loads(config_file.read_text()), str(config_file))
            dtype = _DTYPE_FLAGS[str(saved or "torch.float32").removeprefix("torch.")]
            why = f"as saved, from {config_file}" if saved else f"{config_file} names no dtype"
        parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_parallel_size,
                                  pipeline_model_parallel_size=args.pipeline_parallel_size)
        parallel.check_model(config)
        check_hf_checkpoint(hf_path, config)
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) else error
        raise SystemExit(f"error: {message}".replace("--tensor-model-parallel-size",
                                                   "--tensor-parallel-size")
                         .replace("--pipeline-model-parallel-size", "--pipeline-parallel-size"))
    _refuse_non_empty(save, args.force)
    world = parallel.model_parallel_size
    run_on_ranks = run_on_ranks or launch.run_on_ranks
    try:
        [path, *_] = run_on_ranks(world, _import_worker, str(hf_path), str(save), config.to_dict(),
                                  parallel.tensor_model_parallel_size,
                                  parallel.pipeline_model_parallel_size, DTYPES[dtype])
    except RuntimeError as error:
        last = _rank_message(error)
        raise SystemExit(f"error: conversion failed, nothing was published: {last}")
    print(f"saved {path} (TP={parallel.tensor_model_parallel_size}, "
          f"PP={parallel.pipeline_model_parallel_size}, {dtype}: {why})")


def _export_worker(rank, load, save, iteration, dtype_name, max_shard_size, allow_non_finite):
    import torch

    from megatron_simpo import runtime
    from megatron_simpo.convert.megatron_to_hf import export_rank0
    from megatron_simpo.parallel import ParallelConfig

    runtime.initialize(ParallelConfig(), seed=0)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    path = export_rank0(load, save, iteration=iteration, dtype=dtype, max_shard_size=max_shard_size,
                        allow_non_finite=allow_non_finite)
    from megatron_simpo.architecture import hf_config_dtype

    written = hf_config_dtype(json.loads((path / "config.json").read_text()))
    return str(path), str(written).removeprefix("torch.")


def megatron_to_hf_main(argv=None, *, run_on_ranks=None) -> None:
    """``run_on_ranks`` as for :func:`hf_to_megatron_main`."""
    parser = argparse.ArgumentParser(
        prog="convert_megatron_to_hf",
        description="Megatron checkpoint (any TP/PP) -> Hugging Face folder")
    parser.add_argument("--load", required=True, help="save folder or iter_NNNNNNN folder")
    parser.add_argument("--save", required=True, help="output HF folder")
    parser.add_argument("--iteration", type=int, help="a named iteration instead of the latest")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default: the checkpoint's own (as saved)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --save folder")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="export even tensors that hold NaN/inf (refused by default)")
    args = parser.parse_args(argv)
    _cpu_only()
    from megatron_simpo import checkpointing, launch

    try:
        if args.iteration is None:
            checkpointing.find_checkpoint(args.load, "--load")
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    _refuse_non_empty(Path(args.save), args.force)
    run_on_ranks = run_on_ranks or launch.run_on_ranks
    try:
        [(path, saved_dtype)] = run_on_ranks(1, _export_worker, args.load, args.save,
                                             args.iteration, DTYPES.get(args.dtype),
                                             args.max_shard_size, args.allow_non_finite)
    except RuntimeError as error:
        raise SystemExit(f"error: export failed: {_rank_message(error)}")
    dtype = _DTYPE_FLAGS[saved_dtype]
    print(f"saved {path} ({dtype}: {'--dtype' if args.dtype else 'as saved in the checkpoint'})")


if __name__ == "__main__":  # python -m megatron_simpo.convert.cli hf-to-megatron|megatron-to-hf ...
    commands = {"hf-to-megatron": hf_to_megatron_main, "megatron-to-hf": megatron_to_hf_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m megatron_simpo.convert.cli {{{','.join(commands)}}} ...")
    commands[sys.argv[1]](sys.argv[2:])
