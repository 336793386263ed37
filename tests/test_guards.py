"""Skipped steps and the run's verdict on them; strict JSON for non-finite metrics."""

import json
import math

import torch

from megatron_simpo.training.guards import StepHealth, finite_everywhere, json_number


def test_non_finite_steps_in_a_row_stop_the_run():
    health = StepHealth(max_skipped_steps=3)
    assert health.record(1, True, None)[0] is None
    assert health.record(2, False, 1.5) == (None, None)  # a good step resets the streak
    assert health.record(3, True, None)[0] is None
    assert "iteration 4 skipped" in health.record(4, True, None)[1]
    stop, _ = health.record(5, True, None)
    assert stop.startswith("3 steps in a row (up to iteration 5) had a non-finite loss")
    assert health.skipped_total == 4


def test_a_zero_gradient_streak_is_warned_about_once():
    health = StepHealth(max_skipped_steps=3)
    warnings = [health.record(i, False, 0.0)[1] for i in range(1, 7)]
    assert [w is not None for w in warnings] == [False, False, True, False, False, False]
    assert "exactly 0 for 3 steps (iteration 3)" in warnings[2]
    assert health.record(7, False, 0.1) == (None, None)
    assert [health.record(i, False, 0.0)[1] is not None for i in range(8, 11)] == [False, False, True]


def test_finiteness_and_strict_json():
    assert finite_everywhere([torch.ones(3), torch.zeros(0)])
    assert not finite_everywhere([torch.ones(3), torch.tensor([1.0, math.nan])])
    row = {k: json_number(v) for k, v in {"loss": math.nan, "grad_norm": math.inf, "lr": 1e-3,
                                          "skipped": 1}.items()}
    assert json.dumps(row, allow_nan=False) == \
        '{"loss": null, "grad_norm": null, "lr": 0.001, "skipped": 1}'
