"""Distributed start-up: process group, Megatron ``parallel_state`` and seeds.

Works under ``torchrun`` (reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and as
a single plain process (on a free port unless MASTER_PORT says which). On a GPU machine it uses
NCCL; without a GPU it uses gloo and installs
:mod:`megatron_simpo.distributed.cpu_compat` so that Megatron-Core's own code paths run on the CPU.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_simpo.distributed.parallel import ParallelConfig


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits. ``device`` is where tensors of this rank live."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    data_parallel_size: int


def read_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; a lone process is rank 0 of 1."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world_size, local_rank


def initialize(parallel: ParallelConfig, *, seed: int = 42, model_config=None) -> DistributedEnv:
    """Start the process group and Megatron's parallel state, and seed every generator.

    Parallel sizes are validated against the world size (and the model, when given) first, so
    a bad layout fails before any process group or model exists.
    """
    from megatron.core import parallel_state, tensor_parallel

    rank, world_size, local_rank = read_world()
    parallel.validate(world_size, model_config)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        from megatron_simpo.distributed import cpu_compat

        cpu_compat.install()
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        _init_process_group(backend, rank, world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )
    set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                          data_parallel_size=parallel.data_parallel_size(world_size))


def _init_process_group(backend: str, rank: int, world_size: int) -> None:
    """torchrun's rendezvous (MASTER_ADDR/MASTER_PORT); a lone process without MASTER_PORT
    holds its store on a port the system picks, so that runs side by side never collide (on
    torch's 29500, or on a port picked and freed before use)."""
    if world_size == 1 and not os.environ.get("MASTER_PORT"):
        store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")  # several ranks need a port they agree on
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    except dist.DistNetworkError as error:
        if "EADDRINUSE" not in str(error):
            raise
        raise PortInUse(port_in_use_message(int(os.environ["MASTER_PORT"]))) from None


class PortInUse(RuntimeError):
    """The rendezvous port the user gave (MASTER_PORT, --master-port) is taken on this machine."""


def port_in_use_message(port: int) -> str:
    return (f"MASTER_PORT {port} is in use on this machine (another job?): leave MASTER_PORT "
            "unset on a single node (a free port is then used), or choose another")


def max_over_world(value: int) -> int:
    """The largest ``value`` any rank holds: one all-reduce of a scalar over the whole world
    (``value`` itself without a process group). Every rank must call it at the same point;
    it is how the ranks agree on a verdict (skip a step, stop, a failed save)."""
    if not dist.is_initialized():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def first_over_world(reason: str | None) -> str | None:
    """The first rank's ``reason`` (by rank) among those that have one, the same on every rank,
    or None if no rank has: one all-reduce, and a gather of the reasons only when some rank
    has one. Every rank must call it at the same point."""
    if not max_over_world(int(reason is not None)) or not dist.is_initialized():
        return reason
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, reason)
    return next(found for found in every if found is not None)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and, where present, CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice).

    Megatron-Core's rotary embeddings cache their forward (``functools.lru_cache`` on the
    method, keyed on the module, which holds its context-parallel group); the cache is emptied
    here, or a process that goes on (a sweep, a notebook, the tests' reused ranks) would keep a
    finished run's rotary modules and process groups, with their gloo threads, alive.
    """
    from megatron.core import parallel_state

    _clear_rotary_caches()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _clear_rotary_caches() -> None:
    """Empty the forward caches of Megatron-Core's rotary embedding classes."""
    from megatron.core.models.common.embeddings import (rotary_pos_embedding,
                                                        yarn_rotary_pos_embedding)

    for cls in (rotary_pos_embedding.RotaryEmbedding,
                getattr(yarn_rotary_pos_embedding, "YarnRotaryEmbedding", None)):
        cache_clear = getattr(getattr(cls, "forward", None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
