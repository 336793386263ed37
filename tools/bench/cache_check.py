"""Benchmark: what checking a data cache entry costs when it is opened (checksums, then every
token id against the vocabulary; megatron_simpo.data.integrity), against memory-mapping it.

The entry: ``--pairs`` pairs with SimPO's lengths (``data.synthetic.preference_lengths``) of
random int32 ids below ``--vocab``, written as ``build_entry`` writes one (``save_to_disk``,
then ``prepared.json`` with the checksums) without tokenizing anything; then each step is
timed ``--repeats`` times with a warm page cache (median).

  python -m tools.bench cache_check             # 100,000 pairs (about 415 MB of Arrow)
  python -m tools.bench cache_check --pairs 2000 --repeats 2   # a quick look
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.bench.common import command, write_report


@dataclass(frozen=True)
class CacheCheckOptions:
    pairs: int = 100_000
    """Pairs in the entry."""
    vocab: int = 32_000
    """Token ids are drawn below this (and checked against it)."""
    repeats: int = 5
    """Timings per step (the median is reported)."""
    workdir: str | None = None
    """Where the entry is written (kept); default a temporary folder, removed."""
    output: str | None = None
    """Also write the figures as JSON here."""


COMMAND = command("cache_check", __doc__, options=CacheCheckOptions)


def write_entry(folder: Path, num_pairs: int, vocab: int) -> None:
    """An entry of random pairs with SimPO's lengths, laid out as ``build_entry`` lays it out."""
    import datasets
    import numpy as np
    import pyarrow as pa

    from megatron_simpo.data import cache
    from megatron_simpo.data.integrity import PAIRS, SUMMARY, file_checksums
    from megatron_simpo.data.synthetic import preference_lengths

    lengths = np.array(preference_lengths(num_pairs, seed=0))
    rng = np.random.default_rng(0)
    columns = {"source": pa.array([f"synthetic:{i + 1}" for i in range(num_pairs)])}
    for index, name in enumerate(("prompt", "chosen", "rejected")):
        offsets = np.concatenate([[0], np.cumsum(lengths[:, index])]).astype(np.int32)
        values = rng.integers(0, vocab, int(offsets[-1]), dtype=np.int32)
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    for name, dtype in (("identical", bool), ("prompt_cut", bool), ("responses_cut", np.int8)):
        columns[name] = pa.array(np.zeros(num_pairs, dtype))
    features = cache._features()
    del features["error"]
    table = pa.table(columns).cast(features.arrow_schema)
    datasets.disable_progress_bars()
    datasets.Dataset(table).save_to_disk(str(folder / PAIRS), num_shards=1)
    (folder / SUMMARY).write_text(json.dumps({"key": {"synthetic": num_pairs},
                                              "files": file_checksums(folder / PAIRS)}))


def main(argv=None) -> None:
    import datasets

    from megatron_simpo.data.integrity import PAIRS, entry_problem, token_id_problem

    args = COMMAND.parse(argv)["options"]
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-cache-")
    folder = Path(args.workdir or scratch.name) / "pairs-synthetic"
    if not folder.exists():
        write_entry(folder, args.pairs, args.vocab)

    def median(step):
        times, result = [], None
        for _ in range(args.repeats):
            began = time.perf_counter()
            result = step()
            times.append(time.perf_counter() - began)
        return statistics.median(times), result

    checksums, problem = median(lambda: entry_problem(folder, {"synthetic": args.pairs}))
    assert problem is None, problem
    mapping, dataset = median(lambda: datasets.load_from_disk(str(folder / PAIRS)))
    token_ids, problem = median(lambda: token_id_problem(dataset.data.table, args.vocab))
    assert problem is None, problem
    megabytes = sum(p.stat().st_size for p in (folder / PAIRS).rglob("*") if p.is_file()) / 1e6
    report = {"pairs": args.pairs, "entry_mb": round(megabytes, 1),
              "checksums_s": round(checksums, 3), "load_from_disk_s": round(mapping, 3),
              "token_ids_s": round(token_ids, 3)}
    print(f"{args.pairs} pairs, {megabytes:.0f} MB of Arrow: checksums {checksums:.3f} s, "
          f"load_from_disk {mapping:.3f} s, token ids {token_ids:.3f} s (median of "
          f"{args.repeats})")
    write_report(args.output, report)
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
