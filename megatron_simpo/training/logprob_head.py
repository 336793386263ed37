"""The log-prob head: log p(label) of each scored token from what the last stage returns.

Decided once, when the models are built (``components.build_components`` builds the head and
the models to match it) and handed to the step:

- ``chunk_size`` 0, full logits: the model returns vocab-parallel logits [b, s, V_p/tp]
  (``model.build_model(output_mode="logits")``), scored by ``logprobs.vocab_parallel_logprobs``.
- ``chunk_size`` > 0, memory-lean: the model returns its final hidden states [b, s, h]
  (``output_mode="hidden_states"``); only the scored positions go through the output weight,
  ``chunk_size`` tokens at a time (``logprobs.fused_output_logprobs``), so the micro-batch's
  full [b, s, V_p/tp] logits never exist.

Both give log p(y) = z_y - logsumexp(z) over the true vocabulary (padding excluded), with z the
logits of the position; the tensor-parallel group is Megatron-Core's (``parallel_state``). Asked,
both also give each scored position's mean logit over the true vocabulary (TRL's
``mean_logits``), this rank's share of it (its slice's sum / V: summed over TP ranks), read
from the logits where they exist (full: one more pass over them; memory-lean: over each chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_simpo.training.logprobs import (fused_output_logprobs, vocab_parallel_logprobs,
                                              vocab_slice_sums)
from megatron_simpo.model.builder import ModelOutput, output_weight


def check_chunk_size(logprob_chunk_size: int) -> None:
    """Refuse a ``--logprob-chunk-size`` that is not an integer >= 0 (the one check of it)."""
    if not isinstance(logprob_chunk_size, int) or logprob_chunk_size < 0:
        raise ValueError("--logprob-chunk-size must be an integer >= 0 (0 = full logits), got "
                         f"{logprob_chunk_size!r}")


@dataclass(frozen=True)
class LogprobHead:
    """How the step turns the last stage's output into log-probs. Validated on construction."""

    chunk_size: int
    """Tokens scored at a time through the output weight (memory-lean), or 0 for full logits."""
    vocab_size: int
    """The true vocabulary size: logits of the padding beyond it are excluded."""
    final_logit_softcapping: float | None = None
    """The model's final-logit soft-capping (Gemma-2): the memory-lean path caps its chunks (the
    model caps the full logits it returns itself)."""

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)

    @classmethod
    def for_model(cls, chunk_size: int, model_config) -> "LogprobHead":
        """The head of a model of ``model_config`` (its vocabulary and final-logit cap): the one
        way the policy's and every reference's heads are made, so none can miss the cap."""
        return cls(chunk_size, vocab_size=model_config.vocab_size,
                   final_logit_softcapping=model_config.final_logit_softcapping)

    @property
    def full_logits(self) -> bool:
        """Whether the model returns full logits (chunk size 0), so every position can be
        scored at once."""
        return self.chunk_size == 0

    @property
    def model_output(self) -> ModelOutput:
        """What the last stage must return for this head (``model.build_model``'s output_mode)."""
        return "logits" if self.full_logits else "hidden_states"

    def check(self, model) -> None:
        """Refuse a model (or its DDP wrapper) built for the other output; other pipeline
        stages return neither and pass."""
        model = getattr(model, "module", model)
        if not getattr(model, "post_process", False):
            return
        built = getattr(model, "output_mode", "logits")
        if built != self.model_output:
            raise ValueError(
                f"logprob_chunk_size={self.chunk_size} but the model returns "
                f"{built.replace('_', ' ')}: build it with output_mode={self.model_output!r} "
                "(components.build_components builds the models to match their head)")

    def logps(self, output: torch.Tensor, labels: torch.Tensor, model,
              at: tuple[torch.Tensor, torch.Tensor] | None = None, mean_logits: bool = False):
        """log p(labels) under the last stage's ``output`` of ``model`` (or its DDP wrapper);
        with ``mean_logits``, (that, this rank's share of each position's mean logit over the
        true vocabulary, fp32, same shape, no gradient: summed over TP ranks, TRL's
        ``mean_logits``).

        Args:
            output: [b, s, V_p/tp] logits, or [b, s, h] hidden states (memory-lean; gathered
                along the sequence under sequence parallelism).
            labels: [b, s] the next token of each position; or [k], the label of each ``at``
                position (shared-prompt rows score a position twice, with two labels).
            at: (rows [k], positions [k]): score only these positions, giving [k]; None scores
                every position, giving [b, s] (``full_logits`` only).
        """
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        group = parallel_state.get_tensor_model_parallel_group()
        listed = at is not None and labels.dim() == 1
        if self.full_logits:
            if listed:
                token_logps = vocab_parallel_logprobs(output[at].unsqueeze(0), labels.unsqueeze(0),
                                                      vocab_size=self.vocab_size, tp_group=group)[0]
            else:
                token_logps = vocab_parallel_logprobs(output, labels, vocab_size=self.vocab_size,
                                                      tp_group=group)
                token_logps = token_logps if at is None else token_logps[at]
            if not mean_logits:
                return token_logps
            with torch.no_grad():
                sums = vocab_slice_sums(output, vocab_size=self.vocab_size, tp_group=group)
            return token_logps, (sums if at is None else sums[at]) / self.vocab_size
        if at is None:
            raise ValueError("the memory-lean head scores chosen positions only: give `at`")
        model = getattr(model, "module", model)
        hidden = output[at]
        if not model.config.sequence_parallel and \
                parallel_state.get_tensor_model_parallel_world_size() > 1:
            # Identity forward, all-reduce of the hidden-state gradient over TP in backward.
            # Under sequence parallelism the model's gather already reduce-scatters it.
            hidden = copy_to_tensor_model_parallel_region(hidden)
        result = fused_output_logprobs(hidden, output_weight(model),
                                       labels if listed else labels[at],
                                       vocab_size=self.vocab_size, tp_group=group,
                                       chunk_size=self.chunk_size,
                                       softcap=self.final_logit_softcapping,
                                       with_sums=mean_logits)
        return (result[0], result[1] / self.vocab_size) if mean_logits else result
