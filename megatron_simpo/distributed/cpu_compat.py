"""Let Megatron-Core's real code paths run on a CPU-only machine (gloo backend).

Megatron-Core hard-codes CUDA in a handful of places that are not about compute: it creates
small bookkeeping tensors with ``device="cuda"``, asks ``torch.cuda.current_device()``, checks
``param.type() == "torch.cuda.FloatTensor"``, saves and restores the CUDA RNG state and calls
``torch.cuda.synchronize()``. None of that matters on CPU, so this module redirects exactly
those calls (see docs/megatron-on-cpu.md for the list and where each one lives):

* a ``TorchFunctionMode`` that rewrites ``device="cuda"`` in factory calls to the CPU, makes
  ``Tensor.cuda()`` a no-op and answers ``Tensor.type()`` with the CUDA spelling;
* ``torch.cuda.current_device`` returns the CPU device, ``torch.cuda.synchronize`` does nothing;
* the tensor-parallel RNG tracker saves and restores the CPU generator instead of the CUDA one;
* the MoE all-to-all token dispatcher's device-to-host side stream (``torch.cuda.Stream``,
  ``current_stream``, ``stream(...)``, its event) becomes a stream that does nothing: on the
  CPU the split sizes are already host tensors and every call is synchronous; its host copy
  of the split sizes (``maybe_move_tensor_to_cpu``, which converts only CUDA tensors) gives
  the numpy arrays ``all_to_all_single`` takes;
* Megatron's all-gather with uneven split sizes (the expert-tensor-parallel token gather of the
  MoE dispatcher) goes through ``all_to_all_single``: gloo's all-gather needs equal sizes, its
  all-to-all takes uneven splits (each rank sends its whole input to every rank);
* the default causal mask is built on the CPU. Torch function modes are thread-local, and the
  autograd engine re-runs forward code on its own thread for activation recomputation, where the
  mode does not reach; the mask builder is the one CUDA literal on that path.

It is installed once per process by :func:`megatron_simpo.runtime.initialize` when no GPU is
present and never on a GPU. Nothing else in the package knows about it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_installed_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts on 'torch.cuda.FloatTensor' etc.; report the same dtype, CUDA-spelled.
            spelled = func(*args)
            return spelled if ".cuda." in spelled else spelled.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        elif func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


class _CpuStream:
    """What the MoE dispatcher asks of a CUDA stream, for CPU work (already synchronous)."""

    def wait_stream(self, _other) -> None:
        pass

    def record_event(self, *_args) -> "_CpuStream":
        return self  # an "event" that is always complete

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _splits_on_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` for tensors already on the CPU: numpy when asked."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


@functools.lru_cache
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """Megatron's ``get_default_causal_mask`` (True above the diagonal = masked), on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _gather_along_first_dim_on_gloo(original):
    """Megatron's ``_gather_along_first_dim``, with uneven ``output_split_sizes`` gathered by an
    all-to-all; every other call goes to ``original`` unchanged."""

    @functools.wraps(original)
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) <= 1 or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        size = group.size()
        # [n, ...] sent whole to each of the `size` ranks -> [sum(splits), ...] in rank order
        output = input_.new_empty((sum(output_split_sizes), *input_.shape[1:]))
        torch.distributed.all_to_all_single(
            output, input_.contiguous().repeat((size,) + (1,) * (input_.dim() - 1)),
            output_split_sizes=list(output_split_sizes),
            input_split_sizes=[input_.shape[0]] * size, group=group)
        return output

    return gather


def install() -> None:
    """Install the CPU redirections for this process (idempotent). Refused on a GPU machine."""
    global _installed_mode
    if _installed_mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_simpo.distributed.cpu_compat is for CPU-only processes; a GPU is visible.")

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    tp_random._get_cuda_rng_state = _cpu_rng_state
    tp_random._set_cuda_rng_state = _set_cpu_rng_state
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask  # imported there by name
    mappings._gather_along_first_dim = _gather_along_first_dim_on_gloo(
        mappings._gather_along_first_dim)  # called there by its module-level name
    torch.cuda.current_stream = lambda *args, **kwargs: _CPU_STREAM
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    # (names of Megatron-Core 0.16; a version without them has nothing to redirect there)
    if hasattr(token_dispatcher.MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream"):
        token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _CPU_STREAM
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):  # imported there by name
        token_dispatcher.maybe_move_tensor_to_cpu = _splits_on_host

    _installed_mode = _CudaToCpuMode()
    _installed_mode.__enter__()
