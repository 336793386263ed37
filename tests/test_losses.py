"""SimPO / DPO losses against an independent per-pair recomputation of the papers' formulas."""

import math

import pytest
import torch

from megatron_simpo.losses import METRIC_NAMES, LossConfig, preference_loss

N = 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    counts_w = torch.randint(1, 20, (N,), generator=g).double()
    counts_l = torch.randint(1, 20, (N,), generator=g).double()
    sum_w = -counts_w * torch.rand(N, generator=g, dtype=torch.float64) * 3
    sum_l = -counts_l * torch.rand(N, generator=g, dtype=torch.float64) * 3
    ref_w = sum_w - torch.rand(N, generator=g, dtype=torch.float64)
    ref_l = sum_l + torch.rand(N, generator=g, dtype=torch.float64)
    return sum_w, counts_w, sum_l, counts_l, ref_w, ref_l


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _expected(config: dict, sum_w, n_w, sum_l, n_l, ref_w=None, ref_l=None):
    """The formulas written out pair by pair in plain Python floats."""
    beta = config.get("beta", 2.5)
    gamma = config.get("gamma", beta * config.get("gamma_beta_ratio", 0.0))
    eps = config.get("label_smoothing", 0.0)
    alpha = config.get("sft_weight", 0.0)
    dpo = config.get("algorithm") == "dpo"
    average = config.get("length_normalization", not dpo)
    losses, accuracies = [], []
    for i in range(N):
        w, l = float(sum_w[i]), float(sum_l[i])
        if dpo:
            w, l = w - float(ref_w[i]), l - float(ref_l[i])
        if average:
            w, l = w / float(n_w[i]), l / float(n_l[i])
        h = beta * w - beta * l - gamma
        if config.get("loss_type", "sigmoid") == "hinge":
            loss = max(0.0, 1.0 - h)
        else:
            loss = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
        loss += alpha * (-float(sum_w[i]) / float(n_w[i]))
        losses.append(loss)
        accuracies.append(float(beta * w > beta * l))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accuracies, dtype=torch.float64)


VARIANTS = {
    "simpo": dict(beta=2.5, gamma_beta_ratio=0.55),
    "simpo_abs_gamma": dict(beta=2.0, gamma=1.6),
    "simpo_gamma0": dict(beta=2.5, gamma=0.0),
    "simpo_hinge": dict(beta=2.5, gamma=1.0, loss_type="hinge"),
    "simpo_label_smoothing": dict(beta=2.5, gamma=1.0, label_smoothing=0.2),
    "cpo_simpo": dict(beta=2.5, gamma=1.0, sft_weight=0.7),
    "simpo_no_length_norm": dict(beta=2.5, gamma=1.0, length_normalization=False),
    "dpo": dict(algorithm="dpo", beta=0.1),
    "dpo_hinge": dict(algorithm="dpo", beta=0.1, loss_type="hinge"),
    "dpo_label_smoothing": dict(algorithm="dpo", beta=0.1, label_smoothing=0.1),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_loss_matches_formula(name):
    options = VARIANTS[name]
    sum_w, n_w, sum_l, n_l, ref_w, ref_l = _inputs()
    refs = (ref_w, ref_l) if options.get("algorithm") == "dpo" else (None, None)
    loss, metrics = preference_loss(sum_w, n_w, sum_l, n_l, LossConfig(**options), *refs)
    expected, accuracies = _expected(options, sum_w, n_w, sum_l, n_l, *refs)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(metrics["rewards/accuracies"], accuracies)
    assert set(metrics) == set(METRIC_NAMES)


def test_every_option_changes_the_result():
    sum_w, n_w, sum_l, n_l, ref_w, ref_l = _inputs()
    results = {}
    for name, options in VARIANTS.items():
        refs = (ref_w, ref_l) if options.get("algorithm") == "dpo" else (None, None)
        results[name] = preference_loss(sum_w, n_w, sum_l, n_l, LossConfig(**options), *refs)[0]
    names = sorted(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(results[a], results[b]), f"{a} and {b} give the same loss"


def test_closed_forms():
    # Equal chosen and rejected: SimPO's loss is -log sigmoid(-gamma), DPO's is log 2.
    x = torch.tensor([-3.0, -1.5]).double()
    n = torch.tensor([3.0, 5.0]).double()
    loss, metrics = preference_loss(x, n, x, n, LossConfig(beta=2.5, gamma=1.375))
    torch.testing.assert_close(loss, torch.full((2,), math.log1p(math.exp(1.375))).double())
    assert metrics["rewards/margins"].abs().max() == 0
    loss, _ = preference_loss(x, n, x, n, LossConfig(algorithm="dpo", beta=0.1), x, x)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2.0)).double())


def test_metrics_are_trl_rewards_of_length_normalised_logps():
    sum_w, n_w, sum_l, n_l, _, _ = _inputs()
    _, m = preference_loss(sum_w, n_w, sum_l, n_l, LossConfig(beta=2.5, gamma=1.0))
    torch.testing.assert_close(m["logps/chosen"], sum_w / n_w)
    torch.testing.assert_close(m["rewards/chosen"], 2.5 * sum_w / n_w)
    torch.testing.assert_close(m["rewards/margins"], m["rewards/chosen"] - m["rewards/rejected"])
    torch.testing.assert_close(m["nll_loss"], -sum_w / n_w)


def test_gradient_flows_to_both_responses():
    sum_w, n_w, sum_l, n_l, _, _ = _inputs()
    sum_w.requires_grad_(True)
    sum_l.requires_grad_(True)
    loss, _ = preference_loss(sum_w, n_w, sum_l, n_l, LossConfig(beta=2.5, gamma=1.0))
    loss.sum().backward()
    assert (sum_w.grad < 0).all() and (sum_l.grad > 0).all()


@pytest.mark.parametrize("options, message", [
    (dict(beta=0.0), "--simpo-beta"),
    (dict(gamma=1.0, gamma_beta_ratio=0.5), "not both"),
    (dict(label_smoothing=0.5), "--label-smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "sigmoid loss only"),
    (dict(loss_type="ipo"), "--loss-type"),
    (dict(algorithm="orpo"), "--algorithm"),
    (dict(sft_weight=-1.0), "--sft-weight"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**options)


def test_reference_must_match_algorithm():
    x, n = torch.zeros(2), torch.ones(2)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(x, n, x, n, LossConfig(algorithm="dpo"))
    with pytest.raises(ValueError, match="reference"):
        preference_loss(x, n, x, n, LossConfig(), x, x)
