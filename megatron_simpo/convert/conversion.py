"""The two conversions as library calls, each on its frozen config: ``import_hf`` (Hugging Face
-> Megatron, at any TP/PP) and ``export_hf`` (Megatron -> Hugging Face). The console scripts
(``convert/cli.py``) generate their flags from these configs; generate-answers exports through
``export_hf`` too.

Conversion is pure data movement: the ranks run on the CPU, in fresh processes, even on a GPU
machine (the GPUs stay visible to the caller). A rank's failure publishes nothing and is raised
as :class:`ConversionError` with that rank's own message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Dtype = Literal["bf16", "fp16", "fp32"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""flag value -> torch dtype name."""
_DTYPE_FLAGS = {name: flag for flag, name in DTYPES.items()}


class ConversionError(Exception):
    """A conversion that failed on a rank (nothing was published); the message is the rank's."""


@dataclass(frozen=True)
class ImportConfig:
    """``megatron-simpo-convert-hf-to-megatron``: a Hugging Face checkpoint -> a Megatron
    distributed checkpoint for training."""

    hf_path: str
    """HF folder (config.json, safetensors)"""
    save: str
    """output folder (Megatron-LM layout)"""
    tensor_parallel_size: int = 1
    """tensor-parallel ranks the checkpoint is split for"""
    pipeline_parallel_size: int = 1
    """pipeline stages the checkpoint is split for"""
    expert_model_parallel_size: int = 1
    """expert-parallel ranks the experts are split over (mixture-of-experts models; any EP
    loads any other: the checkpoint holds each expert once)"""
    expert_tensor_parallel_size: int | None = None
    """ranks each expert's weights are split over (default: --tensor-parallel-size)"""
    dtype: Dtype | None = None
    """default: the checkpoint's own (config.json's dtype/torch_dtype; fp32 when it names none)"""
    force: bool = False
    """replace a non-empty --save folder"""
    allow_non_finite: bool = False
    """convert even tensors that hold NaN/inf (refused by default)"""

    def __post_init__(self) -> None:
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size),
                            ("--pipeline-parallel-size", self.pipeline_parallel_size),
                            ("--expert-model-parallel-size", self.expert_model_parallel_size),
                            ("--expert-tensor-parallel-size", self.expert_tensor_parallel_size)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ExportConfig:
    """``megatron-simpo-convert-megatron-to-hf``: a Megatron checkpoint (any TP/PP) -> a Hugging
    Face folder."""

    load: str
    """save folder or iter_NNNNNNN folder"""
    save: str
    """output HF folder"""
    iteration: int | None = None
    """a named iteration instead of the latest"""
    dtype: Dtype | None = None
    """default: the checkpoint's own (as saved)"""
    max_shard_size: str = "5GB"
    """safetensors files above this size are split, with an index"""
    force: bool = False
    """replace a non-empty --save folder"""
    allow_non_finite: bool = False
    """export even tensors that hold NaN/inf (refused by default)"""

    def __post_init__(self) -> None:
        if self.iteration is not None and self.iteration < 0:
            raise ValueError(f"--iteration must be >= 0, got {self.iteration}")
        from megatron_simpo.convert.hf_io import parse_size

        try:
            size = parse_size(self.max_shard_size)
        except (ValueError, OverflowError):
            size = None
        if size is None or size < 1:
            raise ValueError(f"--max-shard-size must be a positive size such as 5GB, 200MB or "
                             f"a byte count, got {self.max_shard_size!r}")


@dataclass(frozen=True)
class Converted:
    """Where a conversion wrote, in which dtype and why that one."""

    path: Path
    dtype: str
    why: str


