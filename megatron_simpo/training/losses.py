"""Preference losses on sequence log-probs: SimPO, and the SimPO paper's baselines.

For a pair (x, y_w, y_l) let s(y) = sum_t log pi(y_t | x, y_<t) be the summed response log-prob,
|y| the response length and a(y) = s(y) / |y| its length average. The sequence score of a
response is a(y) with length normalisation (SimPO's default) and s(y) without; the algorithms
with a reference model (dpo, ipo, rdpo) score the log-ratio s(y) - s_ref(y) (averaged the same
way). With rewards r = beta * score and h = r_w - r_l - gamma:

    simpo  -log sigmoid(h)                            (Meng, Xia, Chen 2024; a(y), gamma > 0)
    dpo    -log sigmoid(h)                            (Rafailov et al. 2023; log-ratios of s(y))
    cpo    -log sigmoid(h) + lambda * NLL(y_w)        (Xu et al. 2024; s(y), no reference)
    rdpo   -log sigmoid(h + alpha * (|y_w| - |y_l|))  (Park et al. 2024; DPO + length term)
    ipo    (score_w - score_l - 1 / (2 beta))^2       (Azar et al. 2023; beta is the paper's tau)
    orpo   NLL(y_w) - lambda_or * log sigmoid(log odds(y_w) - log odds(y_l)),
           log odds(y) = a(y) - log(1 - exp(a(y)))    (Hong et al. 2024; reference-free)
    rrhf   max(0, a(y_l) - a(y_w)) + lambda * NLL(y_w)        (Yuan et al. 2023)
    slic   max(0, delta - s(y_w) + s(y_l)) + lambda * NLL(y_w) (Zhao et al. 2023)

NLL(y_w) = -a(y_w), the length-averaged NLL of the chosen response, weighted by ``sft_weight``
(lambda; 1 for cpo, orpo, rrhf and slic, whose objectives include it; 0 otherwise, where it adds
CPO's term, e.g. CPO-SimPO). For the sigmoid family (simpo, dpo, cpo, rdpo) ``loss_type="hinge"``
uses max(0, 1 - h) and label smoothing eps gives -(1 - eps) log sigmoid(h) - eps log sigmoid(-h).
Options an algorithm does not define are refused, not ignored. Metrics keep TRL's names and
conventions: rewards are beta * score (the score itself for orpo, rrhf and slic, which have no
beta) and logps the score (CPOTrainer's, the score averaged as the loss averages it), except
that dpo, ipo and rdpo log beta * (s(y) - s_ref(y)) and s(y), summed even where the loss
averages (DPOTrainer's, whose loss types ipo and sigmoid_norm average in the loss only). KTO needs
unpaired examples (another data shape) and is not here. Everything is per pair: the caller sums
and divides by the global count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

Algorithm = Literal["simpo", "dpo", "ipo", "cpo", "orpo", "rdpo", "rrhf", "slic"]
LossType = Literal["sigmoid", "hinge"]
ALGORITHMS = get_args(Algorithm)
LOSS_TYPES = get_args(LossType)

WITH_REFERENCE = ("dpo", "ipo", "rdpo")
"""Algorithms that score log-ratios against a frozen reference model."""
SIGMOID_FAMILY = ("simpo", "dpo", "cpo", "rdpo")
"""Algorithms of the form loss(beta * score difference - gamma): loss type, label smoothing and
a target margin apply to these."""
WITH_NLL = ("cpo", "orpo", "rrhf", "slic")
"""Algorithms whose objective includes the chosen response's NLL (sft_weight defaults to 1)."""
WITHOUT_BETA = ("orpo", "rrhf", "slic")
AVERAGED_BY_DEFINITION = ("orpo", "rrhf")
"""Defined on length-averaged log-probs: length normalisation is not an option for these."""

# SimPO's target margin when none is given: gamma = 0.55 * beta, the authors' value for
# Llama-3-8B-Instruct (beta 2.5, gamma 1.375). ``--simpo-gamma 0`` turns the margin off.
SIMPO_GAMMA_BETA_RATIO = 0.55
# beta when none is given: SimPO's Llama-3-8B-Instruct recipe; TRL's default for the others.
DEFAULT_BETA = {"simpo": 2.5, "dpo": 0.1, "ipo": 0.1, "cpo": 0.1, "rdpo": 0.1}
DEFAULT_ORPO_LAMBDA = 0.1  # TRL's ORPOConfig.beta
DEFAULT_RDPO_ALPHA = 0.05  # the smallest of the SimPO paper's R-DPO grid
DEFAULT_SLIC_DELTA = 1.0   # SLiC-HF's calibration margin

