"""Tokenized pairs in Arrow columns, read pair by pair without copying (``PairTable``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_simpo.data.collate import TokenizedPair


class _ListColumn:
    """An Arrow list<int32> column, chunked as written, read row by row as numpy views."""

    def __init__(self, column):
        chunks = [chunk for chunk in column.chunks if len(chunk)]
        self.values = [chunk.values.to_numpy(zero_copy_only=True) for chunk in chunks]
        self.offsets = [chunk.offsets.to_numpy(zero_copy_only=True) for chunk in chunks]
        self.starts = np.cumsum([0] + [len(chunk) for chunk in chunks])
        self.lengths = (np.concatenate([np.diff(o) for o in self.offsets]) if chunks
                        else np.zeros(0, dtype=np.int64))

    def __getitem__(self, row: int) -> np.ndarray:
        chunk = int(np.searchsorted(self.starts, row, side="right")) - 1
        local = row - self.starts[chunk]
        offsets = self.offsets[chunk]
        return self.values[chunk][offsets[local]:offsets[local + 1]]


class PairTable(Sequence):
    """Tokenized pairs held in Arrow columns (memory-mapped when loaded from the cache):
    ``table[i]`` is pair i as a TokenizedPair of int32 numpy views (no copy); ``subset`` is a
    view of some of the rows; lengths and flags are numpy arrays over the rows."""

    def __init__(self, table, rows: np.ndarray | None = None, *, keep_alive=None):
        self._table, self._keep_alive = table, keep_alive
        self._columns = {name: _ListColumn(table.column(name))
                         for name in ("prompt", "chosen", "rejected")}
        self._rows = np.arange(table.num_rows, dtype=np.int64) if rows is None else rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"PairTable indices are integers, not {type(index).__name__}")
        row = int(self._rows[index])
        return TokenizedPair(*(self._columns[name][row] for name in ("prompt", "chosen", "rejected")))

    def subset(self, positions) -> "PairTable":
        """The rows at these positions of this table (a view: nothing is copied)."""
        return PairTable(self._table, self._rows[np.asarray(positions, dtype=np.int64)],
                         keep_alive=self._keep_alive)

    def lengths(self, name: str) -> np.ndarray:
        """Token counts of the prompt, chosen or rejected column, per row."""
        return self._columns[name].lengths[self._rows]

    def flags(self, name: str) -> np.ndarray:
        """identical, prompt_cut or responses_cut, per row."""
        return self._table.column(name).to_numpy()[self._rows]

    def sources(self, positions) -> list[str]:
        column = self._table.column("source")
        return [column[int(self._rows[p])].as_py() for p in positions]



def length_statistics(pairs: Sequence[TokenizedPair]) -> str:
    """Token counts of a set of pairs (a list, or a PairTable, read from its length
    arrays): total, and prompt / response p50, p90, p99, max."""
    if hasattr(pairs, "lengths"):
        prompts = pairs.lengths("prompt")
        responses = np.concatenate([pairs.lengths("chosen"), pairs.lengths("rejected")])
    else:
        prompts = np.array([len(p.prompt) for p in pairs], dtype=np.int64)
        responses = np.array([len(r) for p in pairs for r in (p.chosen, p.rejected)],
                             dtype=np.int64)

    def percentiles(values: np.ndarray) -> str:
        ordered = np.sort(values)
        picks = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.9, 0.99)]
        return "/".join(str(int(v)) for v in picks + [ordered[-1]])

    total = int(2 * prompts.sum() + responses.sum())
    return (f"{total} tokens; prompt tokens p50/p90/p99/max {percentiles(prompts)}, response "
            f"tokens {percentiles(responses)}")

