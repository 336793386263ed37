"""How a global batch of pairs becomes each data-parallel rank's micro-batches.

The seeded sampler decides WHICH pairs form a global batch; this module decides only HOW they
are laid out: which data-parallel rank and micro-batch each pair goes to, how long the rows are,
and whether several sequences share a row. The loss is the exact mean over the global batch
whatever the layout (``megatron_simpo.training.step``), so every layout here trains the same model;
they differ in how much of the work is padding.

Layouts (``BatchingConfig``):

* ``global-max``: rows of the whole global batch padded to its longest pair; contiguous shards
  per rank, micro-batches in sampler order (the original layout; kept as the benchmarks'
  baseline).
* ``in-order``: contiguous shards, micro-batches in sampler order, each padded to its own
  longest row (what TRL does).
* ``sorted`` (default): pairs ordered by length within the global batch and cut into
  micro-batches of similar lengths, which are dealt to ranks so that their token loads are
  balanced (data-parallel ranks wait for the slowest at every step).
* ``--max-tokens-per-microbatch N`` (dynamic batching): sorted pairs fill micro-batches while
  the padded micro-batch holds at most N tokens; the number of pairs per micro-batch, and of
  micro-batches per rank, varies. A pair longer than N runs alone.
* ``--pack-sequences``: each micro-batch is one row of at most N tokens holding whole pairs
  back to back (first-fit decreasing); each sequence attends only to itself and its position ids
  restart at 0.
* ``--share-prompt`` (with any of the above): a pair is ONE sequence, prompt + chosen + rejected,
  of P + C + R - 2 positions instead of 2P + C + R - 2 (``PairLengths.shared``); the mask keeps
  the two responses apart (``data.shared_rows``). Unpacked, each pair is a row of its own.

A forward-only pass over any number of pairs (the reference log-prob pass) plans with
``plan_forward``: the same micro-batches on one rank, the last holding what is left.

Every rank computes the same plan from the same lengths, so no communication is needed.
Lengths here are model input positions: a sequence of L tokens (prompt + response) occupies
L - 1 positions (the last token is only a label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

BatchLayout = Literal["sorted", "in-order", "global-max"]
BATCH_LAYOUTS = get_args(BatchLayout)


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """How the pairs of a global batch are laid out in micro-batches."""

    batch_layout: BatchLayout = "sorted"
    """sorted: pairs ordered by length within the global batch, micro-batches of similar
    lengths balanced over data-parallel ranks, each padded to its own longest row; in-order:
    the sampler's order, each micro-batch padded to its own longest row (TRL's layout);
    global-max: every row padded to the global batch's longest pair."""
    max_tokens_per_microbatch: int | None = None
    """Dynamic batching: a micro-batch holds whole pairs up to this many tokens (rows x padded
    length, or the packed row), so the pairs per micro-batch vary; replaces --micro-batch-size."""
    pack_sequences: bool = False
    """Pack whole pairs back to back into one row of --max-tokens-per-microbatch tokens per
    micro-batch; each sequence attends only to itself, its position ids restart at 0."""
    share_prompt: bool = False
    """One row (or packed segment) per pair: prompt, chosen, rejected; the rejected tokens see
    the prompt and themselves, never the chosen; the prompt is computed once, not twice."""

    def __post_init__(self) -> None:
        if self.batch_layout not in BATCH_LAYOUTS:
            raise ValueError(f"--batch-layout must be one of {', '.join(BATCH_LAYOUTS)}, "
                             f"got {self.batch_layout!r}")
        if self.max_tokens_per_microbatch is not None:
            if self.max_tokens_per_microbatch < 2:
                raise ValueError("--max-tokens-per-microbatch must be at least 2, got "
                                 f"{self.max_tokens_per_microbatch}")
            if self.batch_layout != "sorted":
                raise ValueError("--max-tokens-per-microbatch fills micro-batches with pairs "
                                 "sorted by length: it goes with --batch-layout sorted, not "
                                 f"{self.batch_layout}")
        if self.pack_sequences and self.max_tokens_per_microbatch is None:
            raise ValueError("--pack-sequences needs --max-tokens-per-microbatch (the length "
                             "of a packed row)")

    @property
    def token_budget(self) -> bool:
        return self.max_tokens_per_microbatch is not None