# Metric names follow TRL. Each is returned as a per-pair value, summed by the caller.
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss", "loss")
ORPO_METRIC_NAMES = ("log_odds_ratio", "log_odds_chosen")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which preference objective to optimise, with the papers' (and TRL's) option names.

    Options left at None take the algorithm's default on construction; an option the
    algorithm does not define is refused.
    """

    algorithm: Algorithm = "simpo"
    """simpo (reference-free, the default) or a baseline of the SimPO paper: dpo, ipo, rdpo
    (with a frozen reference model), cpo, orpo, rrhf, slic (reference-free)."""
    loss_type: LossType = "sigmoid"
    """sigmoid (the papers') or hinge; simpo, dpo, cpo and rdpo only."""
    beta: float | None = None
    """Reward scale (IPO's tau): 2.5 for simpo (the authors' Llama-3-8B-Instruct recipe), 0.1
    for dpo, ipo, cpo and rdpo (TRL's); orpo, rrhf and slic have none."""
    gamma: float | None = None
    """Target reward margin, absolute. Give this or the ratio; with neither, SimPO uses
    0.55 x beta (the authors' Llama-3-8B-Instruct value) and the others none."""
    gamma_beta_ratio: float | None = None
    """Target reward margin as a fraction of beta: gamma = beta x ratio."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (sigmoid loss only), in [0, 0.5)."""
    sft_weight: float | None = None
    """Weight lambda of the chosen response's length-averaged NLL: 1 for cpo, orpo, rrhf and
    slic (part of their objectives; TRL's cpo_alpha), 0 for the others (> 0 adds CPO's term,
    e.g. CPO-SimPO)."""
    length_normalization: bool | None = None
    """Average log-probs over response tokens: yes for simpo, no for dpo, ipo, cpo, rdpo and
    slic (the papers'; IPO averaged is TRL's convention); orpo and rrhf always average."""
    orpo_lambda: float | None = None
    """ORPO's weight of the odds-ratio term (TRL's ORPO beta); default 0.1."""
    rdpo_alpha: float | None = None
    """R-DPO's length regulariser alpha on |y_w| - |y_l| inside the sigmoid; default 0.05."""
    slic_delta: float | None = None
    """SLiC-HF's calibration margin delta on summed log-probs; default 1.0."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        for flag, value in (("--beta", self.beta), ("--simpo-gamma", self.gamma),
                            ("--simpo-gamma-beta-ratio", self.gamma_beta_ratio),
                            ("--label-smoothing", self.label_smoothing),
                            ("--sft-weight", self.sft_weight), ("--orpo-lambda", self.orpo_lambda),
                            ("--rdpo-alpha", self.rdpo_alpha), ("--slic-delta", self.slic_delta)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
        name = self.algorithm
        own = {"orpo_lambda": ("orpo", "--orpo-lambda", DEFAULT_ORPO_LAMBDA),
               "rdpo_alpha": ("rdpo", "--rdpo-alpha", DEFAULT_RDPO_ALPHA),
               "slic_delta": ("slic", "--slic-delta", DEFAULT_SLIC_DELTA)}
        for field, (owner, flag, default) in own.items():
            if name != owner and getattr(self, field) is not None:
                raise ValueError(f"{flag} applies to --algorithm {owner} only, not {name}")
            if name == owner and getattr(self, field) is None:
                object.__setattr__(self, field, default)
        if name in WITHOUT_BETA:
            if self.beta is not None:
                raise ValueError(f"--beta does not apply to --algorithm {name}"
                                 + (" (its weight is --orpo-lambda)" if name == "orpo" else ""))
        else:
            if self.beta is None:
                object.__setattr__(self, "beta", DEFAULT_BETA[name])
            if not self.beta > 0:
                raise ValueError(f"--simpo-beta must be > 0, got {self.beta}")
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            raise ValueError("give the margin once: --simpo-gamma or --simpo-gamma-beta-ratio, not both")
        if name not in SIGMOID_FAMILY:
            for flag, given in (("--loss-type hinge", self.loss_type == "hinge"),
                                ("--label-smoothing", self.label_smoothing != 0.0),
                                ("--simpo-gamma", self.gamma is not None),
                                ("--simpo-gamma-beta-ratio", self.gamma_beta_ratio is not None)):
                if given:
                    raise ValueError(f"{flag} applies to --algorithm "
                                     f"{', '.join(SIGMOID_FAMILY)}, not {name}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type == "hinge":
            raise ValueError("--label-smoothing applies to the sigmoid loss only, not --loss-type hinge")
        if self.sft_weight is None:
            object.__setattr__(self, "sft_weight", 1.0 if name in WITH_NLL else 0.0)
        if self.sft_weight < 0:
            raise ValueError(f"--sft-weight must be >= 0, got {self.sft_weight}")
        if name in AVERAGED_BY_DEFINITION and self.length_normalization is not None:
            raise ValueError(f"--algorithm {name} is defined on length-averaged log-probs: "
                             "drop --length-normalization / --no-length-normalization")
        for flag, value in (("--orpo-lambda", self.orpo_lambda), ("--slic-delta", self.slic_delta)):
            if value is not None and value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")

    @property
    def margin(self) -> float:
        """gamma, from either spelling; SimPO's 0.55 x beta (others' 0) when neither is given."""
        if self.gamma is not None:
            return float(self.gamma)
        if self.gamma_beta_ratio is not None:
            return float(self.beta * self.gamma_beta_ratio)
        return float(self.beta * SIMPO_GAMMA_BETA_RATIO) if self.algorithm == "simpo" else 0.0

    @property
    def normalize_length(self) -> bool:
        if self.algorithm in AVERAGED_BY_DEFINITION:
            return True
        if self.length_normalization is None:
            return self.algorithm == "simpo"
        return self.length_normalization

    @property
    def needs_reference(self) -> bool:
        return self.algorithm in WITH_REFERENCE

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The per-pair metrics :func:`preference_loss` returns, in a fixed order."""
        return METRIC_NAMES + (ORPO_METRIC_NAMES if self.algorithm == "orpo" else ())


