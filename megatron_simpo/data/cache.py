"""Tokenize once: preference pairs prepared into a memory-mapped Arrow cache.

A source (a file, a ``save_to_disk`` folder or a Hub split) is read, templated, tokenized and
truncated once per setting by ``datasets.Dataset.map`` (batched, ``--dataset-num-proc``
processes, a progress bar) and saved with ``save_to_disk`` under ``--data-cache-dir``, in a folder
named by a hash of everything that changes the result: the source's content, split and column
mapping, the tokenizer's files and chat template (and whether it is applied), ``--seq-length``,
``--max-prompt-length`` and ``fingerprints.FORMAT`` (``fingerprints.CacheKey``). Later runs,
and every other rank, only memory-map it (``load_from_disk``): a rank reads token ids straight from the page cache, which the ranks of a node share, and holds
no Python list of pairs (``PairTable``).

In a run of many ranks, global rank 0 builds a missing entry while the others wait; then the
first rank of every node whose cache (on local disk) still lacks it builds it there. A build
error is raised on every rank with the builder's message. Entries are written to a build
folder and renamed into place; every rank checks an entry before it reads it (checksums, token
ids: ``integrity``), and a builder rebuilds one that is damaged, half-built or stale.

Rank 0 names the entries; the source's content hash is remembered in ``fingerprints.MEMO_FILE``
beside the entries by path, size and mtime, so a warm start does not read the source again.

This is the only pipeline: ``prepare_in_memory`` (``data.load_datasets``) builds the same entries
in a temporary folder and returns the pairs as lists. The held-out split, the dropping of
identical pairs and the counting of cuts happen once, in ``_select``, on the cached rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from megatron_simpo.data.collate import TokenizedPair
from megatron_simpo.data.config import DataConfig, DataError
from megatron_simpo.data.fingerprints import (MEMO_FILE, CacheKey, HashMemo, cache_key,
                                              tokenizer_fingerprint)
from megatron_simpo.data.integrity import (ABSENT, PAIRS, SUMMARY, builder_guard,
                                           building_folder, discard_entry, entry_problem,
                                           file_checksums, recorded_tokens_digest,
                                           sweep_dead_builds, token_id_problem, tokens_digest)
from megatron_simpo.data.pair_table import PairTable
from megatron_simpo.data.sampler import held_out_split
from megatron_simpo.data.sources import (TEMPLATE_COLUMNS, ColumnMap, SourceError,
                                         column_value, row_source, rows_dataset)
from megatron_simpo.data.tokenization import (check_tokenizer, identical_pair_error,
                                              tokenize_records)

_ROWS_PER_PROCESS = 10_000  # the default --dataset-num-proc: one process per this many rows


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/megatron_simpo/data`` (``~/.cache/megatron_simpo/data``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron_simpo" / "data"



# ---- building an entry -----------------------------------------------------------------------

def _tokenize_batch(batch: dict, indices: list[int], *, tokenizer, config: DataConfig,
                    where: str, encoded: bool) -> dict:
    """datasets.map function: one batch of rows to token ids and flags. A bad row does not
    raise here (that would surface from a worker process as a traceback): its message goes to
    the ``error`` column, and the caller reports the first one."""
    n = len(indices)
    sources = batch["source"] if "source" in batch else [row_source(where, i) for i in indices]
    names = [name for name in ("prompt", "chosen", "rejected") + TEMPLATE_COLUMNS
             if name in batch]
    rows = [{"source": sources[k], **{name: column_value(name, batch[name][k], encoded)
                                      for name in names}}
            for k in range(n)]
    try:
        records = tokenize_records(rows, tokenizer, config)
    except DataError as error:
        return {"source": sources, "prompt": [[]] * n, "chosen": [[]] * n, "rejected": [[]] * n,
                "identical": [False] * n, "prompt_cut": [False] * n, "responses_cut": [0] * n,
                "error": [str(error)] + [""] * (n - 1)}
    return {"source": sources,
            "prompt": [list(r.pair.prompt) for r in records],
            "chosen": [list(r.pair.chosen) for r in records],
            "rejected": [list(r.pair.rejected) for r in records],
            "identical": [r.identical for r in records],
            "prompt_cut": [r.prompt_cut for r in records],
            "responses_cut": [r.responses_cut for r in records],
            "error": [""] * n}


def _features():
    import datasets

    ids = datasets.List(datasets.Value("int32")) if hasattr(datasets, "List") else \
        datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"source": datasets.Value("string"), "prompt": ids, "chosen": ids,
                              "rejected": ids, "identical": datasets.Value("bool"),
                              "prompt_cut": datasets.Value("bool"),
                              "responses_cut": datasets.Value("int8"),
                              "error": datasets.Value("string")})


def _rows_dataset(key: CacheKey):
    """(datasets.Dataset of the source's rows, whether the values are JSON-encoded):
    ``sources.rows_dataset``, its SourceError as DataError."""
    try:
        return rows_dataset(key.source, key.kind, split=key.split, columns=ColumnMap(*key.columns),
                            dataset_config=key.dataset_config)
    except SourceError as error:
        raise DataError(str(error)) from None


def build_entry(key: CacheKey, folder: Path, tokenizer, config: DataConfig,
                num_proc: int | None) -> dict:
    """Tokenize the source of ``key`` into ``folder`` (atomically); returns its summary."""
    import datasets
    import pyarrow.compute as pc

    began = time.perf_counter()
    dataset, encoded = _rows_dataset(key)
    if num_proc is None:
        num_proc = max(1, min(os.cpu_count() or 1, len(dataset) // _ROWS_PER_PROCESS))
    num_proc = min(num_proc, len(dataset))
    work = building_folder(folder)
    try:
        with builder_guard(key.where):  # SIGTERM: one line, then the finally below
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)  # named by host and pid for as long as the build runs
            tokenized = _tokenize(dataset, work, key, tokenizer, config, num_proc, encoded)
            errors = pc.not_equal(tokenized.data.table.column("error"), "")
            first = pc.index(errors, True).as_py()
            if first >= 0:
                raise DataError(tokenized[first]["error"])
            tokenized = tokenized.remove_columns("error")
            bars = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()  # the copy takes no time worth a bar
            try:
                tokenized.save_to_disk(str(work / PAIRS), num_shards=1)
            finally:
                if bars:
                    datasets.enable_progress_bars()
            summary = {"key": asdict(key), "pairs": len(tokenized), "num_proc": num_proc,
                       "seconds": time.perf_counter() - began,
                       "tokens": tokens_digest(tokenized.data.table),
                       "files": file_checksums(work / PAIRS)}
            (work / SUMMARY).write_text(json.dumps(summary, indent=1))
            del tokenized
            shutil.rmtree(work / "map", ignore_errors=True)
            try:
                os.replace(work, folder)
            except OSError:  # another node's builder won the race on a shared disk: theirs stays
                if not (folder / SUMMARY).is_file():
                    raise
    except OSError as error:  # a full disk, a folder we may not write
        raise DataError(f"cannot write the data cache {folder.parent}: "
                        f"{error.strerror or error} (choose another with --data-cache-dir)") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _tokenize(dataset, work: Path, key: CacheKey, tokenizer, config: DataConfig, num_proc: int,
              encoded: bool):
    """datasets.map of ``_tokenize_batch`` over the source's rows, into ``work``/map."""
    return dataset.map(
        _tokenize_batch, batched=True, with_indices=True, num_proc=num_proc if num_proc > 1
        else None, fn_kwargs=dict(tokenizer=tokenizer, config=config, where=key.where,
                                  encoded=encoded),
        remove_columns=dataset.column_names, features=_features(),
        cache_file_name=str(work / "map" / "tokenized.arrow"), load_from_cache_file=False,
        desc=f"Tokenizing {key.where}")


def load_entry(folder: Path, vocab_size: int) -> PairTable:
    """The entry's pairs, memory-mapped, every token id checked against ``vocab_size`` (call
    after ``entry_problem`` found its files as built); DataError naming the entry otherwise."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder / PAIRS))
    except Exception as error:  # checksums passed: a bug of ours or of datasets, named anyway
        first = (str(error).splitlines() or [""])[0]
        raise DataError(f"the data cache entry {folder} cannot be read ({type(error).__name__}: "
                        f"{first}); --rebuild-data-cache tokenizes it again") from None
    problem = token_id_problem(dataset.data.table, vocab_size)
    if problem:
        raise DataError(f"the data cache entry {folder} holds {problem}; --rebuild-data-cache "
                        "tokenizes it again (with the run's tokenizer, --tokenizer)")
    return PairTable(dataset.data.table, keep_alive=dataset)


# ---- the collective: build once per node, memory-map everywhere -------------------------------

def _world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from megatron_simpo.distributed.runtime import read_world

        return dist, dist.get_rank(), read_world()[2]
    return None, 0, 0


def _first_error_everywhere(dist, message: str | None, *, source_rank: int | None) -> None:
    """Raise DataError on every rank if a builder failed: from ``source_rank``, or the first
    failure of any rank (``source_rank=None``)."""
    if dist is None:
        found = [message]
    elif source_rank is not None:
        found = [message]
        dist.broadcast_object_list(found, src=source_rank)
    else:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, message)
    for error in found:
        if error:
            raise DataError(error)


def _ensure(folder: Path, key: CacheKey, build, *, dist, rank: int, local_rank: int,
            rebuild: bool, messages: list[str]) -> tuple[bool, bool]:
    """Make sure ``folder`` holds a sound entry on every node: rank 0, then the first rank of
    every node whose cache (local disk) lacks it, check the entry (``entry_problem``) and build
    it when absent, damaged, half-built or stale (saying so in ``messages``), or, for rank 0,
    when ``rebuild``. (built by this run, checked by this rank)."""
    built = checked = False

    def attempt(force: bool):
        nonlocal built, checked
        problem = entry_problem(folder, asdict(key))
        if problem is None and not force:
            checked = True
            return None
        try:
            messages.extend(sweep_dead_builds(folder.parent))
            if problem is None:
                messages.append(f"> data: --rebuild-data-cache: tokenizing {key.where} again")
            elif problem != ABSENT:
                messages.append(f"> data: the data cache entry {folder} is damaged ({problem}); "
                                f"tokenizing {key.where} again")
            if problem != ABSENT:
                discard_entry(folder, problem or "--rebuild-data-cache")
            build()
            built = checked = True
        except DataError as error:
            return str(error)
        return None

    _first_error_everywhere(dist, attempt(rebuild) if rank == 0 else None, source_rank=0)
    # A node whose cache is not the one rank 0 wrote (local disk): its first rank builds there.
    _first_error_everywhere(dist, attempt(False) if rank != 0 and local_rank == 0 else None,
                            source_rank=None)
    return built, checked


def _open(folder: Path, key: CacheKey, checked: bool, vocab_size: int) -> PairTable | str:
    """The entry's pairs on this rank, or why not: a rank that did not check the entry while
    ensuring it checks it now, and cannot rebuild it (others are reading it)."""
    problem = None if checked else entry_problem(folder, asdict(key))
    if problem is not None:
        return (f"the data cache entry {folder} changed after its builder checked it: {problem}; "
                "rerun (--rebuild-data-cache tokenizes it again)")
    try:
        return load_entry(folder, vocab_size)
    except DataError as error:
        return str(error)


@dataclass
class PreparedData:
    """The run's tokenized pairs (memory-mapped) and what the user should hear about them."""

    train: PairTable
    valid: PairTable | list
    fingerprint: str
    """Identity of the training data as the run sees it (its pairs' token ids and the held-out
    split; not the source's name or this version's cache format): saved in checkpoints,
    checked on resume."""
    dropped: list[str] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=lambda: {"prompts": 0, "responses": 0})
    messages: list[str] = field(default_factory=list)



