"""Identities of the cached pairs: what a source, a tokenizer and the settings are.

A cache entry is named by a hash of everything that changes its pairs (``CacheKey``). Hashing a
large source takes seconds, so a file's content hash is remembered in ``HashMemo`` (a small
JSON beside the cache) under its path, size and modification time: a warm start reads the
memo; a file whose size or modification time changed is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_simpo.data.config import DataConfig, DataError
from megatron_simpo.data.sources import FILE_KINDS, SourceError, kind_of, open_source, where_of

FORMAT = "megatron_simpo.pairs/3"
"""Changes whenever tokenization (tokenization.tokenize_records) or the cached layout changes."""

MEMO_FILE = "source-hashes.json"
"""The content-hash memo's file in the cache folder."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "tekken.json", "tiktoken.model")
"""A tokenizer's files (with ``*.tiktoken``): ``checkpoint.tokenizer_asset``'s, which data/
cannot import (tests/test_data_cache.py holds the two lists equal)."""
TOKENIZER_FOLDERS = ("additional_chat_templates",)


def _hash_files(root: Path, files: list[Path]) -> str:
    """Content hash of ``files`` (their paths under ``root``, sizes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


class HashMemo:
    """Content hashes remembered by (path, size, mtime_ns) of every hashed file, in a JSON file
    (``None``: remember nothing). Written atomically by ``save``; a memo that cannot be read or
    written is only a slower start."""

    def __init__(self, path: Path | None):
        self.path, self.entries = path, {}
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def digest(self, root: Path, files: list[Path]) -> str:
        """``files``' content hash: from the memo while every file keeps its size and mtime."""
        stats = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(files)]
        name = str(Path(root).resolve())
        entry = self.entries.get(name)
        if isinstance(entry, dict) and entry.get("files") == stats:
            return entry["digest"]
        digest = _hash_files(root, files)
        self.entries[name] = {"files": stats, "digest": digest}
        return digest

    def save(self) -> None:
        """Write the memo (entries of paths that no longer exist are forgotten)."""
        if self.path is None:
            return
        kept = {name: entry for name, entry in self.entries.items() if os.path.exists(name)}
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            partial.write_text(json.dumps(kept, indent=0))
            os.replace(partial, self.path)
        except OSError:
            partial.unlink(missing_ok=True)


def source_fingerprint(source: str, kind: str, split: str, dataset_config: str | None,
                       memo: HashMemo | None = None) -> str:
    """The content of a source: its file's bytes, its save_to_disk folder's files (the split's
    own folder for a DatasetDict), or for a Hub dataset the fingerprint ``datasets`` gives the
    split it has cached."""
    memo, path = memo or HashMemo(None), Path(source)
    if kind in FILE_KINDS:
        return memo.digest(path, [path])  # the bytes alone, not the name
    if kind == "arrow":
        folder = path / split if (path / "dataset_dict.json").is_file() and \
            (path / split).is_dir() else path
        return memo.digest(folder, [f for f in folder.rglob("*") if f.is_file()])
    dataset, _ = open_source(source, kind, split, dataset_config)
    return dataset._fingerprint


def tokenizer_fingerprint(path: str | Path, tokenizer, memo: HashMemo | None = None) -> str:
    """The tokenizer's files in its folder (those a checkpoint carries,
    ``checkpoint.tokenizer_asset``, less the model's config: not model weights), its named chat
    templates' files, its class and its chat template. A folder without the entries added on
    2026-11-29 (tekken.json, tiktoken.model, additional_chat_templates/) hashes as before."""
    memo, path = memo or HashMemo(None), Path(path)
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    files += sorted(f for f in path.glob("*.tiktoken") if f.is_file())  # tiktoken vocabularies
    for folder in (path / name for name in TOKENIZER_FOLDERS if (path / name).is_dir()):
        files += sorted(f for f in folder.rglob("*") if f.is_file())
    digest = hashlib.blake2b(digest_size=16)
    digest.update(memo.digest(path, files).encode())
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
    def where(self) -> str:
        return where_of(self.source, self.kind, self.split)


def cache_key(config: DataConfig, which: str, tokenizer_id: str,
              memo: HashMemo | None = None) -> CacheKey:
    """The key of ``config``'s train or valid source (its content hash through ``memo``)."""
    source = config.train_data_path if which == "train" else config.valid_data_path
    split = config.train_split if which == "train" else config.valid_split
    try:
        kind = kind_of(source)
        fingerprint = source_fingerprint(source, kind, split, config.dataset_config, memo)
    except SourceError as error:
        raise DataError(str(error)) from None
    return CacheKey(source=source, kind=kind, split=split, dataset_config=config.dataset_config,
                    columns=(config.prompt_column, config.chosen_column, config.rejected_column),
                    source_fingerprint=fingerprint, tokenizer_fingerprint=tokenizer_id,
                    seq_length=config.seq_length, max_prompt_length=config.max_prompt_length,
                    apply_chat_template=config.apply_chat_template)

