"""Preference losses on sequence log-probs: SimPO (and its variants) and DPO.

For a pair (x, y_w, y_l) let the sequence score of a response be

    score(y) = (1/|y|) * sum_t log pi(y_t | x, y_<t)      (length-normalised, SimPO's default)
    score(y) =           sum_t log pi(y_t | x, y_<t)      (length_normalization=False)

and, for DPO, subtract the frozen reference model's score of the same response. With
``h = beta * (score(y_w) - score(y_l)) - gamma``:

    sigmoid:  L = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)     (eps = label smoothing)
    hinge:    L = max(0, 1 - h)
    + sft_weight * NLL(y_w),  NLL(y_w) = -(1/|y_w|) sum_t log pi(y_w,t | ...)   (CPO-SimPO's term)

SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734) is algorithm="simpo" with length normalisation,
gamma > 0 and no reference; DPO (Rafailov et al. 2023) is algorithm="dpo" with summed scores and
gamma = 0. Every option applies to both and changes the result. Rewards, as TRL logs them, are
``beta * score``. Everything here is per pair: the caller sums and divides by the global count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

Algorithm = Literal["simpo", "dpo"]
LossType = Literal["sigmoid", "hinge"]
ALGORITHMS = get_args(Algorithm)
LOSS_TYPES = get_args(LossType)

# SimPO's target margin when none is given: gamma = 0.55 * beta, the authors' value for
# Llama-3-8B-Instruct (beta 2.5, gamma 1.375). ``--simpo-gamma 0`` turns the margin off.
SIMPO_GAMMA_BETA_RATIO = 0.55

# Metric names follow TRL. Each is returned as a per-pair value, summed by the caller.
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss", "loss")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which preference objective to optimise, with the paper's flag names."""

    algorithm: Algorithm = "simpo"
    """simpo (reference-free) or dpo (the baseline; needs a frozen reference model)."""
    loss_type: LossType = "sigmoid"
    """sigmoid (the paper's) or hinge."""
    beta: float = 2.5
    """Reward scale (SimPO's Llama-3-8B-Instruct recipe uses 2.5; DPO commonly 0.1)."""
    gamma: float | None = None
    """Target reward margin, absolute. Give this or the ratio; with neither, SimPO uses
    0.55 x beta (the authors' Llama-3-8B-Instruct value) and DPO none."""
    gamma_beta_ratio: float | None = None
    """Target reward margin as a fraction of beta: gamma = beta x ratio."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (sigmoid loss only), in [0, 0.5)."""
    sft_weight: float = 0.0
    """Weight of the length-averaged NLL term on the chosen response (CPO-SimPO); 0 = pure
    SimPO."""
    length_normalization: bool | None = None
    """Average log-probs over response tokens; None = yes for SimPO, no for DPO."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"--simpo-beta must be > 0, got {self.beta}")
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            raise ValueError("give the margin once: --simpo-gamma or --simpo-gamma-beta-ratio, not both")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type == "hinge":
            raise ValueError("--label-smoothing applies to the sigmoid loss only, not --loss-type hinge")
        if self.sft_weight < 0:
            raise ValueError(f"--sft-weight must be >= 0, got {self.sft_weight}")

    @property
    def margin(self) -> float:
        """gamma, from either spelling; SimPO's 0.55 x beta (DPO's 0) when neither is given."""
        if self.gamma is not None:
            return float(self.gamma)
        if self.gamma_beta_ratio is not None:
            return float(self.beta * self.gamma_beta_ratio)
        return float(self.beta * SIMPO_GAMMA_BETA_RATIO) if self.algorithm == "simpo" else 0.0

    @property
    def normalize_length(self) -> bool:
        if self.length_normalization is None:
            return self.algorithm == "simpo"
        return self.length_normalization

    @property
    def needs_reference(self) -> bool:
        return self.algorithm == "dpo"


def sequence_scores(logp_sum: torch.Tensor, token_count: torch.Tensor, config: LossConfig
                    ) -> torch.Tensor:
    """[n] scores from summed log-probs and response lengths (averaged if length-normalised)."""
    if config.normalize_length:
        return logp_sum / token_count.clamp(min=1)
    return logp_sum


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
        reference_*_logp_sum: [n_pairs] the frozen reference model's sums (DPO only).

    Returns:
        (loss [n_pairs], metrics: name -> [n_pairs]) with TRL's metric names.
    """
    if config.needs_reference != (reference_chosen_logp_sum is not None):
        raise ValueError("reference log-probs must be given for DPO and only for DPO")
    chosen_score = sequence_scores(chosen_logp_sum, chosen_count, config)
    rejected_score = sequence_scores(rejected_logp_sum, rejected_count, config)
    chosen_reward_score, rejected_reward_score = chosen_score, rejected_score
    if config.needs_reference:
        chosen_reward_score = chosen_score - sequence_scores(
            reference_chosen_logp_sum, chosen_count, config)
        rejected_reward_score = rejected_score - sequence_scores(
            reference_rejected_logp_sum, rejected_count, config)
    chosen_rewards = config.beta * chosen_reward_score
    rejected_rewards = config.beta * rejected_reward_score
    h = chosen_rewards - rejected_rewards - config.margin
    if config.loss_type == "sigmoid":
        eps = config.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    else:
        loss = torch.relu(1 - h)
    nll = -chosen_logp_sum / chosen_count.clamp(min=1)
    if config.sft_weight > 0:
        loss = loss + config.sft_weight * nll
    metrics = {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(loss.dtype).detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach(),
        "logps/chosen": chosen_score.detach(),
        "logps/rejected": rejected_score.detach(),
        "nll_loss": nll.detach(),
        "loss": loss.detach(),
    }
    return loss, metrics
