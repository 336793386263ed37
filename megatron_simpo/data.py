"""Preference batches: the pair layout the step consumes.

A batch holds n pairs as 2n rows, interleaved: row 2i is pair i's chosen response, row 2i+1
its rejected one, each preceded by the same prompt. Interleaving keeps both halves of a pair in
the same micro-batch whatever the split, so a pair never straddles micro-batches or ranks.

For a token sequence ``full = prompt + response`` of length L, the model reads
``tokens = full[:-1]`` and is scored on ``labels = full[1:]``; ``loss_mask`` is 1 exactly on the
positions whose label is a response token. Rows are right-padded to a common length; under the
causal mask real tokens never attend to the padding that follows them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids (the prompt already carries the chat template)."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


@dataclass(frozen=True)
class PreferenceBatch:
    """2n interleaved rows of n pairs. All tensors are [2n, s] unless noted."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    reference_logp_sum: torch.Tensor | None = None
    """[2n] summed response log-probs of the frozen reference model (DPO only)."""

    @property
    def num_pairs(self) -> int:
        return self.tokens.shape[0] // 2

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def split(self, num_microbatches: int) -> list["PreferenceBatch"]:
        """Equal micro-batches of whole pairs, in order."""
        if self.num_pairs % num_microbatches != 0:
            raise ValueError(f"{self.num_pairs} pairs do not split into {num_microbatches} micro-batches")
        rows = 2 * self.num_pairs // num_microbatches
        return [self.rows(i * rows, (i + 1) * rows) for i in range(num_microbatches)]

    def rows(self, start: int, stop: int) -> "PreferenceBatch":
        if start % 2 or stop % 2:
            raise ValueError("row ranges must cover whole pairs (even bounds)")
        ref = None if self.reference_logp_sum is None else self.reference_logp_sum[start:stop]
        return PreferenceBatch(self.tokens[start:stop], self.labels[start:stop],
                               self.loss_mask[start:stop], self.position_ids[start:stop], ref)

    def to(self, device: torch.device) -> "PreferenceBatch":
        ref = None if self.reference_logp_sum is None else self.reference_logp_sum.to(device)
        return PreferenceBatch(self.tokens.to(device), self.labels.to(device),
                               self.loss_mask.to(device), self.position_ids.to(device), ref)

    def with_reference(self, reference_logp_sum: torch.Tensor) -> "PreferenceBatch":
        return replace(self, reference_logp_sum=reference_logp_sum)


def collate_pairs(pairs: Sequence[TokenizedPair], seq_length: int, pad_id: int = 0
                  ) -> PreferenceBatch:
    """Lay out pairs as interleaved, right-padded rows of exactly ``seq_length`` positions.

    Each prompt + response must have at least one prompt token, a non-empty response and at most
    ``seq_length + 1`` tokens (truncation is the dataset's job, before this point).
    """
    n_rows = 2 * len(pairs)
    tokens = torch.full((n_rows, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n_rows, seq_length), dtype=torch.float32)
    for index, pair in enumerate(pairs):
        for offset, response in enumerate((pair.chosen, pair.rejected)):
            which = "chosen" if offset == 0 else "rejected"
            if len(pair.prompt) == 0:
                raise ValueError(f"pair {index}: empty prompt (need at least one token, e.g. BOS)")
            if len(response) == 0:
                raise ValueError(f"pair {index}: empty {which} response")
            full = torch.tensor(list(pair.prompt) + list(response), dtype=torch.long)
            if len(full) - 1 > seq_length:
                raise ValueError(f"pair {index}: prompt + {which} is {len(full)} tokens, more than "
                                 f"seq_length + 1 = {seq_length + 1}")
            row, length = 2 * index + offset, len(full) - 1
            tokens[row, :length] = full[:-1]
            labels[row, :length] = full[1:]
            loss_mask[row, len(pair.prompt) - 1:length] = 1.0
    position_ids = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).expand(n_rows, -1)
    return PreferenceBatch(tokens, labels, loss_mask, position_ids.contiguous())
