"""SimPO / DPO losses against an independent per-pair recomputation of the papers' formulas."""

import math

import pytest
import torch

from megatron_simpo.training.losses import LossConfig, preference_loss

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


REFERENCE_BASED = {"dpo", "ipo", "rdpo"}
BETA = {"simpo": 2.5, "dpo": 0.1, "ipo": 0.1, "cpo": 0.1, "rdpo": 0.1}


def _expected(config: dict, sum_w, n_w, sum_l, n_l, ref_w=None, ref_l=None):
    """The papers' formulas written out pair by pair in plain Python floats."""
    algorithm = config.get("algorithm", "simpo")
    beta = config.get("beta", BETA.get(algorithm))
    ratio = config.get("gamma_beta_ratio", 0.55 if algorithm == "simpo" else 0.0)
    gamma = config.get("gamma", (beta or 0.0) * ratio)
    eps = config.get("label_smoothing", 0.0)
    lam = config.get("sft_weight", 1.0 if algorithm in ("cpo", "orpo", "rrhf", "slic") else 0.0)
    average = config.get("length_normalization", algorithm in ("simpo", "orpo", "rrhf"))
    losses, accuracies = [], []
    for i in range(N):
        s_w, s_l, len_w, len_l = float(sum_w[i]), float(sum_l[i]), float(n_w[i]), float(n_l[i])
        w, l = s_w, s_l
        if algorithm in REFERENCE_BASED:
            w, l = w - float(ref_w[i]), l - float(ref_l[i])
        summed = w, l  # the reference-based ones' rewards: TRL's DPOTrainer logs the sums
        if average:
            w, l = w / len_w, l / len_l
        nll = -s_w / len_w
        if algorithm in ("simpo", "dpo", "cpo", "rdpo"):
            h = beta * w - beta * l - gamma
            if algorithm == "rdpo":
                h += config.get("rdpo_alpha", 0.05) * (len_w - len_l)
            if config.get("loss_type", "sigmoid") == "hinge":
                loss = max(0.0, 1.0 - h)
            else:
                loss = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
            chosen, rejected = beta * w, beta * l
        elif algorithm == "ipo":
            loss = (w - l - 1.0 / (2.0 * beta)) ** 2
        elif algorithm == "orpo":  # odds(y) = p / (1 - p), p = exp(average log-prob)
            p_w, p_l = math.exp(w), math.exp(l)
            log_odds = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
            loss = -config.get("orpo_lambda", 0.1) * _log_sigmoid(log_odds)
            chosen, rejected = w, l
        elif algorithm == "rrhf":
            loss = max(0.0, l - w)
            chosen, rejected = w, l
        else:  # slic
            loss = max(0.0, config.get("slic_delta", 1.0) - w + l)
            chosen, rejected = w, l
        if algorithm in REFERENCE_BASED:
            chosen, rejected = beta * summed[0], beta * summed[1]
        losses.append(loss + lam * nll)
        accuracies.append(float(chosen > rejected))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accuracies, dtype=torch.float64)


