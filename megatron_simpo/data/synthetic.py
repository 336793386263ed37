"""Seeded synthetic preference data with the length distribution of SimPO's training data.

Benchmarks and tests use it instead of fixed-length pairs, where padding hides: prompt tokens
lognormal (median ~120, sigma 1.0, at most 1,800), each response lognormal (median ~350, sigma
0.6), prompt + response cut at 2,048 (the paper's max length and max prompt length). ``scale``
shrinks every length (x0.25 with a 512 cap runs on two CPU cores).
"""

from __future__ import annotations

import math

import torch

from megatron_simpo.data.collate import TokenizedPair


def preference_lengths(num_pairs: int, seed: int = 0, scale: float = 1.0,
                       max_length: int = 2048, max_prompt_length: int = 1800
                       ) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of ``num_pairs`` pairs; every count >= 1."""
    generator = torch.Generator().manual_seed(seed)

    def lognormal(median: float, sigma: float) -> torch.Tensor:
        normal = torch.randn(num_pairs, generator=generator, dtype=torch.float64)
        return torch.exp(math.log(median * scale) + sigma * normal)

    prompts = lognormal(120, 1.0).round().clamp(1, max_prompt_length * scale).long()
    chosen, rejected = (lognormal(350, 0.6).round().clamp(min=1).long() for _ in range(2))
    limit = int(max_length * scale)
    return [(p, max(1, min(c, limit - p)), max(1, min(r, limit - p)))
            for p, c, r in zip(prompts.tolist(), chosen.tolist(), rejected.tolist())]


def preference_pairs(num_pairs: int, vocab_size: int, seed: int = 0, scale: float = 1.0,
                     max_length: int = 2048) -> list[TokenizedPair]:
    """Random token ids with ``preference_lengths``' lengths."""
    generator = torch.Generator().manual_seed(seed + 1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r))
            for p, c, r in preference_lengths(num_pairs, seed, scale, max_length)]