def check_pair_parts(pair, index: int) -> None:
    """A pair laid out in rows has a prompt token (e.g. BOS) and non-empty responses; ValueError
    naming the pair otherwise (unshared and shared-prompt layouts alike)."""
    if len(pair.prompt) == 0:
        raise ValueError(f"pair {index}: empty prompt (need at least one token, e.g. BOS)")
    for which, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if len(response) == 0:
            raise ValueError(f"pair {index}: empty {which} response")


@dataclass(frozen=True)
class PairLengths:
    """Model input positions of a pair's two rows (prompt + response - 1), and its prompt's
    tokens (0: unknown, nothing can be shared)."""

    chosen: int
    rejected: int
    prompt: int = 0

    @property
    def longest(self) -> int:
        return max(self.chosen, self.rejected)

    @property
    def total(self) -> int:
        return self.chosen + self.rejected

    @property
    def shared(self) -> int:
        """Positions of the pair as one shared-prompt sequence: P + C + R - 2 = total - P."""
        return self.total - self.prompt

    def row(self, shared: bool) -> int:
        """The longest row the pair needs: its shared sequence, or its longer response's row."""
        return self.shared if shared else self.longest

    def size(self, shared: bool) -> int:
        """Positions the pair's sequences occupy in a packed row."""
        return self.shared if shared else self.total

    @classmethod
    def of(cls, pair) -> "PairLengths":
        """The lengths of a pair of token lists (anything with prompt, chosen, rejected)."""
        return pair_lengths(len(pair.prompt), len(pair.chosen), len(pair.rejected))


def pair_lengths(prompt: int, chosen: int, rejected: int) -> PairLengths:
    """From token counts: each row is prompt + response tokens, minus the last (a label)."""
    return PairLengths(prompt + chosen - 1, prompt + rejected - 1, prompt)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Microbatch:
    """Pairs (dataset indices) run together, and the length of their rows."""

    pairs: tuple[int, ...]
    length: int
    """Positions per row: padded longest row, or the packed row's length."""
    packed: bool = False
    shared: bool = False
    """Shared-prompt rows: one per pair (or one packed row of them)."""

    @property
    def rows(self) -> int:
        return 1 if self.packed else (1 if self.shared else 2) * len(self.pairs)

    @property
    def processed_tokens(self) -> int:
        return self.rows * self.length


@dataclass(frozen=True)
class BatchPlan:
    """Every data-parallel rank's micro-batches for one global batch (the same on every rank)."""

    ranks: tuple[tuple[Microbatch, ...], ...]
    real_tokens: int
    """Input positions of the pairs' sequences over the whole global batch (each pair's
    prompt counted twice, as the unshared layout computes it)."""
    saved_tokens: int = 0
    """Prompt positions not computed: shared-prompt rows compute each prompt once."""

    @property
    def processed_tokens(self) -> int:
        return sum(mb.processed_tokens for rank in self.ranks for mb in rank)

    @property
    def padding_efficiency(self) -> float:
        """Real positions computed / processed positions (1.0: no padding at all)."""
        return (self.real_tokens - self.saved_tokens) / max(1, self.processed_tokens)

    def rank_tokens(self) -> list[int]:
        """Processed tokens per data-parallel rank (the slowest rank sets the step time)."""
        return [sum(mb.processed_tokens for mb in rank) for rank in self.ranks]


def row_length(lengths: Sequence[PairLengths], seq_length: int, multiple: int = 8,
               shared: bool = False) -> int:
    """Row length of pairs run together: their longest row, rounded up to ``multiple``, at most
    ``seq_length`` (the one row-length rule). A shared-prompt row holds both responses, so it
    may reach 2 * ``seq_length`` (its positions stay below ``seq_length``)."""
    return min(round_up(max(p.row(shared) for p in lengths), multiple),
               (2 if shared else 1) * seq_length)


