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

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from megatron_simpo.data.batching import PairLengths, check_pair_parts, row_length
from megatron_simpo.data.shared_rows import shared_fields
from megatron_simpo.distributed.parallel import context_parallel_positions


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids (the prompt already carries the chat template)."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


@dataclass(frozen=True)
class PreferenceBatch:
    """The sequences of n pairs, 2n of them: sequence 2i is pair i's chosen response, 2i+1 its
    rejected one. Unpacked (the default), sequence j is row j and tensors are [2n, s]. Packed,
    the sequences lie back to back in one row ([1, s] tensors): ``sequence_ids`` says which
    sequence each position belongs to, ``cu_seqlens`` where each segment starts. Shared-prompt
    rows (``data.shared_rows``: one per pair, [n, s], or packed in one, [1, s]) list their scored
    tokens in ``scored``."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    reference_logp_sum: torch.Tensor | None = None
    """[2n] summed response log-probs of the frozen reference model (dpo, ipo, rdpo), from its
    forward pass or precomputed (--reference-logps)."""
    sequence_ids: torch.Tensor | None = None
    """Packed only: [1, s] the sequence (0 .. 2n-1) of each position; 0 on the padding tail,
    whose loss mask is 0."""
    cu_seqlens: torch.Tensor | None = None
    """Packed only: [segments + 1] int32 segment starts in the row (the 2n sequences, then the
    padding tail if any), as Transformer Engine's THD layout takes them."""
    attention_mask: torch.Tensor | None = None
    """Shared-prompt rows only: [b, 1, s, s] bool, True where a position may NOT attend
    (``shared_rows.shared_mask``). Packed rows carry no mask: their segments (``cu_seqlens``)
    say it all, and the attention builds from them what it needs."""
    thd: bool = False
    """Packed only: the row is for Transformer Engine's THD layout; else (the local layer spec)
    its segments go to the attention in sbhd layout."""
    packed_pairs: int = 0
    """Packed or shared-prompt rows: the number of pairs in the batch."""
    longest_segment: int = 0
    """Packed only: the longest segment of ``cu_seqlens`` (THD's max_seqlen, known on the host
    so that the forward never reads it back from the device)."""
    scored: torch.Tensor | None = None
    """Shared-prompt rows only: [4, k] int64, every scored token as (row, index in the row,
    label, sequence); a prompt's last position is scored twice (the first chosen and the first
    rejected token)."""
    scored_tokens: torch.Tensor | None = None
    """Unpacked and packed rows: [4, k] int64, the positions where ``loss_mask`` is 1 in
    row-major order as (row, index in the row, label, sequence), found on the host when the
    batch is made (``scored_tokens``), so that the step need not read the mask back from the
    device (a nonzero: a device sync per micro-batch). None where a batch is cut on the device
    or re-laid (a context-parallel share): the step then finds them from ``loss_mask``."""

    @property
    def packed(self) -> bool:
        return self.sequence_ids is not None

    @property
    def shared(self) -> bool:
        return self.scored is not None

    @property
    def num_sequences(self) -> int:
        return 2 * self.packed_pairs if self.packed or self.shared else self.tokens.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.num_sequences // 2

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
        if self.packed or self.shared:
            raise ValueError("packed and shared-prompt batches do not split into pairs by rows: "
                             "collate each micro-batch's pairs")
        if start % 2 or stop % 2:
            raise ValueError("row ranges must cover whole pairs (even bounds)")
        ref = None if self.reference_logp_sum is None else self.reference_logp_sum[start:stop]
        labels, loss_mask = self.labels[start:stop], self.loss_mask[start:stop]
        on_host = loss_mask.device.type == "cpu"
        return PreferenceBatch(self.tokens[start:stop], labels, loss_mask,
                               self.position_ids[start:stop], ref,
                               scored_tokens=scored_tokens(labels, loss_mask) if on_host else None)

    def to(self, device: torch.device) -> "PreferenceBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def with_reference(self, reference_logp_sum: torch.Tensor) -> "PreferenceBatch":
        return replace(self, reference_logp_sum=reference_logp_sum)

    def context_parallel_share(self, rank: int, size: int) -> "PreferenceBatch":
        """What CP rank ``rank`` of ``size`` runs: the positions
        ``context_parallel_positions(s, rank, size)`` of tokens, labels, loss mask, position and
        sequence ids ([rows, s/size]), and of shared-prompt rows the scored tokens at those
        positions (re-indexed). The attention mask and segment starts stay the whole row's (the attention takes them at its query rows); the pair count is unchanged (every
        CP rank's per-sequence sums are partial: the step adds them over the CP group)."""
        if size == 1:
            return self
        at = context_parallel_positions(self.seq_length, rank, size, device=self.tokens.device)
        share = {name: getattr(self, name)[:, at] for name in (
            "tokens", "labels", "loss_mask", "position_ids", "sequence_ids")
            if getattr(self, name) is not None}
        share["scored_tokens"] = None  # the whole row's; the share's come from its loss mask
        if self.scored is not None:  # the scored tokens whose position this rank holds
            local = torch.full((self.seq_length,), -1, dtype=torch.long, device=at.device)
            local[at] = torch.arange(len(at), device=at.device)
            rows, index, labels, sequences = self.scored
            mine = local[index] >= 0
            share["scored"] = torch.stack([rows[mine], local[index[mine]], labels[mine],
                                           sequences[mine]])
        return replace(self, **share)


