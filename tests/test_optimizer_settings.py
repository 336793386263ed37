"""Optimizer settings are validated up front: one line naming the flag, never a traceback
from inside an optimizer step."""

import math

import pytest
import torch

from megatron_simpo.training.optimizer import OptimizerSettings


@pytest.mark.parametrize("settings, message", [
    (dict(lr=1e39), r"--lr 1e\+39 is out of range: Adam's first step lr / \(1 - adam_beta1\) = "
                    r"1e\+40 overflows fp32"),
    (dict(lr=float("inf")), r"--lr must be a finite number, got inf"),
    (dict(lr=float("nan")), r"--lr must be a finite number, got nan"),
    (dict(adam_eps=float("nan")), r"--adam-eps must be a finite number"),
    (dict(adam_beta1=1.0), r"--adam-beta1 must be in \[0, 1\), got 1.0"),
    (dict(adam_beta2=-0.1), r"--adam-beta2 must be in \[0, 1\)"),
    (dict(adam_eps=0.0), r"--adam-eps must be > 0"),
    (dict(clip_grad=float("inf")), r"--clip-grad must be a finite number"),
])
def test_out_of_range_settings_are_refused_naming_the_flag(settings, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSettings(**settings)


def test_the_largest_accepted_lr_takes_a_finite_adam_step():
    """The bound is the overflow itself: just inside it torch's Adam steps, just outside it fails."""
    limit = torch.finfo(torch.float32).max * (1 - 0.9)
    inside = OptimizerSettings(lr=limit * 0.99)
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    torch.optim.Adam([param], lr=inside.lr, betas=(0.9, 0.999)).step()
    assert math.isfinite(float(param[0]))
    with pytest.raises(RuntimeError, match="overflow"):  # what the check spares the user
        torch.optim.Adam([param], lr=limit * 1.02, betas=(0.9, 0.999)).step()
    with pytest.raises(ValueError, match="--lr .* is out of range"):
        OptimizerSettings(lr=limit * 1.02)