VARIANTS = {
    "simpo": dict(beta=2.5, gamma_beta_ratio=0.55),
    "simpo_default_margin": dict(),
    "simpo_abs_gamma": dict(beta=2.0, gamma=1.6),
    "simpo_gamma0": dict(beta=2.5, gamma=0.0),
    "simpo_hinge": dict(beta=2.5, gamma=1.0, loss_type="hinge"),
    "simpo_label_smoothing": dict(beta=2.5, gamma=1.0, label_smoothing=0.2),
    "cpo_simpo": dict(beta=2.5, gamma=1.0, sft_weight=0.7),
    "simpo_no_length_norm": dict(beta=2.5, gamma=1.0, length_normalization=False),
    "dpo": dict(algorithm="dpo", beta=0.1),
    "dpo_default_beta": dict(algorithm="dpo"),
    "dpo_hinge": dict(algorithm="dpo", beta=0.1, loss_type="hinge"),
    "dpo_label_smoothing": dict(algorithm="dpo", beta=0.1, label_smoothing=0.1),
    "ipo": dict(algorithm="ipo", beta=0.5),
    "ipo_default_tau": dict(algorithm="ipo"),
    "ipo_token_averaged": dict(algorithm="ipo", beta=0.5, length_normalization=True),
    "ipo_sft": dict(algorithm="ipo", beta=0.5, sft_weight=0.3),
    "cpo": dict(algorithm="cpo"),
    "cpo_beta": dict(algorithm="cpo", beta=0.5),
    "cpo_no_nll": dict(algorithm="cpo", sft_weight=0.0),
    "cpo_hinge": dict(algorithm="cpo", loss_type="hinge"),
    "cpo_label_smoothing": dict(algorithm="cpo", label_smoothing=0.1),
    "cpo_length_normalized": dict(algorithm="cpo", length_normalization=True),
    "orpo": dict(algorithm="orpo"),
    "orpo_lambda": dict(algorithm="orpo", orpo_lambda=0.5),
    "orpo_nll_weight": dict(algorithm="orpo", sft_weight=0.5),
    "rdpo": dict(algorithm="rdpo"),
    "rdpo_alpha": dict(algorithm="rdpo", beta=0.2, rdpo_alpha=0.5),
    "rdpo_margin": dict(algorithm="rdpo", gamma=0.3),
    "rrhf": dict(algorithm="rrhf"),
    "rrhf_nll_weight": dict(algorithm="rrhf", sft_weight=0.1),
    "slic": dict(algorithm="slic"),
    "slic_delta": dict(algorithm="slic", slic_delta=10.0),
    "slic_nll_weight": dict(algorithm="slic", sft_weight=2.0),
    "slic_length_normalized": dict(algorithm="slic", slic_delta=0.5, length_normalization=True),
}


def _references(options, ref_w, ref_l):
    return (ref_w, ref_l) if options.get("algorithm") in REFERENCE_BASED else (None, None)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_loss_matches_formula(name):
    options = VARIANTS[name]
    sum_w, n_w, sum_l, n_l, ref_w, ref_l = _inputs()
    refs = _references(options, ref_w, ref_l)
    config = LossConfig(**options)
    loss, metrics = preference_loss(sum_w, n_w, sum_l, n_l, config, *refs)
    expected, accuracies = _expected(options, sum_w, n_w, sum_l, n_l, *refs)
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(metrics["rewards/accuracies"], accuracies)
    assert set(metrics) == set(config.metric_names)


# Variants that spell a default out: equal to the variant named here, so left out of the
# every-option check below.
SAME_AS = {"simpo_default_margin": "simpo", "dpo_default_beta": "dpo"}


def test_every_option_changes_the_result():
    sum_w, n_w, sum_l, n_l, ref_w, ref_l = _inputs()
    results = {}
    for name, options in VARIANTS.items():
        refs = _references(options, ref_w, ref_l)
        results[name] = preference_loss(sum_w, n_w, sum_l, n_l, LossConfig(**options), *refs)[0]
    for name, twin in SAME_AS.items():
        assert torch.equal(results.pop(name), results[twin])
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
    (dict(algorithm="kto"), "--algorithm"),
    (dict(sft_weight=-1.0), "--sft-weight"),
    (dict(algorithm="orpo", beta=0.1), "--beta does not apply to --algorithm orpo .*--orpo-lambda"),
    (dict(algorithm="rrhf", beta=1.0), "--beta does not apply"),
    (dict(algorithm="ipo", loss_type="hinge"), "--loss-type hinge applies to"),
    (dict(algorithm="slic", label_smoothing=0.1), "--label-smoothing applies to"),
    (dict(algorithm="orpo", gamma=1.0), "--simpo-gamma applies to"),
    (dict(algorithm="rrhf", gamma_beta_ratio=0.5), "--simpo-gamma-beta-ratio applies to"),
    (dict(algorithm="orpo", length_normalization=False), "length-averaged"),
    (dict(algorithm="rrhf", length_normalization=True), "length-averaged"),
    (dict(orpo_lambda=0.2), "--orpo-lambda applies to --algorithm orpo only, not simpo"),
    (dict(algorithm="dpo", rdpo_alpha=0.2), "--rdpo-alpha applies to --algorithm rdpo only"),
    (dict(algorithm="rrhf", slic_delta=0.2), "--slic-delta applies to --algorithm slic only"),
    (dict(algorithm="slic", slic_delta=-1.0), "--slic-delta must be >= 0"),
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