def _refuse_non_empty(path: Path, force: bool) -> None:
    """Refuse a --save that holds anything but the unfinished save of an interrupted
    conversion (``iter_0000000.partial``: replaced by this one) unless ``force``."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--save {path} is a file, not a folder")
    if not path.exists() or force:
        return
    held = [entry.name for entry in path.iterdir()
            if not (entry.name == "iter_0000000.partial" and entry.is_dir())]
    if held:
        raise FileExistsError(f"--save {path} exists and is not empty (use --force to replace)")


def _rank_message(error: RuntimeError) -> str:
    """The failing rank's own message (a missing tensor, a bad shape, a damaged shard): the
    last line of its traceback, without the exception's class name."""
    last = str(error).strip().splitlines()[-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


@contextlib.contextmanager
def _gpus_hidden():
    """The ranks started inside see no GPU; the caller's environment is restored after."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _on_ranks(run_on_ranks, world_size: int, worker, *args) -> list:
    """``run_on_ranks(world_size, worker, *args)`` on the CPU: fresh processes
    (:func:`megatron_simpo.launch.run_on_ranks`) unless a caller that keeps ranks passes its own."""
    from megatron_simpo.distributed import launch

    with _gpus_hidden():
        try:
            return (run_on_ranks or launch.run_on_ranks)(world_size, worker, *args)
        except RuntimeError as error:
            raise ConversionError(_rank_message(error)) from None


def _import_worker(rank, config: ImportConfig, model_config: dict, dtype_name: str) -> str:
    import torch

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.convert.hf_to_megatron import convert_rank

    parallel = _parallel(config)
    model = ModelConfig.from_dict(model_config)
    runtime.initialize(parallel, seed=0, model_config=model)
    return str(convert_rank(config.hf_path, config.save, model, parallel,
                            getattr(torch, dtype_name), progress=rank == 0,
                            allow_non_finite=config.allow_non_finite))


def _parallel(config: ImportConfig):
    from megatron_simpo.distributed.parallel import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=config.tensor_parallel_size,
                          pipeline_model_parallel_size=config.pipeline_parallel_size,
                          expert_model_parallel_size=config.expert_model_parallel_size,
                          expert_tensor_parallel_size=config.expert_tensor_parallel_size,
                          sequence_parallel=config.tensor_parallel_size > 1)


def _world_size(parallel) -> int:
    """The fewest ranks that hold every shard once: a stage's dense (TP) and expert (EP x ETP)
    layouts both divide it."""
    import math

    return math.lcm(parallel.tensor_model_parallel_size,
                    parallel.expert_parallel_size) * parallel.pipeline_model_parallel_size


def import_hf(config: ImportConfig, *, run_on_ranks=None) -> Converted:
    """Convert; a bad checkpoint or layout is refused (ValueError, FileNotFoundError, KeyError
    naming the file or flag) before any rank starts."""
    from megatron_simpo.model.architecture import ModelConfig, hf_config_dtype
    from megatron_simpo.convert.hf_to_megatron import check_hf_checkpoint

    hf_path, save = Path(config.hf_path), Path(config.save)
    model = ModelConfig.from_hf_config(hf_path)
    if config.dtype:
        dtype, why = config.dtype, "--dtype"
    else:
        config_file = hf_path / "config.json"
        saved = hf_config_dtype(json.loads(config_file.read_text()), str(config_file))
        dtype = _DTYPE_FLAGS[str(saved or "torch.float32").removeprefix("torch.")]
        why = f"as saved, from {config_file}" if saved else f"{config_file} names no dtype"
    try:  # Megatron's flag names, as this command spells them
        parallel = _parallel(config)
        parallel.check_model(model)
    except ValueError as error:
        raise ValueError(str(error).replace("--tensor-model-parallel-size", "--tensor-parallel-size")
                         .replace("--pipeline-model-parallel-size", "--pipeline-parallel-size"))
    check_hf_checkpoint(hf_path, model)
    _refuse_non_empty(save, config.force)
    try:
        [path, *_] = _on_ranks(run_on_ranks, _world_size(parallel), _import_worker, config,
                               model.to_dict(), DTYPES[dtype])
    except ConversionError as error:
        raise ConversionError(f"conversion failed, nothing was published: {error}") from None
    if config.force:  # replaced: the tracker names this one, then the others go
        from megatron_simpo.checkpoint.layout import remove_iterations_after

        remove_iterations_after(save, 0, track=True)
    return Converted(Path(path), dtype, why)


def _export_worker(rank, config: ExportConfig) -> tuple[str, str]:
    import torch

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import hf_config_dtype
    from megatron_simpo.convert.megatron_to_hf import export_rank0
    from megatron_simpo.distributed.parallel import ParallelConfig

    runtime.initialize(ParallelConfig(), seed=0)
    path = export_rank0(config.load, config.save, iteration=config.iteration,
                        dtype=getattr(torch, DTYPES[config.dtype]) if config.dtype else None,
                        max_shard_size=config.max_shard_size,
                        allow_non_finite=config.allow_non_finite)
    written = hf_config_dtype(json.loads((path / "config.json").read_text()))
    return str(path), str(written).removeprefix("torch.")


def export_hf(config: ExportConfig, *, run_on_ranks=None) -> Converted:
    """Export (one rank, whatever the checkpoint's TP/PP); a missing checkpoint or a non-empty
    --save without --force is refused before it starts."""
    from megatron_simpo.checkpoint import checkpointing

    if config.iteration is None:
        checkpointing.find_checkpoint(config.load, "--load")
    _refuse_non_empty(Path(config.save), config.force)
    try:
        [(path, saved_dtype)] = _on_ranks(run_on_ranks, 1, _export_worker, config)
    except ConversionError as error:
        raise ConversionError(f"export failed: {error}") from None
    return Converted(Path(path), _DTYPE_FLAGS[saved_dtype],
                     "--dtype" if config.dtype else "as saved in the checkpoint")
