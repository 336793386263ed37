"""The processes of one build-pairs run under torchrun (``pairs_run``): each one's devices, the
files they wait for, and the mistakes only one of them sees.

No process group is started (vLLM starts its own): the processes meet through the parts folder.
A mistake every process sees (a flag, the prompts, a resumed folder's settings) is said by rank
0 alone (``cli.flags.user_error``); one found in a process's own share (its batches on disk,
their rewards, its GPUs) is an :class:`OwnShareError`, which the command says from whichever
process found it: torchrun ends the others, and rank 0 never sees it.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator


class OwnShareError(ValueError):
    """A mistake found in this process's own share of the run (module docstring)."""


@contextlib.contextmanager
def own_share() -> Iterator[None]:
    """Within it, a ValueError (a user's mistake) is this process's own: an OwnShareError."""
    try:
        yield
    except OwnShareError:
        raise
    except ValueError as error:
        raise OwnShareError(str(error)) from None


def wait_until(done: Callable[[], bool], poll_s: float = 1.0) -> None:
    """Wait for a file another process writes. Only conditions that stay true are waited on
    (the settings exist; every batch is written), so a folder left by an earlier run never
    misleads."""
    while not done():
        time.sleep(poll_s)


def pin_device(backend: str, local_rank: int, tensor_parallel_size: int, world: int) -> None:
    """Under torchrun on GPUs: this process's device(s), the ``local_rank``-th group of
    ``tensor_parallel_size`` (one for transformers). The first is torch's current device here,
    where the reward model and the transformers sampler run; vLLM's engine process sees only
    the group (``CUDA_VISIBLE_DEVICES``, changed after this process's own view is fixed, so
    the index stays this process's). No process group is started (vLLM starts its own)."""
    import torch

    if world == 1 or not torch.cuda.is_available():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    first = local_rank * tensor_parallel_size
    mine = devices[first:first + tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise ValueError(f"{world} processes with --tensor-parallel-size {tensor_parallel_size} "
                         f"need {world * tensor_parallel_size} GPUs; {len(devices)} are visible")
    torch.cuda.set_device(first)  # (initializes CUDA with the devices visible now)
    if backend == "vllm":
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)  # read by vLLM's engine process
