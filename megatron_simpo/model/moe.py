"""Router settings of a mixture-of-experts run (Mixtral, Qwen3-MoE): what a preference-tuning
run sets beyond the architecture (docs/moe.md).

Defaults follow the peers' preference-tuning recipes: no load-balancing loss (NeMo-RL's
Qwen3-30B-A3B recipe sets its coefficient to 0), a trainable router computed in fp32, and no
expert capacity, so every token reaches its top-k experts as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from megatron_simpo.model.architecture import ModelConfig

RouterDtype = Literal["fp32", "fp64"]


@dataclass(frozen=True, kw_only=True)
class MoESettings:
    """Load-balancing loss, router precision and freezing, expert capacity."""

    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss E * sum_i f_i P_i per MoE layer (Switch Transformer;
    f_i: share of the top-k choices that go to expert i, P_i: mean router probability of i),
    added to the preference loss; its value is logged as aux_loss. 0: off."""
    moe_router_dtype: RouterDtype = "fp32"
    """Precision of the router's logits and softmax (fp64: NeMo-RL's choice for RL)."""
    freeze_moe_router: bool = False
    """Keep the routers' weights fixed: no gradient, no update (NeMo-RL freeze_moe_router)."""
    moe_expert_capacity_factor: float | None = None
    """Each expert takes at most this times its even share of the tokens' top-k choices, the
    rest are dropped (by lowest probability); None: no limit, no token dropped."""

    def __post_init__(self) -> None:
        if not 0 <= self.moe_aux_loss_coeff < float("inf"):
            raise ValueError(f"--moe-aux-loss-coeff must be a finite number >= 0, got {self.moe_aux_loss_coeff}")
        if self.moe_expert_capacity_factor is not None and \
                not 0 < self.moe_expert_capacity_factor < float("inf"):
            raise ValueError(f"--moe-expert-capacity-factor must be a finite number > 0, got "
                             f"{self.moe_expert_capacity_factor}")
        if self.freeze_moe_router and self.moe_aux_loss_coeff > 0:
            raise ValueError("--moe-aux-loss-coeff trains the router; it cannot be frozen "
                             "(--freeze-moe-router)")

    def _given(self) -> list[str]:
        """The router flags set away from their defaults, in flag order."""
        return [flag for flag, value in (
            ("--moe-aux-loss-coeff", self.moe_aux_loss_coeff > 0),
            ("--moe-router-dtype", self.moe_router_dtype != "fp32"),
            ("--freeze-moe-router", self.freeze_moe_router),
            ("--moe-expert-capacity-factor", self.moe_expert_capacity_factor is not None))
            if value]

    def check_model(self, model: ModelConfig) -> None:
        """Refuse router settings for a model without experts, naming the flag."""
        if model.is_moe:
            return
        given = self._given()
        if given:
            raise ValueError(f"{', '.join(given)}: {model.architecture} has no experts")

    def check_shared_prompt(self, model: ModelConfig) -> None:
        """--share-prompt on a mixture-of-experts model: each prompt token reaches the router
        once instead of twice. The preference loss and its gradients are the unshared layout's;
        what counts tokens is not, so the load-balancing loss and token dropping are refused."""
        if not model.is_moe:
            return
        given = [flag for flag in self._given()
                 if flag in ("--moe-aux-loss-coeff", "--moe-expert-capacity-factor")]
        if given:
            raise ValueError(f"--share-prompt with {' and '.join(given)}: shared rows route each "
                             "prompt token once instead of twice, which changes what the "
                             "load-balancing loss and the expert capacity count; leave one off")

    def transformer_overrides(self) -> dict[str, Any]:
        """``TransformerConfig`` fields (Megatron-LM's names)."""
        values: dict[str, Any] = dict(moe_aux_loss_coeff=self.moe_aux_loss_coeff,
                                      moe_router_dtype=self.moe_router_dtype)
        if self.moe_expert_capacity_factor is not None:
            values.update(moe_expert_capacity_factor=self.moe_expert_capacity_factor,
                          moe_token_drop_policy="probs")
        return values


def freeze_routers(model) -> int:
    """Turn off the gradient of every router weight of ``model`` (before the DDP wrapper and
    the optimizer see it: neither then holds it); returns how many were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if name.endswith("mlp.router.weight") or name.endswith("mlp.router.bias"):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def moe_transformer_fields(config: ModelConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields of a mixture-of-experts architecture.

    Routing as transformers routes: softmax over all experts, the top k kept; renormalised
    (Mixtral, Qwen3-MoE ``norm_topk_prob``) = Megatron's top-k of the logits then softmax over
    those k; not renormalised = Megatron's ``moe_router_pre_softmax`` (softmax, then top-k).
    No capacity limit (every token reaches its experts) and no auxiliary loss unless the run
    asks for them (``megatron_simpo.model.moe.MoESettings``).
    """
    return dict(num_moe_experts=config.num_experts,
                moe_ffn_hidden_size=config.moe_ffn_hidden_size,
                moe_router_topk=config.moe_router_topk,
                moe_router_pre_softmax=not config.moe_norm_topk_prob,
                moe_router_score_function="softmax",
                moe_layer_freq=[int(x) for x in config.moe_layer_pattern],
                moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0,
                moe_router_dtype="fp32", moe_grouped_gemm=False)


def router_gemm_without_te() -> None:
    """Megatron-Core 0.16's router GEMM tests ``te_general_gemm is not None``, a name its module
    defines only when Transformer Engine imports; without TE it is None here, so the router
    takes its plain ``torch.mm`` path (as it does for fp64)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def experts_apart(model) -> None:
    """Mark every expert weight as Megatron-Core marks them at EP > 1 (``allreduce=False``):
    Megatron's DDP then reduces their gradients over the expert data-parallel group (at EP 1
    the same ranks as the dense one) and its optimizer keeps them in a second, chained
    optimizer at every EP, so a checkpoint saved at one EP resumes at another (the
    optimizer's structure would otherwise differ between EP 1 and EP > 1)."""
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