def scored_tokens(labels: torch.Tensor, loss_mask: torch.Tensor,
                  sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[4, k] int64 (row, index in the row, label, sequence) of every position where
    ``loss_mask`` is nonzero, in row-major order; the sequence is the row unless
    ``sequence_ids`` (packed rows) says otherwise. For host tensors (the collate's)."""
    rows, positions = loss_mask.nonzero(as_tuple=True)
    sequences = rows if sequence_ids is None else sequence_ids[rows, positions]
    return torch.stack([rows, positions, labels[rows, positions], sequences])


def _sequence(pair: TokenizedPair, index: int, offset: int, limit: int) -> tuple[torch.Tensor, int]:
    """(prompt + response tokens, prompt length) of a pair's chosen (offset 0) or rejected row."""
    which = "chosen" if offset == 0 else "rejected"
    response = pair.chosen if offset == 0 else pair.rejected
    check_pair_parts(pair, index)
    full = torch.from_numpy(np.concatenate([np.asarray(pair.prompt, dtype=np.int64),
                                            np.asarray(response, dtype=np.int64)]))
    if len(full) - 1 > limit:
        raise ValueError(f"pair {index}: prompt + {which} is {len(full)} tokens, more than "
                         f"seq_length + 1 = {limit + 1}")
    return full, len(pair.prompt)


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
        for offset in (0, 1):
            full, prompt_length = _sequence(pair, index, offset, seq_length)
            row, length = 2 * index + offset, len(full) - 1
            tokens[row, :length] = full[:-1]
            labels[row, :length] = full[1:]
            loss_mask[row, prompt_length - 1:length] = 1.0
    position_ids = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).expand(n_rows, -1)
    return PreferenceBatch(tokens, labels, loss_mask, position_ids.contiguous(),
                           scored_tokens=scored_tokens(labels, loss_mask))


def collate_packed(pairs: Sequence[TokenizedPair], length: int, pad_id: int = 0, *,
                   thd: bool = False) -> PreferenceBatch:
    """Lay out pairs back to back in ONE row of ``length`` positions: chosen 0, rejected 0,
    chosen 1, ... then padding. Position ids restart at 0 for every sequence.

    Each sequence attends causally to itself: the segments (``cu_seqlens``) describe the
    block-diagonal mask, which is never built here ([s, s] per micro-batch, copied to the
    device). ``thd``: the row is for Transformer Engine's THD layout, else for the local layer
    spec's attention (segments in sbhd layout).
    """
    tokens = torch.full((1, length), pad_id, dtype=torch.long)
    labels = torch.full((1, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((1, length), dtype=torch.float32)
    position_ids = torch.zeros((1, length), dtype=torch.long)
    sequence_ids = torch.zeros((1, length), dtype=torch.long)
    starts, at = [0], 0
    for index, pair in enumerate(pairs):
        for offset in (0, 1):
            full, prompt_length = _sequence(pair, index, offset, length)
            size = len(full) - 1
            if at + size > length:
                raise ValueError(f"packed pairs need more than {length} positions")
            tokens[0, at:at + size] = full[:-1]
            labels[0, at:at + size] = full[1:]
            loss_mask[0, at + prompt_length - 1:at + size] = 1.0
            position_ids[0, at:at + size] = torch.arange(size)
            sequence_ids[0, at:at + size] = 2 * index + offset
            at += size
            starts.append(at)
    if at < length:  # the padding tail is a segment of its own: it attends only to itself
        position_ids[0, at:] = torch.arange(length - at)
        starts.append(length)
    cu_seqlens = torch.tensor(starts, dtype=torch.int32)
    return PreferenceBatch(tokens, labels, loss_mask, position_ids, None, sequence_ids,
                           cu_seqlens, thd=thd, packed_pairs=len(pairs),
                           longest_segment=int(cu_seqlens.diff().max()),
                           scored_tokens=scored_tokens(labels, loss_mask, sequence_ids))


def collate_shared(pairs: Sequence[TokenizedPair], length: int, pad_id: int = 0, *,
                   packed: bool = False) -> PreferenceBatch:
    """Shared-prompt rows of ``length`` positions (``shared_rows.shared_fields``): one per pair,
    or, ``packed``, one row of all of them."""
    return PreferenceBatch(**shared_fields(pairs, length, pad_id, packed=packed))


def collate_microbatch(pairs: Sequence[TokenizedPair], microbatch, pad_id: int = 0, *,
                       thd: bool = False) -> PreferenceBatch:
    """The pairs ``microbatch`` (a ``batching.Microbatch``) names, taken from ``pairs``: padded
    rows of its length, or its packed row (``thd`` as in ``collate_packed``), as
    shared-prompt rows if it says so (always with their explicit mask)."""
    chosen = [pairs[i] for i in microbatch.pairs]
    if microbatch.shared:
        return collate_shared(chosen, microbatch.length, pad_id, packed=microbatch.packed)
    if microbatch.packed:
        return collate_packed(chosen, microbatch.length, pad_id, thd=thd)
    return collate_pairs(chosen, microbatch.length, pad_id)



def padded_length(pairs: Sequence[TokenizedPair], seq_length: int, multiple: int = 8) -> int:
    """Model input length for a batch: its longest pair (minus the last token), rounded up
    (``batching.row_length`` of the pairs' lengths)."""
    return row_length([PairLengths.of(p) for p in pairs], seq_length, multiple)
