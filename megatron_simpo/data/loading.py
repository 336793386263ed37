"""The data path, from a source to the batches the step consumes, in one place to import from.

1. ``sources``: which reader a source takes (JSONL by line, anything ``datasets`` reads).
2. ``tokenization``: the chat template, token ids, truncation (``tokenize_records``).
3. ``data_cache``: the one pipeline; ``datasets.map`` tokenizes a source once into a
   memory-mapped Arrow entry (``prepare_data``), the held-out split and the drop and cut rules
   apply to its rows; ``load_datasets`` runs the same pipeline in a temporary folder and returns
   lists (``fingerprints`` names the entries, ``pair_table`` reads them).
4. ``sampler``: which pairs form each global batch; ``batching``: how a global batch is laid
   out in micro-batches; ``collate``: a micro-batch as tensors (the pair layout, below).

Pair layout (``collate``): a batch holds n pairs as 2n rows, interleaved: row 2i is pair i's
chosen response, row 2i+1 its rejected one, each preceded by the same prompt.
"""

from __future__ import annotations

from megatron_simpo.data.collate import (PreferenceBatch, TokenizedPair, collate_microbatch,
                                         collate_packed, collate_pairs, padded_length)
from megatron_simpo.data.cache import prepare_in_memory
from megatron_simpo.data.config import DataConfig, DataError
from megatron_simpo.data.pair_table import length_statistics
from megatron_simpo.data.sampler import PairSampler, held_out_split
from megatron_simpo.data.sources import read_preference_rows
from megatron_simpo.data.tokenization import (TokenizedRow, encode_prompts, identical_pair_error,
                                              known_roles, load_tokenizer, tokenize_records,
                                              uses_chat_template)

__all__ = ["DataConfig", "DataError", "PairSampler", "PreferenceBatch", "TokenizedPair",
           "TokenizedRow", "collate_microbatch", "collate_packed", "collate_pairs",
           "encode_prompts", "held_out_split", "identical_pair_error", "known_roles",
           "length_statistics", "load_datasets", "load_tokenizer", "padded_length",
           "read_preference_rows", "tokenize_records", "uses_chat_template"]


def load_datasets(config: DataConfig, tokenizer, seed: int, dropped: list[str] | None = None,
                  cut: dict[str, int] | None = None
                  ) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(train pairs, validation pairs) as lists, through the cache's pipeline
    (``data_cache.prepare_in_memory``); the held-out split is seeded and disjoint. Rows left
    out as identical pairs are added to ``dropped``, truncations counted in ``cut``."""
    prepared = prepare_in_memory(config, tokenizer, seed)
    if dropped is not None:
        dropped.extend(prepared.dropped)
    if cut is not None:
        for name, count in prepared.cut.items():
            cut[name] += count
    return prepared.train, prepared.valid
