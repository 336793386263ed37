"""Shared-prompt rows (``--share-prompt``): a pair's prompt computed once, not twice.

A pair with prompt p (P tokens), chosen c (C) and rejected r (R) is ONE sequence of
P + C + R - 2 input positions, where the unshared layout has two of P + C - 1 and P + R - 1:

    tokens     p0 .. p[P-1] | c0 .. c[C-2] | r0 .. r[R-2]
    positions  0  ..  P-1   | P  .. P+C-2  | P  .. P+R-2     (the rejected part restarts at P)

Attention (``True`` below: may attend), for a query q and key k of the same pair, k <= q in the
row: the prompt sees the prompt before it; a chosen token sees the prompt and the chosen tokens
before it; a rejected token sees the prompt and the rejected tokens before it, never the chosen.
So every token sees exactly the keys, at exactly the positions, it sees in its unshared row, and
its hidden state is the same. Padding (and, packed, every other pair) is a segment of its own.

Scoring: chosen token c[i] is predicted at the row index of its predecessor, as unshared; the
first rejected token r0 is predicted by the prompt's last position (index P-1, the same hidden
state that predicts c0), and r[i] (i >= 1) by r[i-1]. A position can thus carry two labels, so a
shared batch lists its scored tokens explicitly (``PreferenceBatch.scored``: row, index, label,
sequence) instead of through ``labels`` and ``loss_mask`` alone.

Unpacked, pair i is row i (rows right-padded to a common length). Packed, pairs lie back to back
in one row. Either way the mask is an explicit [b, 1, s, s] tensor (Megatron's convention: True
where a query may NOT attend), computed here from each position's segment and part
(``shared_mask``), so that a context-parallel split can slice it by rows of queries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_simpo.data.batching import check_pair_parts

PROMPT, CHOSEN, REJECTED = 0, 1, 2
"""The part of a row each position belongs to (padding counts as a prompt of its own)."""


def shared_mask(segment: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where a query may NOT attend.

    Args:
        segment: [b, s] the pair (or padding run) of each position; keys of another segment
            are never seen.
        part: [b, s] ``PROMPT``, ``CHOSEN`` or ``REJECTED`` of each position.

    A query at index i sees a key at j iff j <= i, same segment, and the key is a prompt
    position or of the query's own part.
    """
    s = segment.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment.device).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    key_part, query_part = part.unsqueeze(1), part.unsqueeze(2)
    visible = causal & same & ((key_part == PROMPT) | (key_part == query_part))
    return (~visible).unsqueeze(1)


def _pieces(pair, index: int, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pair's prompt, chosen and rejected token arrays, checked as the unshared rows are."""
    check_pair_parts(pair, index)
    prompt, chosen, rejected = (np.asarray(x, dtype=np.int64)
                                for x in (pair.prompt, pair.chosen, pair.rejected))
    size = len(prompt) + len(chosen) + len(rejected) - 2
    if size > limit:
        raise ValueError(f"pair {index}: its shared-prompt row is {size} positions, more than "
                         f"the {limit} available")
    return prompt, chosen, rejected


def shared_fields(pairs: Sequence, length: int, pad_id: int = 0, *, packed: bool = False
                  ) -> dict:
    """Lay out pairs as shared-prompt rows of ``length`` positions: one row per pair
    (right-padded), or, ``packed``, all of them back to back in one row then padding.

    Returns the fields of a ``collate.PreferenceBatch`` (``collate.collate_shared`` builds it)
    whose sequences are numbered as in the unshared layouts (2i: pair i's chosen, 2i+1: its
    rejected), with ``scored`` listing every scored token, ``attention_mask`` [b, 1, s, s] and
    ``position_ids`` [b, s] as in the module doc. ``loss_mask`` counts the labels scored at each
    position (2 on a prompt's last position).
    """
    rows = 1 if packed else len(pairs)
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((rows, length), dtype=torch.float32)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    segment = torch.zeros((rows, length), dtype=torch.long)
    part = torch.full((rows, length), PROMPT, dtype=torch.long)
    scored: list[torch.Tensor] = []  # [4, k] pieces: row, index, label, sequence
    at = 0
    for index, pair in enumerate(pairs):
        row = 0 if packed else index
        start = at if packed else 0
        prompt, chosen, rejected = _pieces(pair, index, length - start)
        p, c, r = len(prompt), len(chosen), len(rejected)
        body = np.concatenate([prompt, chosen[:-1], rejected[:-1]])
        stop = start + len(body)
        tokens[row, start:stop] = torch.from_numpy(body)
        # A position's own next token (the chosen label on the prompt's last position).
        labels[row, start:stop] = torch.from_numpy(np.concatenate(
            [prompt[1:], chosen, rejected[1:]]))
        position_ids[row, start:stop] = torch.cat([torch.arange(p + c - 1),
                                                   torch.arange(p, p + r - 1)])
        segment[row, start:stop] = index + 1
        part[row, start + p:start + p + c - 1] = CHOSEN
        part[row, start + p + c - 1:stop] = REJECTED
        chosen_at = torch.arange(start + p - 1, start + p + c - 1)
        rejected_at = torch.cat([torch.tensor([start + p - 1]),
                                 torch.arange(start + p + c - 1, stop)])
        for sequence, where, label in ((2 * index, chosen_at, chosen),
                                       (2 * index + 1, rejected_at, rejected)):
            loss_mask[row].index_put_((where,), torch.ones(len(where)), accumulate=True)
            scored.append(torch.stack([torch.full_like(where, row), where,
                                       torch.from_numpy(label), torch.full_like(where, sequence)]))
        at = stop
    # The padding tail (a segment of its own, never scored) keeps position 0: numbered on, a
    # short pair's tail beside a long shared row (up to 2 x --seq-length) would pass the
    # model's largest position.
    mask = shared_mask(segment, part)
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                attention_mask=mask, packed_pairs=len(pairs), scored=torch.cat(scored, dim=1))