def sequence_scores(logp_sum: torch.Tensor, token_count: torch.Tensor, config: LossConfig
                    ) -> torch.Tensor:
    """[n] scores from summed log-probs and response lengths (averaged if length-normalised)."""
    if config.normalize_length:
        return logp_sum / token_count.clamp(min=1)
    return logp_sum


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def preference_loss(chosen_logp_sum: torch.Tensor, chosen_count: torch.Tensor,
                    rejected_logp_sum: torch.Tensor, rejected_count: torch.Tensor,
                    config: LossConfig,
                    reference_chosen_logp_sum: torch.Tensor | None = None,
                    reference_rejected_logp_sum: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss and metrics.

    Args:
        chosen_logp_sum, rejected_logp_sum: [n_pairs] summed response log-probs of the policy.
        chosen_count, rejected_count: [n_pairs] response token counts.
        reference_*_logp_sum: [n_pairs] the frozen reference model's sums (dpo, ipo, rdpo only).

    Returns:
        (loss [n_pairs], metrics: name -> [n_pairs]) with ``config.metric_names``.
    """
    if config.needs_reference != (reference_chosen_logp_sum is not None):
        raise ValueError("reference log-probs must be given for "
                         f"{', '.join(WITH_REFERENCE)} and only for those")
    chosen_score = sequence_scores(chosen_logp_sum, chosen_count, config)
    rejected_score = sequence_scores(rejected_logp_sum, rejected_count, config)
    chosen_reward_score, rejected_reward_score = chosen_score, rejected_score
    if config.needs_reference:
        chosen_reward_score = chosen_score - sequence_scores(
            reference_chosen_logp_sum, chosen_count, config)
        rejected_reward_score = rejected_score - sequence_scores(
            reference_rejected_logp_sum, rejected_count, config)
    scale = 1.0 if config.algorithm in WITHOUT_BETA else config.beta
    chosen_rewards = scale * chosen_reward_score
    rejected_rewards = scale * rejected_reward_score
    logged = chosen_rewards, rejected_rewards, chosen_score, rejected_score
    if config.needs_reference:  # TRL's DPOTrainer: from the sums, even where the loss averages
        logged = (scale * (chosen_logp_sum - reference_chosen_logp_sum),
                  scale * (rejected_logp_sum - reference_rejected_logp_sum),
                  chosen_logp_sum, rejected_logp_sum)
    extra = {}
    if config.algorithm in SIGMOID_FAMILY:
        h = chosen_rewards - rejected_rewards - config.margin
        if config.algorithm == "rdpo":
            h = h + config.rdpo_alpha * (chosen_count - rejected_count).to(h.dtype)
        if config.loss_type == "sigmoid":
            eps = config.label_smoothing
            loss = (-(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h) if eps
                    else -F.logsigmoid(h))
        else:
            loss = torch.relu(1 - h)
    elif config.algorithm == "ipo":
        loss = (chosen_reward_score - rejected_reward_score - 1 / (2 * config.beta)) ** 2
    elif config.algorithm == "orpo":
        log_odds = (chosen_score - rejected_score) - (_log1mexp(chosen_score)
                                                      - _log1mexp(rejected_score))
        log_odds_ratio = F.logsigmoid(log_odds)
        loss = -config.orpo_lambda * log_odds_ratio
        extra = {"log_odds_ratio": log_odds_ratio.detach(), "log_odds_chosen": log_odds.detach()}
    elif config.algorithm == "rrhf":
        loss = torch.relu(rejected_score - chosen_score)
    else:  # slic
        loss = torch.relu(config.slic_delta - chosen_score + rejected_score)
    nll = -chosen_logp_sum / chosen_count.clamp(min=1)
    if config.sft_weight > 0:
        loss = loss + config.sft_weight * nll
    chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = (x.detach() for x in logged)
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(loss.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
        "nll_loss": nll.detach(),
        "loss": loss.detach(),
        **extra,
    }
    return loss, metrics