def _sorted_microbatches(indices: Sequence[int], length_of: dict, size: int, multiple: int,
                         seq_length: int, shared: bool = False) -> list[Microbatch]:
    """Pairs longest first (ties keep the given order) cut into micro-batches of ``size``
    pairs (the last may hold fewer), each padded to its own longest row."""
    order = sorted(indices, key=lambda i: -length_of[i].row(shared))
    return [Microbatch(tuple(group), row_length([length_of[i] for i in group], seq_length,
                                                multiple, shared), shared=shared)
            for group in (order[i:i + size] for i in range(0, len(order), size))]


def _balanced_deal(microbatches: list[Microbatch], dp_size: int, equal_counts: bool
                   ) -> tuple[tuple[Microbatch, ...], ...]:
    """Micro-batches dealt to ranks, most processed tokens first, each to the least loaded rank
    (with ``equal_counts``, among ranks that still have room: every rank gets
    len(microbatches) / dp_size of them)."""
    per_rank = len(microbatches) // dp_size if equal_counts else None
    loads, dealt = [0] * dp_size, [[] for _ in range(dp_size)]
    for mb in sorted(microbatches, key=lambda mb: (-mb.processed_tokens, mb.pairs[0])):
        open_ranks = [r for r in range(dp_size) if per_rank is None or len(dealt[r]) < per_rank]
        rank = min(open_ranks, key=lambda r: (loads[r], r))
        dealt[rank].append(mb)
        loads[rank] += mb.processed_tokens
    return tuple(tuple(rank) for rank in dealt)


def plan_global_batch(indices: Sequence[int], lengths: Sequence[PairLengths], *, dp_size: int,
                      micro_batch_size: int, config: BatchingConfig, seq_length: int,
                      multiple: int = 8, equal_counts: bool = False) -> BatchPlan:
    """Lay out one global batch.

    Args:
        indices: the global batch's pairs (dataset indices) in sampler order.
        lengths: their ``PairLengths``, in the same order.
        dp_size: data-parallel ranks.
        micro_batch_size: pairs per micro-batch (fixed-size layouts).
        seq_length: the longest row allowed (--seq-length); caps padded lengths.
        multiple: rows are padded to a multiple of this (TP/SP/FP8 alignment).
        equal_counts: every rank the same number of micro-batches under a token budget too
            (expert parallelism: each micro-batch's token exchange spans data-parallel ranks);
            the fullest micro-batches are split until the count divides evenly. The
            fixed-size layouts always have equal counts.
    """
    if len(indices) != len(lengths):
        raise ValueError("indices and lengths differ in number")
    length_of = dict(zip(indices, lengths))
    shared = config.share_prompt
    real = sum(p.total for p in lengths)
    saved = sum(p.prompt for p in lengths) if shared else 0
    if config.token_budget:
        if len(indices) < dp_size:
            raise ValueError(f"{len(indices)} pairs cannot feed {dp_size} data-parallel ranks")
        ranks = _token_budget_plan(list(indices), length_of, dp_size, config, multiple,
                                   seq_length, equal_counts)
        return BatchPlan(ranks, real, saved)
    per_rank = len(indices) // dp_size
    if per_rank * dp_size != len(indices) or per_rank % micro_batch_size:
        raise ValueError(f"{len(indices)} pairs do not split into micro-batches of "
                         f"{micro_batch_size} pairs on {dp_size} data-parallel ranks")

    def microbatch(group: Sequence[int], length: int | None = None) -> Microbatch:
        return Microbatch(tuple(group), length or row_length([length_of[i] for i in group],
                                                             seq_length, multiple, shared),
                          shared=shared)

    if config.batch_layout == "sorted":  # longest first; ties keep sampler order
        return BatchPlan(_balanced_deal(
            _sorted_microbatches(indices, length_of, micro_batch_size, multiple, seq_length,
                                 shared), dp_size, equal_counts=True), real, saved)
    # Sampler order, contiguous shards; global-max pads every row to the batch's longest.
    length = row_length(lengths, seq_length, multiple, shared) \
        if config.batch_layout == "global-max" else None
    shards = [indices[r * per_rank:(r + 1) * per_rank] for r in range(dp_size)]
    return BatchPlan(tuple(tuple(microbatch(shard[i:i + micro_batch_size], length)
                                 for i in range(0, per_rank, micro_batch_size))
                           for shard in shards), real, saved)


