"""Tokenize once: preference pairs prepared into a memory-mapped Arrow cache.

A source (a file, a ``save_to_disk`` folder or a Hub split) is read, templated, tokenized and
truncated once per setting by ``datasets.Dataset.map`` (batched, ``--dataset-num-proc``
processes, a progress bar) and saved with ``save_to_disk`` under ``--data-cache-dir``, in a folder
named by a hash of everything that changes the result: the source's content, split and column
mapping, the tokenizer's files and chat template (and whether it is applied), ``--seq-length``,
``--max-prompt-length`` and ``FORMAT`` below. Later runs, and every other rank, only memory-map it (``load_from_disk``): a
rank reads token ids straight from the page cache, which the ranks of a node share, and holds
no Python list of pairs (``PairTable``).

In a run of many ranks, global rank 0 builds a missing entry while the others wait; then the
first rank of every node whose cache (on local disk) still lacks it builds it there. A build
error is raised on every rank with the builder's message. Entries are written to a temporary
folder and renamed into place, so an interrupted build never leaves a half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_simpo.data import (DataConfig, DataError, TokenizedPair, held_out_split,
                                 identical_pair_error, read_preference_rows, tokenize_records)

FORMAT = "megatron_simpo.pairs/1"
"""Changes whenever tokenization (data.tokenize_records) or the cached layout changes."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "tokenizer.model", "spiece.model", "chat_template.jinja",
                    "chat_template.json")
