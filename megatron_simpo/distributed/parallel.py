"""Parallel layout of a run: tensor-, pipeline- and context-parallel sizes, validated before
anything is built; and where a context-parallel rank's tokens lie in a row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # an annotation only: distributed/ does not depend on model/
    from megatron_simpo.model.architecture import ModelConfig


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the world is split. The data-parallel size is what remains: world / (TP * PP * CP).

    Mixture-of-experts layers are split their own way (Megatron's "MoE parallel folding"): the
    experts over EP ranks, each expert's weights over ETP ranks, so a stage's ranks form
    (expert data-parallel) x EP x ETP groups besides the dense DP x TP ones."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every layer's weights (TP)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the layers into consecutive stages (PP)."""
    sequence_parallel: bool = False
    """Split norm/residual activations along the sequence over the TP ranks: all-reduces
    become reduce-scatter + all-gather pairs and those activations take 1/TP of the memory."""
    context_parallel_size: int = 1
    """Ranks that split every row along the sequence (CP): each holds 2 of 2*CP equal chunks
    (chunks r and 2*CP-1-r, balancing causal attention's work) and attends its queries to the
    keys and values gathered from the whole row; rows are padded to a multiple of 2*CP."""
    expert_model_parallel_size: int = 1
    """Ranks that split each mixture-of-experts layer's experts (EP): each holds
    num_experts / EP of them and tokens travel to their experts by all-to-all."""
    expert_tensor_parallel_size: int | None = None
    """Ranks that split each expert's weights (ETP); default: the TP size (Megatron-LM's
    rule)."""

    def __post_init__(self) -> None:
        if self.expert_tensor_parallel_size is None:
            object.__setattr__(self, "expert_tensor_parallel_size",
                               self.tensor_model_parallel_size)
        for flag, value in (
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
            ("--context-parallel-size", self.context_parallel_size),
            ("--expert-model-parallel-size", self.expert_model_parallel_size),
            ("--expert-tensor-parallel-size", self.expert_tensor_parallel_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel splits activations over tensor-parallel ranks: "
                             "it needs --tensor-model-parallel-size > 1")

    @property
    def sequence_multiple(self) -> int:
        """Model input lengths must be a multiple of this: 2*CP chunks (context parallelism),
        each rank's share split over the TP ranks (sequence parallelism)."""
        cp_chunks = 2 * self.context_parallel_size if self.context_parallel_size > 1 else 1
        return cp_chunks * (self.tensor_model_parallel_size if self.sequence_parallel else 1)

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold different parts of one copy of the model or of its rows (TP*PP*CP)."""
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def data_parallel_size(self, world_size: int) -> int:
        self.check_world_size(world_size)
        return world_size // self.model_parallel_size

    @property
    def expert_parallel_size(self) -> int:
        """Ranks of a stage that split one MoE layer: EP x ETP."""
        return self.expert_model_parallel_size * self.expert_tensor_parallel_size

    def check_world_size(self, world_size: int) -> None:
        if world_size % self.model_parallel_size != 0:
            cp = (f" x --context-parallel-size ({self.context_parallel_size})"
                  if self.context_parallel_size > 1 else "")
            raise ValueError(
                f"--tensor-model-parallel-size ({self.tensor_model_parallel_size}) x "
                f"--pipeline-model-parallel-size ({self.pipeline_model_parallel_size}){cp} = "
                f"{self.model_parallel_size} does not divide the world size ({world_size})"
            )
        expert = self.expert_parallel_size * self.pipeline_model_parallel_size
        if world_size % expert != 0:
            raise ValueError(
                f"--expert-model-parallel-size ({self.expert_model_parallel_size}) x "
                f"--expert-tensor-parallel-size ({self.expert_tensor_parallel_size}) x "
                f"--pipeline-model-parallel-size ({self.pipeline_model_parallel_size}) = "
                f"{expert} does not divide the world size ({world_size})")

    def check_model(self, model: ModelConfig) -> None:
        """Refuse sizes the model cannot be split by, naming the flag (before the model is built)."""
        tp = ("--tensor-model-parallel-size", self.tensor_model_parallel_size)
        pp = ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size)
        for (flag, size), count, what in (
                (tp, model.num_attention_heads,
                 f"the number of attention heads ({model.num_attention_heads})"),
                (tp, model.num_query_groups, "the number of query groups (key/value heads: "
                                             f"{model.num_query_groups}); TP splits whole groups"),
                (tp, model.ffn_hidden_size, f"the MLP hidden size ({model.ffn_hidden_size})"),
                (pp, model.num_layers, f"the number of layers ({model.num_layers})")):
            if count % size != 0:
                raise ValueError(f"{flag} ({size}) must divide {what}")
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size
        if not model.is_moe:
            if ep > 1:
                raise ValueError(f"--expert-model-parallel-size ({ep}) needs a mixture-of-"
                                 f"experts model; {model.architecture} has no experts")
            if etp != self.tensor_model_parallel_size:
                raise ValueError(f"--expert-tensor-parallel-size ({etp}) needs a mixture-of-"
                                 f"experts model; {model.architecture} has no experts")
            return
        if model.num_experts % ep != 0:
            raise ValueError(f"--expert-model-parallel-size ({ep}) must divide the number of "
                             f"experts ({model.num_experts})")
        if model.moe_ffn_hidden_size % etp != 0:
            raise ValueError(f"--expert-tensor-parallel-size ({etp}) must divide the expert "
                             f"hidden size ({model.moe_ffn_hidden_size})")
        if not self.sequence_parallel and self.tensor_model_parallel_size > 1 and ep > 1:
            raise ValueError(f"--expert-model-parallel-size ({ep}) with "
                             f"--tensor-model-parallel-size ({self.tensor_model_parallel_size}) "
                             "needs --sequence-parallel (Megatron-Core's rule)")

    def validate(self, world_size: int, model: ModelConfig | None = None) -> None:
        self.check_world_size(world_size)
        if model is not None:
            self.check_model(model)


def context_parallel_positions(length: int, rank: int, size: int,
                               device: torch.device | str | None = None) -> torch.Tensor:
    """[length / size] the row positions CP rank ``rank`` of ``size`` holds, in its order.

    The row is cut into 2*size equal chunks; rank r holds chunks r and 2*size-1-r, one early
    and one late, so every rank's causal-attention work is the same (Megatron-Core's split:
    ``get_pos_emb_on_this_cp_rank`` takes RoPE angles at the same positions). ``length`` must
    be a multiple of 2*size; with size 1 this is 0..length-1.
    """
    if size == 1:
        return torch.arange(length, device=device)
    if length % (2 * size):
        raise ValueError(f"a row of {length} positions does not split into 2 x "
                         f"--context-parallel-size ({size}) equal chunks")
    chunk = length // (2 * size)
    starts = (rank * chunk, (2 * size - 1 - rank) * chunk)
    return torch.cat([torch.arange(start, start + chunk, device=device) for start in starts])