# TRL's own loss code on the same log-probs (TRL is a test extra; its trainers' loss methods
# are called with just the attributes they read, not a whole trainer).
def _trl(module: str):
    return pytest.importorskip(module, reason="TRL is not installed (pip install .[test])")


def _namespace(**attributes):
    from types import SimpleNamespace

    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **attributes)


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                        ("hinge", 0.0)])
def test_cpo_equals_trl(loss_type, label_smoothing):
    cpo = _trl("trl.experimental.cpo")
    sum_w, n_w, sum_l, n_l, _, _ = _inputs()
    trainer = _namespace(alpha=0.0, beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing,
                         simpo_gamma=0.0)
    expected, chosen_rewards, _ = cpo.CPOTrainer.cpo_loss(trainer, sum_w, sum_l)
    # TRL adds cpo_alpha x the NLL outside cpo_loss: compare the preference term alone.
    config = LossConfig(algorithm="cpo", beta=0.3, loss_type=loss_type,
                        label_smoothing=label_smoothing, sft_weight=0.0)
    loss, metrics = preference_loss(sum_w, n_w, sum_l, n_l, config)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards, atol=1e-12, rtol=0)


def test_simpo_equals_trl_cpo_trainer_simpo_loss():
    cpo = _trl("trl.experimental.cpo")
    sum_w, n_w, sum_l, n_l, _, _ = _inputs()
    trainer = _namespace(alpha=0.0, beta=2.5, loss_type="simpo", label_smoothing=0.1,
                         simpo_gamma=1.375)
    # TRL's SimPO scores are average log-probs (average_log_prob=True for loss_type simpo).
    expected, _, _ = cpo.CPOTrainer.cpo_loss(trainer, sum_w / n_w, sum_l / n_l)
    loss, _ = preference_loss(sum_w, n_w, sum_l, n_l, LossConfig(label_smoothing=0.1))
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)


def test_orpo_equals_trl():
    orpo = _trl("trl.experimental.orpo")
    sum_w, n_w, sum_l, n_l = (x.float() for x in _inputs()[:4])  # TRL's ORPO runs in fp32
    # TRL's ORPO scores are average log-probs; its loss is NLL - mean(beta x log sigmoid(.)).
    ratio, *_, log_odds_ratio, log_odds_chosen = orpo.ORPOTrainer.odds_ratio_loss(
        _namespace(beta=0.25), sum_w / n_w, sum_l / n_l)
    config = LossConfig(algorithm="orpo", orpo_lambda=0.25, sft_weight=0.0)
    loss, metrics = preference_loss(sum_w, n_w, sum_l, n_l, config)
    torch.testing.assert_close(loss, -ratio, atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["log_odds_ratio"].mean(), log_odds_ratio, atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["log_odds_chosen"].mean(), log_odds_chosen, atol=1e-6,
                               rtol=0)


TRL_DPO_LOSS_TYPES = {  # DPOTrainer's loss type: our algorithm and its length normalisation
    "ipo": ("ipo", True), "sigmoid_norm": ("dpo", True), "sigmoid": ("dpo", False),
    "hinge": ("dpo", False)}
LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("loss_type", sorted(TRL_DPO_LOSS_TYPES))
def test_reference_based_losses_and_metrics_equal_trl_dpo_trainer(loss_type):
    """TRL's DPO losses live inside DPOTrainer._compute_loss: it is fed per-token log-probs
    through a stand-in model output, with precomputed reference sums, for a batch of [chosen;
    rejected]. The loss and the logged rewards and logps equal ours; where the loss averages
    over tokens (ipo, sigmoid_norm), TRL still logs rewards and logps from the sums."""
    trl = _trl("trl")
    from collections import defaultdict

    g = torch.Generator().manual_seed(1)
    length = 12
    completion = torch.zeros(2 * N, length, dtype=torch.long)
    # prompts of 3 tokens; pairs 0 and 1 a short chosen and a long rejected response, whose
    # summed and averaged log-ratios disagree on which is better; the others 2..8 tokens
    lengths = [2, 3] + [int(torch.randint(2, 9, (1,), generator=g)) for _ in range(N - 2)]
    lengths += [8, 8] + [int(torch.randint(2, 9, (1,), generator=g)) for _ in range(N - 2)]
    for row, n in enumerate(lengths):
        completion[row, 3:3 + n] = 1
    token_logps = -torch.rand(2 * N, length - 1, generator=g, dtype=torch.float64) * 4
    token_logps = token_logps * completion[:, 1:]  # TRL's log-probs are zero off the completion
    sums, counts = token_logps.sum(-1), completion.sum(-1).double()
    # reference: log-ratio +1.0 over the short chosen, +2.0 over the long rejected response
    reference = sums - torch.rand(2 * N, generator=g, dtype=torch.float64) * 2
    reference[[0, 1, N, N + 1]] = sums[[0, 1, N, N + 1]] - torch.tensor([1.0, 1.0, 2.0, 2.0],
                                                                         dtype=torch.float64)

    class Output:
        log_probs = token_logps
        entropy = torch.zeros_like(token_logps)
        mean_logits = torch.zeros_like(token_logps)
        is_top1 = torch.zeros_like(token_logps, dtype=torch.bool)

    accelerator = _namespace().accelerator
    accelerator.gather_for_metrics = accelerator.gather = lambda tensor: tensor
    trainer = _namespace(model=torch.nn.Linear(1, 1), aux_loss_enabled=False, ld_alpha=None,
                         precompute_ref_logps=True, f_divergence_type="reverse_kl",
                         loss_types=[loss_type], loss_weights=[1.0], beta=0.4,
                         use_weighting=False, _metrics={"train": defaultdict(list)},
                         _total_train_tokens=0, _tp_size=1)
    trainer.accelerator = accelerator
    inputs = {"input_ids": torch.zeros(2 * N, length, dtype=torch.long),
              "attention_mask": torch.ones(2 * N, length, dtype=torch.long),
              "completion_mask": completion,
              "ref_chosen_logps": reference[:N], "ref_rejected_logps": reference[N:]}
    expected = trl.DPOTrainer._compute_loss(trainer, lambda **kwargs: Output(), inputs,
                                            return_outputs=False)
    algorithm, averaged = TRL_DPO_LOSS_TYPES[loss_type]
    config = LossConfig(algorithm=algorithm, beta=0.4, length_normalization=averaged,
                        loss_type="hinge" if loss_type == "hinge" else "sigmoid")
    loss, metrics = preference_loss(sums[:N], counts[:N], sums[N:], counts[N:], config,
                                    reference[:N], reference[N:])
    torch.testing.assert_close(loss.mean(), expected, atol=1e-12, rtol=0)
    logged = trainer._metrics["train"]
    for name in LOGGED:
        # (TRL averages the accuracies in fp32)
        assert metrics[name].mean().item() == pytest.approx(logged[name][0], abs=1e-7), name
    assert metrics["rewards/accuracies"][:2].tolist() == [0.0, 0.0]  # summed: rejected ahead