def plan_forward(indices: Sequence[int], lengths: Sequence[PairLengths], *,
                 micro_batch_size: int | None, config: BatchingConfig, seq_length: int,
                 multiple: int = 8) -> tuple[Microbatch, ...]:
    """One rank's micro-batches for a forward-only pass over any number of pairs (the
    reference log-prob pass): under a token budget the plan of ``plan_global_batch`` on one
    rank; otherwise ``micro_batch_size`` pairs of similar lengths each, longest first, the last
    micro-batch holding what is left."""
    if len(indices) != len(lengths):
        raise ValueError("indices and lengths differ in number")
    if not indices:
        return ()
    if config.token_budget:
        return plan_global_batch(indices, lengths, dp_size=1,
                                 micro_batch_size=micro_batch_size or 1, config=config,
                                 seq_length=seq_length, multiple=multiple).ranks[0]
    return tuple(_sorted_microbatches(indices, dict(zip(indices, lengths)), micro_batch_size,
                                      multiple, seq_length, config.share_prompt))


def _token_budget_plan(indices: list[int], length_of: dict, dp_size: int, config: BatchingConfig,
                       multiple: int, seq_length: int, equal_counts: bool = False
                       ) -> tuple[tuple[Microbatch, ...], ...]:
    """Micro-batches formed over the whole global batch (sorted, so lengths in a micro-batch
    are alike), then dealt to ranks largest first to the least loaded one (``equal_counts``:
    as many to each)."""
    budget, shared = config.max_tokens_per_microbatch, config.share_prompt
    rows_per_pair = 1 if shared else 2

    def row_of(index: int) -> int:
        return row_length([length_of[index]], seq_length, multiple, shared)

    order = sorted(indices, key=lambda i: -length_of[i].row(shared))
    if config.pack_sequences:
        groups = _first_fit_decreasing(order, length_of, budget, shared)
    else:
        groups, current = [], []
        for index in order:  # longest first: the first pair of a micro-batch sets its length
            if current and rows_per_pair * (len(current) + 1) * row_of(current[0]) > budget:
                groups.append(current)
                current = []
            current.append(index)
        groups.append(current)
    # every rank needs work (and with equal_counts as much as the others): halve the fullest
    while len(groups) < dp_size or (equal_counts and len(groups) % dp_size):
        fullest = max(range(len(groups)), key=lambda g: len(groups[g]))
        group = groups.pop(fullest)
        if len(group) < 2:
            raise ValueError(f"{len(indices)} pairs of one pair per micro-batch cannot give "
                             f"{dp_size} data-parallel ranks as many micro-batches each")
        groups[fullest:fullest] = [group[:len(group) // 2], group[len(group) // 2:]]
    if config.pack_sequences:
        microbatches = [Microbatch(tuple(g), round_up(sum(length_of[i].size(shared) for i in g),
                                                      multiple), packed=True, shared=shared)
                        for g in groups]
    else:
        microbatches = [Microbatch(tuple(g), row_of(g[0]), shared=shared) for g in groups]
    return _balanced_deal(microbatches, dp_size, equal_counts=equal_counts)


def _first_fit_decreasing(pairs: list[int], length_of: dict, capacity: int,
                          shared: bool = False) -> list[list[int]]:
    """Pairs (both sequences together) into rows of at most ``capacity`` positions."""
    bins: list[list[int]] = []
    used: list[int] = []
    for index in sorted(pairs, key=lambda i: -length_of[i].size(shared)):
        size = length_of[index].size(shared)
        for slot, filled in enumerate(used):
            if filled + size <= capacity:
                bins[slot].append(index)
                used[slot] += size
                break
        else:  # a pair longer than the row still runs, alone
            bins.append([index])
            used.append(size)
    return bins
