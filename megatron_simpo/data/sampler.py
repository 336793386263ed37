"""Which pairs, in which order: the seeded held-out split and the seeded epoch sampler."""

from __future__ import annotations

import torch

from megatron_simpo.data.config import DataError


def held_out_split(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out row indices in the seeded permutation's order, the other rows in file order):
    ``fraction`` of the rows, at least one."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    n_valid = max(1, int(round(fraction * num_rows)))
    return order[:n_valid], sorted(order[n_valid:])



class PairSampler:
    """Deterministic order of pairs by seed and epoch; a position is a count of consumed pairs.

    Each epoch is a fresh seeded permutation of the training pairs; the incomplete last global
    batch of an epoch is dropped. Global batch ``k`` of the run is split into contiguous, disjoint
    shards, one per data-parallel rank. Resuming needs only ``consumed_samples``.
    """

    def __init__(self, num_pairs: int, global_batch_size: int, seed: int):
        if num_pairs < global_batch_size:
            raise DataError(f"the training set has {num_pairs} pairs, fewer than "
                             f"--global-batch-size ({global_batch_size})")
        self.num_pairs, self.global_batch_size, self.seed = num_pairs, global_batch_size, seed
        self.batches_per_epoch = num_pairs // global_batch_size
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_pairs, generator=generator).tolist()
        return self._order

    def global_batch(self, consumed_samples: int) -> list[int]:
        """Indices of the global batch that starts at ``consumed_samples``."""
        if consumed_samples % self.global_batch_size:
            raise ValueError(f"consumed samples {consumed_samples} is not a multiple of the "
                             f"global batch size {self.global_batch_size}")
        batch = consumed_samples // self.global_batch_size
        epoch, within = divmod(batch, self.batches_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start:start + self.global_batch_size]

    @staticmethod
    def shard(indices: list[int], dp_rank: int, dp_size: int) -> list[int]:
        per_rank = len(indices) // dp_size
        return indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]
