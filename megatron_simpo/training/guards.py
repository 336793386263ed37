"""Keeping bad numbers out of a run: non-finite steps are skipped, non-finite weights never saved.

Megatron-Core's optimizer skips a step only where a loss scaler finds an overflow (fp16). In
bf16 and fp32 a NaN or inf gradient goes straight into the weights, and everything after it is
NaN. So the training step checks its gradients itself, once they are reduced and before the
optimizer reads them, and every rank reaches the same verdict (one all-reduce of a flag over the
whole world): a non-finite step is skipped on all ranks or on none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from megatron_simpo.distributed.runtime import max_over_world


def finite_everywhere(tensors: Iterable[torch.Tensor]) -> bool:
    """True on every rank iff every given tensor on every rank is finite."""
    bad = 0
    for tensor in tensors:
        # A NaN or inf anywhere makes the fp32 sum non-finite; the sum needs no tensor-sized
        # temporary (a gradient buffer is the size of the model). It could overflow only for
        # gradients summing past 3e38, which are no use either.
        if tensor is not None and tensor.numel() and \
                not bool(torch.isfinite(torch.sum(tensor, dtype=torch.float32))):
            bad = 1
            break
    return max_over_world(bad) == 0


def gradient_buffers(model_chunks: list) -> list[torch.Tensor]:
    """The DDP-wrapped chunks' contiguous gradient buffers (after the step's reduction: every
    rank's own data-parallel shard of the global gradient, plus its local contributions)."""
    return [buffer.grad_data for chunk in model_chunks
            for buffer in chunk.buffers + chunk.expert_parallel_buffers]


def parameters(model_chunks: list) -> list[torch.Tensor]:
    return [param.detach() for chunk in model_chunks for param in chunk.parameters()]


@dataclass
class StepHealth:
    """Counts skipped steps and zero gradients; says when the run must stop or be warned about.

    ``max_skipped_steps`` non-finite steps in a row end the run (the data or the settings are
    broken, not one batch); a gradient norm of exactly 0 for ``zero_grad_warn_after`` steps in
    a row is reported once per streak (a collapsed model, e.g. a far too large learning rate).
    """

    max_skipped_steps: int
    zero_grad_warn_after: int = 3
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    zero_grad_in_a_row: int = 0

    def record(self, iteration: int, skipped: bool, grad_norm: float | None
               ) -> tuple[str | None, str | None]:
        """Book one step: (reason to stop the run, warning to print), each None if none."""
        if skipped:
            self.skipped_total += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.max_skipped_steps:
                return (f"{self.skipped_in_a_row} steps in a row (up to iteration {iteration}) "
                        "had a non-finite loss or gradient and were skipped "
                        f"(--max-skipped-steps {self.max_skipped_steps}); the weights are those "
                        "of the last good step. Check the data and the settings (learning rate, "
                        "--simpo-beta)"), None
            return None, (f"warning: iteration {iteration} skipped: non-finite loss or gradient "
                          f"({self.skipped_in_a_row} in a row, {self.skipped_total} in all)")
        self.skipped_in_a_row = 0
        if grad_norm is not None and grad_norm == 0.0:
            self.zero_grad_in_a_row += 1
            if self.zero_grad_in_a_row == self.zero_grad_warn_after:
                return None, (f"warning: the gradient norm has been exactly 0 for "
                              f"{self.zero_grad_in_a_row} steps (iteration {iteration}): the "
                              "model may have collapsed (learning rate too large?)")
        else:
            self.zero_grad_in_a_row = 0
        return None, None


def json_number(value):
    """A metric value as strict JSON: non-finite floats become null (Python's json writes
    NaN/Infinity, which are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