def _keys(config: DataConfig, tokenizer_id: str, memo: HashMemo | None = None) -> list[CacheKey]:
    """The keys of the training source and, when given, the validation source."""
    return [cache_key(config, which, tokenizer_id, memo) for which in ("train", "valid")
            if which == "train" or config.valid_data_path]


def _select(tables: list[PairTable], digests: list[str], config: DataConfig, seed: int,
            messages: list[str]) -> PreparedData:
    """The one rule for what the run trains and evaluates on: the seeded held-out split
    (``valid_fraction``, without a validation source), then every pair whose two responses are
    the same tokens dropped (or refused, ``identical_pairs``), the cuts counted. The run's
    data fingerprint is that of the tables' tokens (``digests``) and of the split."""
    train, valid = tables[0], (tables[1] if len(tables) > 1 else None)
    held_out = "valid-path"
    if valid is None and config.valid_fraction > 0:
        held, kept = held_out_split(len(train), config.valid_fraction, seed)
        valid, train = train.subset(held), train.subset(kept)
        held_out = f"fraction {config.valid_fraction} seed {seed}"
    cut = {"prompts": 0, "responses": 0}
    dropped: list[str] = []
    kept = []
    for table in (train, valid):
        if table is None:
            kept.append([])
            continue
        cut["prompts"] += int(table.flags("prompt_cut").sum())
        cut["responses"] += int(table.flags("responses_cut").sum())
        identical = np.flatnonzero(table.flags("identical"))
        if len(identical) and config.identical_pairs == "refuse":
            raise identical_pair_error(table.sources(identical[:1])[0], config)
        dropped += table.sources(identical)
        kept.append(table.subset(np.flatnonzero(~table.flags("identical"))))
    identity = hashlib.sha256(json.dumps([digests, held_out]).encode())
    return PreparedData(kept[0], kept[1], identity.hexdigest()[:16], dropped, cut, messages)