_ROWS_PER_PROCESS = 10_000  # the default --dataset-num-proc: one process per this many rows


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/megatron_simpo/data`` (``~/.cache/megatron_simpo/data``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron_simpo" / "data"


# ---- identities ------------------------------------------------------------------------------

def _digest_files(root: Path, files: list[Path]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(source: str, kind: str, split: str, dataset_config: str | None) -> str:
    """The content of a source: its file's bytes, its save_to_disk folder's files (the split's
    own folder for a DatasetDict), or for a Hub dataset the fingerprint ``datasets`` gives the
    split it has cached."""
    path = Path(source)
    if kind in ("jsonl", "json", "parquet"):
        return _digest_files(path, [path])  # the bytes alone, not the name
    if kind == "arrow":
        folder = path / split if (path / "dataset_dict.json").is_file() and \
            (path / split).is_dir() else path
        return _digest_files(folder, [f for f in folder.rglob("*") if f.is_file()])
    from megatron_simpo.sources import _open

    dataset, _ = _open(source, kind, split, dataset_config)
    return dataset._fingerprint


def tokenizer_fingerprint(path: str | Path, tokenizer) -> str:
    """The tokenizer's files in its folder (not model weights beside them), its class and its
    chat template."""
    path = Path(path)
    files = [path / name for name in _TOKENIZER_FILES if (path / name).is_file()]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(_digest_files(path, files).encode())
    digest.update(type(tokenizer).__name__.encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes a source's tokenized pairs."""

    source: str
    kind: str
    split: str
    dataset_config: str | None
    columns: tuple[str, str, str]
    source_fingerprint: str
    tokenizer_fingerprint: str
    seq_length: int
    max_prompt_length: int
    apply_chat_template: bool = True
    format: str = FORMAT

    @property
    def digest(self) -> str:
        """Names the cache entry: everything, the source's name too (the cached rows name it in
        messages)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]

    @property
    def content_digest(self) -> str:
        """The pairs' identity: the same bytes under another name or path are the same data."""
        identity = {k: v for k, v in asdict(self).items() if k != "source"}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def where(self) -> str:
        return self.source if self.kind in ("jsonl", "json", "parquet") else \
            f"{self.source}[{self.split}]"


def cache_key(config: DataConfig, which: str, tokenizer_id: str) -> CacheKey:
    """The key of ``config``'s train or valid source."""
    from megatron_simpo.sources import SourceError, kind_of

    source = config.train_data_path if which == "train" else config.valid_data_path
    split = config.train_split if which == "train" else config.valid_split
    try:
        kind = kind_of(source)
        fingerprint = source_fingerprint(source, kind, split, config.dataset_config)
    except SourceError as error:
        raise DataError(str(error)) from None
    return CacheKey(source=source, kind=kind, split=split, dataset_config=config.dataset_config,
                    columns=(config.prompt_column, config.chosen_column, config.rejected_column),
                    source_fingerprint=fingerprint, tokenizer_fingerprint=tokenizer_id,
                    seq_length=config.seq_length, max_prompt_length=config.max_prompt_length,
                    apply_chat_template=config.apply_chat_template)


# ---- the cached pairs ------------------------------------------------------------------------

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


# ---- building an entry -----------------------------------------------------------------------

def _tokenize_batch(batch: dict, indices: list[int], *, tokenizer, config: DataConfig,
                    where: str, encoded: bool) -> dict:
    """datasets.map function: one batch of rows to token ids and flags. A bad row does not
    raise here (that would surface from a worker process as a traceback): its message goes to
    the ``error`` column, and the caller reports the first one."""
    n = len(indices)
    sources = batch["source"] if "source" in batch else [f"{where} row {i}" for i in indices]
    rows = [{"source": sources[k], **{name: json.loads(batch[name][k]) if encoded
                                      else batch[name][k]
                                      for name in ("prompt", "chosen", "rejected")}}
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
    """(datasets.Dataset of the source's rows with columns prompt/chosen/rejected (+ source),
    whether the values are JSON-encoded)."""
    import datasets

    from megatron_simpo.sources import ColumnMap, SourceError, open_dataset

    columns = ColumnMap(*key.columns)
    if key.kind == "jsonl":
        # Our own reader, for line numbers in errors; values JSON-encoded so that rows of mixed
        # shapes (a string here, messages there) make one Arrow column.
        rows = read_preference_rows(key.source, columns)
        return datasets.Dataset.from_dict(
            {"source": [row["source"] for row in rows],
             **{name: [json.dumps(row[name]) for row in rows]
                for name in ("prompt", "chosen", "rejected")}}), True
    try:
        dataset, _ = open_dataset(key.source, key.kind, split=key.split, columns=columns,
                                  dataset_config=key.dataset_config)
    except SourceError as error:
        raise DataError(str(error)) from None
    return dataset, False


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
    work = folder.parent / f".{folder.name}.building-{os.getpid()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        tokenized = dataset.map(
            _tokenize_batch, batched=True, with_indices=True, num_proc=num_proc if num_proc > 1
            else None, fn_kwargs=dict(tokenizer=tokenizer, config=config, where=key.where,
                                      encoded=encoded),
            remove_columns=dataset.column_names, features=_features(),
            cache_file_name=str(work / "map" / "tokenized.arrow"), load_from_cache_file=False,
            desc=f"Tokenizing {key.where}")
        errors = pc.not_equal(tokenized.data.table.column("error"), "")
        first = pc.index(errors, True).as_py()
        if first >= 0:
            raise DataError(tokenized[first]["error"])
        tokenized = tokenized.remove_columns("error")
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # the copy takes no time worth a bar
        try:
            tokenized.save_to_disk(str(work / "pairs"), num_shards=1)
        finally:
            if bars:
                datasets.enable_progress_bars()
        summary = {"key": asdict(key), "pairs": len(tokenized), "num_proc": num_proc,
                   "seconds": time.perf_counter() - began}
        (work / "prepared.json").write_text(json.dumps(summary, indent=1))
        del tokenized
        shutil.rmtree(work / "map", ignore_errors=True)
        try:
            os.replace(work, folder)
        except OSError:  # another node's builder won the race on a shared disk: theirs stays
            if not (folder / "prepared.json").is_file():
                raise
    except OSError as error:  # a full disk, a folder we may not write
        raise DataError(f"cannot write the data cache {folder.parent}: "
                        f"{error.strerror or error} (choose another with --data-cache-dir)") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def load_entry(folder: Path) -> PairTable:
    import datasets

    dataset = datasets.load_from_disk(str(folder / "pairs"))
    return PairTable(dataset.data.table, keep_alive=dataset)


# ---- the collective: build once per node, memory-map everywhere -------------------------------

def _world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from megatron_simpo.runtime import read_world

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


def _ensure(folder: Path, build, *, dist, rank: int, local_rank: int) -> bool:
    """Make sure ``folder`` holds the entry on every node; True when this run built it."""
    built = False

    def attempt():
        nonlocal built
        if (folder / "prepared.json").is_file():
            return None
        try:
            build()
            built = True
        except DataError as error:
            return str(error)
        return None

    _first_error_everywhere(dist, attempt() if rank == 0 else None, source_rank=0)
    # A node whose cache is not the one rank 0 wrote (local disk): its first rank builds there.
    _first_error_everywhere(dist, attempt() if rank != 0 and local_rank == 0 else None,
                            source_rank=None)
    return built


@dataclass
class PreparedData:
    """The run's tokenized pairs (memory-mapped) and what the user should hear about them."""

    train: PairTable
    valid: PairTable | list
    fingerprint: str
    """Identity of the training data as the run sees it (source content, tokenizer, lengths,
    held-out split): saved in checkpoints, checked on resume."""
    dropped: list[str] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=lambda: {"prompts": 0, "responses": 0})
    messages: list[str] = field(default_factory=list)


def prepare_data(config: DataConfig, tokenizer, tokenizer_path: str | Path, seed: int
                 ) -> PreparedData:
    """Tokenized train and held-out pairs from the cache (built if missing); call on every rank.

    The held-out split (``valid_fraction``), identical-pair dropping and cut counting happen
    here, on the cached rows, exactly as ``data.load_datasets`` does them on lists.
    """
    dist, rank, local_rank = _world()
    cache_dir = Path(config.data_cache_dir).expanduser() if config.data_cache_dir \
        else default_cache_dir()
    keys: list = [None]
    if rank == 0:
        try:
            tokenizer_id = tokenizer_fingerprint(tokenizer_path, tokenizer)
            keys = [[cache_key(config, which, tokenizer_id) for which in ("train", "valid")
                     if which == "train" or config.valid_data_path]]
        except DataError as error:
            keys = [str(error)]
    if dist is not None:
        dist.broadcast_object_list(keys, src=0)
    if isinstance(keys[0], str):
        raise DataError(keys[0])
    tables, messages = [], []
    for key in keys[0]:
        folder = cache_dir / f"pairs-{key.digest}"
        began = time.perf_counter()
        built = _ensure(folder, lambda: build_entry(key, folder, tokenizer, config,
                                                    config.dataset_num_proc),
                        dist=dist, rank=rank, local_rank=local_rank)
        tables.append(load_entry(folder))
        what = "tokenized" if built else "reusing tokenized"
        messages.append(f"> data: {what} {key.where} ({len(tables[-1])} rows) in {folder}"
                        + (f" ({time.perf_counter() - began:.1f} s)" if built else ""))
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
    identity = hashlib.sha256(json.dumps([[k.content_digest for k in keys[0]], held_out]).encode())
    return PreparedData(kept[0], kept[1], identity.hexdigest()[:16], dropped, cut, messages)
