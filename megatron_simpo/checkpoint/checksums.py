"""Checksums of a checkpoint's files: written with every save, checked before a load reads it.

PyTorch's distributed checkpoint files (``*.distcp``, ``.metadata``) carry no checksums, and
``torch.load`` does not check the CRCs of ``common.pt``'s archive: a changed byte loads as
another value, and a value that stays finite passes every later check. So each save records
the size and CRC-32 of every file Megatron-Core and PyTorch wrote (and of ``model_config.json``)
in ``checksums.json``, each rank digesting the files it wrote (PyTorch names them
``__<rank>_<n>.distcp``); a load first checks them, the files shared out over the ranks, and
refuses one that differs by name. Checkpoints written before this file existed are loaded
unchecked.

CRC-32 (zlib's, as zip archives use) detects corruption, not tampering; it runs at about
4.7 GB/s on one core of the development machine (SHA-256: 1.4 GB/s).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch.distributed as dist

from megatron_simpo.checkpoint.layout import CheckpointError
from megatron_simpo.distributed.runtime import first_over_world, max_over_world

MANIFEST_FILE = "checksums.json"
FORMAT = "megatron_simpo.checksums/1"
_SHARED_FILES = (".metadata", "common.pt", "metadata.json", "model_config.json")
"""Files rank 0 writes (PyTorch's metadata, Megatron-Core's common state and metadata, ours)."""
_BLOCK = 16 << 20


def file_crc(path: Path) -> int:
    """CRC-32 of a file's bytes, read 16 MiB at a time."""
    crc = 0
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                return crc
            crc = zlib.crc32(view[:count], crc)


def written_by(folder: Path, rank: int) -> list[Path]:
    """The files of a just-written checkpoint folder that ``rank`` wrote."""
    mine = sorted(folder.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        mine += [folder / name for name in _SHARED_FILES if (folder / name).is_file()]
    return mine


def digests(folder: Path, rank: int) -> dict[str, list[int]]:
    """name -> [size, CRC-32] of the files ``rank`` wrote into ``folder``."""
    return {path.name: [path.stat().st_size, file_crc(path)] for path in written_by(folder, rank)}


def write_manifest(folder: Path, entries: dict[str, list[int]]) -> None:
    """``checksums.json`` in ``folder`` (rank 0, before the folder is published)."""
    (folder / MANIFEST_FILE).write_text(json.dumps(
        {"format": FORMAT, "files": dict(sorted(entries.items()))}, indent=1) + "\n")


def read_manifest(checkpoint: Path) -> dict[str, list[int]] | None:
    """The recorded name -> [size, CRC-32], or None for a checkpoint saved without them; a
    manifest that cannot be read is named (ValueError)."""
    path = checkpoint / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest["format"] != FORMAT or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) for n in v)
                for v in files.values()):
            raise ValueError("not a list of [size, crc] per file")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{MANIFEST_FILE} (damaged: {error})") from None
    return files


def first_mismatch(checkpoint: Path, files: dict[str, list[int]], rank: int,
                   world_size: int) -> str | None:
    """What is wrong with the first of this rank's share of ``files`` (every world_size-th by
    name, from ``rank``) that is missing or differs from its record, or None."""
    for name in sorted(files)[rank::world_size]:
        path, (size, crc) = checkpoint / name, files[name]
        try:
            if not path.is_file():
                return f"{name} (missing)"
            if path.stat().st_size != size:
                return f"{name} ({path.stat().st_size} bytes, {size} when saved)"
            if file_crc(path) != crc:
                return f"{name} (its bytes changed since it was saved: CRC-32 differs)"
        except OSError as error:  # every rank must reach the verdict's collective
            return f"{name} (unreadable: {error.strerror or error})"
    return None


def check(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files differ from the checksums its save recorded (all ranks
    call it, each checking its share of the files), naming the first file that does, the same
    on every rank. Whether there is a manifest at all is agreed on first: a rank that cannot
    see or read it (another node's view of a shared file system) must not skip the checks'
    collectives the others enter."""
    try:
        files, problem = read_manifest(checkpoint), None
    except ValueError as error:
        files, problem = None, f"cannot read checkpoint {checkpoint}: {error}"
    found = max_over_world(2 if problem else int(files is not None))
    if found == 0:  # saved before checksums were recorded (on every rank's view)
        return
    if problem is None and files is None:
        problem = (f"cannot read checkpoint {checkpoint}: {MANIFEST_FILE} (missing here, "
                   "present on another rank's file system)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    bad = problem
    if bad is None and found == 1:
        mismatch = first_mismatch(checkpoint, files, rank, world)
        if mismatch is not None:
            bad = f"checkpoint {checkpoint}: {mismatch}; a damaged copy, refusing to load it"
    bad = first_over_world(bad)
    if bad is not None:
        raise CheckpointError(bad)