def prepare_data(config: DataConfig, tokenizer, tokenizer_path: str | Path, seed: int,
                 vocab_size: int | None = None) -> PreparedData:
    """Tokenized train and held-out pairs from the cache (built if missing); call on every rank.

    Rank 0 computes the keys (content hashes remembered in the cache's ``MEMO_FILE``), the
    entries are ensured on every node, checked (checksums, token ids below ``vocab_size``, the
    model's vocabulary, default the tokenizer's size) and opened on every rank, then ``_select``
    applies the split and drop rules.
    """
    messages = check_tokenizer(tokenizer, tokenizer_path, config, vocab_size)
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    dist, rank, local_rank = _world()
    cache_dir = Path(config.data_cache_dir).expanduser() if config.data_cache_dir \
        else default_cache_dir()
    keys: list = [None]
    memo = HashMemo(cache_dir / MEMO_FILE) if rank == 0 else None
    if rank == 0:
        try:
            keys = [_keys(config, tokenizer_fingerprint(tokenizer_path, tokenizer, memo), memo)]
        except DataError as error:
            keys = [str(error)]
    if dist is not None:
        dist.broadcast_object_list(keys, src=0)
    if isinstance(keys[0], str):
        raise DataError(keys[0])
    tables, digests = [], []
    for key in keys[0]:
        folder = cache_dir / f"pairs-{key.digest}"
        began = time.perf_counter()
        built, checked = _ensure(folder, key, lambda: build_entry(key, folder, tokenizer, config,
                                                                  config.dataset_num_proc),
                                 dist=dist, rank=rank, local_rank=local_rank,
                                 rebuild=config.rebuild_data_cache, messages=messages)
        opened = _open(folder, key, checked, vocab_size)
        _first_error_everywhere(dist, opened if isinstance(opened, str) else None,
                                source_rank=None)
        tables.append(opened)
        digests.append(recorded_tokens_digest(folder))
        what = "tokenized" if built else "reusing tokenized"
        messages.append(f"> data: {what} {key.where} ({len(tables[-1])} rows) in {folder}"
                        + (f" ({time.perf_counter() - began:.1f} s)" if built else ""))
    if memo is not None:  # once the entries exist: a failed build leaves the folder empty
        memo.save()
    return _select(tables, digests, config, seed, messages)


def _as_lists(pairs) -> list[TokenizedPair]:
    return [TokenizedPair(*(part.tolist() for part in (p.prompt, p.chosen, p.rejected)))
            for p in pairs]


def prepare_in_memory(config: DataConfig, tokenizer, seed: int) -> PreparedData:
    """``prepare_data`` on this process alone, into a temporary folder that is removed: the
    pairs come back as lists of token-id lists (nothing memory-mapped stays behind)."""
    with tempfile.TemporaryDirectory(prefix="megatron-simpo-pairs-") as scratch:
        tables = []
        keys = _keys(config, "in-memory")
        for key in keys:
            folder = Path(scratch) / f"pairs-{key.digest}"
            if not (folder / SUMMARY).is_file():  # valid may be train's own split
                build_entry(key, folder, tokenizer, config, config.dataset_num_proc)
            tables.append(load_entry(folder, len(tokenizer)))
        prepared = _select(tables, [recorded_tokens_digest(Path(scratch) / f"pairs-{k.digest}")
                                    for k in keys], config, seed, [])
        return replace(prepared, train=_as_lists(prepared.train),
                       valid=_as_lists(prepared.valid))
