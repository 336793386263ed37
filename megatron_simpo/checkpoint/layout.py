"""The checkpoint folder: Megatron-LM's layout, the tracker file, what a saved iteration
holds besides its shards, and the readers that need no model (see ``checkpointing``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megatron_simpo.distributed.files import first_line, write_text_atomically
from megatron_simpo.model.architecture import ModelConfig


TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_FILE = "model_config.json"
# Distributed-optimizer state in canonical per-parameter form, which reshards over TP, PP and DP
# (Megatron-LM's choice too). The type is recorded in the checkpoint and reused when loading.
OPTIMIZER_SHARDING_TYPE = "fully_reshardable"


def optimizer_metadata(sharding_type: str) -> dict:
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message names the folder (and the shard or
    the operating system's reason)."""


@dataclass(frozen=True)
class TrainState:
    """Where training stands: what a resume needs besides weights and optimizer state."""

    iteration: int
    consumed_samples: int
    data_fingerprint: str | None = None
    """Identity of the training data the run read (data_cache.PreparedData.fingerprint); None
    in checkpoints written before it was recorded."""
    settings: dict | None = None
    """The run settings a resume is checked against (``training.resume.settings_record``);
    None in checkpoints written before they were recorded."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def find_checkpoint(path: str | Path, flag: str = "--load") -> Path:
    """The iteration folder a path names: a save root (its latest iteration) or an iter_ folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: does not exist")
    if path.is_file():
        what = (f"is the tracker file: give its folder, {flag} {path.parent}"
                if path.name == TRACKER_FILE else
                "is a file, not a checkpoint folder (a save folder or an iter_NNNNNNN folder)")
        raise FileNotFoundError(f"{flag} {path}: {what}")
    if (path / MODEL_CONFIG_FILE).is_file() and (path / "metadata.json").is_file():
        return path
    tracker = path / TRACKER_FILE
    left = saved_iterations(path)
    hint = (("the latest complete iterations there are "
             if len(left) > 1 else "the complete iteration there is ")
            + f"{', '.join(map(str, left[-5:]))}: give {flag} "
            f"{iteration_dir(path, left[-1]) if left else ''}, or write the one to resume from "
            f"into {tracker}")
    if not tracker.is_file():
        raise FileNotFoundError(f"{flag} {path}: no checkpoint there (no {TRACKER_FILE} and not "
                                f"an iter_NNNNNNN folder)" + (f"; {hint}" if left else ""))
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{flag} {path}: {TRACKER_FILE} holds {text!r}, not an iteration "
                         "number" + (f"; {hint}" if left else ""))
    folder = iteration_dir(path, int(text))
    if not (folder / "metadata.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: {TRACKER_FILE} names iteration {text} but "
                                f"{folder} is missing or incomplete; " + (
                                    hint if left else "no complete iteration is left there (to "
                                    f"start from the beginning, drop {flag}; where it is also "
                                    f"--save, removing {TRACKER_FILE} does the same)"))
    return folder


def saved_iterations(root: str | Path) -> list[int]:
    """The complete iterations saved under a save folder, in order."""
    root = Path(root)
    found = []
    for folder in root.glob("iter_*"):
        number = folder.name.removeprefix("iter_")
        if number.isdigit() and (folder / "metadata.json").is_file():
            found.append(int(number))
    return sorted(found)


def read_common_state(checkpoint: Path) -> dict:
    """A checkpoint's common (not sharded) state: its ``common.pt`` up to megatron-core 0.16, an
    object inside its shards from 0.19. A file that cannot be read is a :class:`CheckpointError`
    naming it (:func:`shard_reason`)."""
    from megatron.core import dist_checkpointing

    bad = _damaged_common(Path(checkpoint))
    if bad is not None:  # torch.load does not check the archive's CRCs: a flipped byte loads
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: common.pt (damaged: {bad})")
    try:
        return dist_checkpointing.load_common_state_dict(str(checkpoint))
    except BaseException as error:  # torch's CheckpointException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: "
                              f"{shard_reason(checkpoint, error)}") from error


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """A checkpoint's identity without reading all of it: its model config, the dist
    checkpoint's metadata, and every shard file's name, size, first and last MiB."""
    digest = hashlib.sha256()
    checkpoint = Path(checkpoint)
    files = sorted(p for p in checkpoint.iterdir()
                   if p.is_file() and (p.suffix == ".distcp" or p.name in (
                       "model_config.json", ".metadata", "common.pt", "metadata.json")))
    mib = 1 << 20
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(mib))
            if size > 2 * mib:
                handle.seek(size - mib)
                digest.update(handle.read(mib))
    return digest.hexdigest()


def read_train_state(checkpoint: Path) -> TrainState | None:
    """Where a full checkpoint stands, read without its shards (None for weights only)."""
    saved = read_common_state(checkpoint).get("train_state")
    return None if saved is None else train_state_from(saved)


def train_state_from(saved: dict) -> TrainState:
    """The TrainState of a checkpoint's saved "train_state" entry."""
    return TrainState(int(saved["iteration"]), int(saved["consumed_samples"]),
                      saved.get("data_fingerprint"), saved.get("run_settings"))


def read_train_iteration(checkpoint: Path) -> int | None:
    """The iteration a full checkpoint was saved at (None for weights only)."""
    state = read_train_state(checkpoint)
    return None if state is None else state.iteration


def remove_iterations_after(root: str | Path, iteration: int, *, track: bool = False) -> None:
    """What ``--overwrite`` replaces: the iterations after ``iteration`` (all of a fresh run's,
    with its tracker; the metrics file is the loop's to trim), and unfinished saves. Rank 0
    only. The tracker is settled first, so an interruption leaves it naming an iteration that
    is there, or absent. ``track``: it names ``iteration`` in any case (a converter's
    ``--force``: iteration 0 is its checkpoint)."""
    root = Path(root)
    if track or (iteration and (root / TRACKER_FILE).is_file()):
        write_tracker(root, iteration)
    elif iteration == 0:
        (root / TRACKER_FILE).unlink(missing_ok=True)
    for number in saved_iterations(root):
        if number > iteration:
            shutil.rmtree(iteration_dir(root, number))
    remove_interrupted_saves(root)


def remove_interrupted_saves(root: str | Path) -> list[Path]:
    """Remove the ``iter_NNNNNNN.partial`` folders of saves that never finished (a run ended
    mid-save: a second stop signal, a SIGKILL); returns them. Rank 0 only, before this run's
    first save."""
    removed = sorted(path for path in Path(root).glob("iter_*.partial")
                     if re.fullmatch(r"iter_\d{7}\.partial", path.name)
                     and path.is_dir() and not path.is_symlink())  # folders a save makes
    for partial in removed:
        shutil.rmtree(partial)
    return removed


def write_tracker(root: Path, iteration: int) -> None:
    write_text_atomically(root / TRACKER_FILE, f"{iteration}\n", suffix=".tmp")


def os_reason(error: BaseException) -> str:
    """The operating system's reason behind a failed write, found in the exception chain (and
    in the per-rank failures PyTorch's distributed checkpoint collects: ``CheckpointException.
    failures`` maps rank -> ``(exception, traceback summary)``), else its first line."""
    chain = _chain(error)
    for current in chain:
        if isinstance(current, OSError) and current.strerror:
            return current.strerror + (f": {current.filename}" if current.filename else "")
    for current in chain:  # an OSError that reached us as text: "[Errno 122] Disk quota ..."
        spelled = _ERRNO_TEXT.search(str(current))
        if spelled:
            return spelled["reason"] + (f": {spelled['file']}" if spelled["file"] else "")
    return first_line(error)


_ERRNO_TEXT = re.compile(r"\[Errno \d+\] (?P<reason>[^:'\]\n]+?)(?:: '(?P<file>[^']+)')?(?=$|['\]\n,)])",
                         re.MULTILINE)
"""An OSError as str() spells it, inside another exception's message (megatron-core's writer
workers pass theirs on as ``RuntimeError(f"Worker failure: {error}")``, and PyTorch's gather of
the ranks' failures keeps the text, not the cause)."""


def check_writable_folder(folder: str | Path, flag: str, given: str | Path | None = None
                          ) -> None:
    """Refuse, before any work, an output folder that cannot be written: ``ValueError`` (one
    line naming ``flag`` and ``given``, the value it was given: by default the folder) when it
    is a file, or when making it (with its parents) or a probe file in it fails (read-only
    filesystem, permissions). The folder is left made."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        if given is None:
            raise ValueError(f"{flag} {folder} is a file, not a folder")
        raise ValueError(f"{flag} {given} cannot be written ({folder} is a file, not a folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or os_reason(error)
        raise ValueError(f"{flag} {given or folder} cannot be written ({reason})") from None


FULL_DISK_BYTES = 1 << 20
"""Free space below which a failed write is blamed on a full filesystem."""


def write_failure_reason(error: BaseException, folder: Path) -> str:
    """Why writing into ``folder`` failed: the operating system's reason (:func:`os_reason`), or,
    where PyTorch's writer lost it (a full disk surfaces as ``[enforce fail at
    inline_container.cc] unexpected pos``), a full filesystem when under
    :data:`FULL_DISK_BYTES` are left there."""
    reason = os_reason(error)
    if any(isinstance(e, OSError) and e.strerror for e in _chain(error)):
        return reason
    try:
        stat = os.statvfs(folder if folder.exists() else folder.parent)
    except OSError:
        return reason
    free = stat.f_bavail * stat.f_frsize
    if free < FULL_DISK_BYTES:
        return f"No space left on device ({free} bytes free on its filesystem; {reason})"
    return reason


def _chain(error: BaseException) -> list:
    seen, pending, found = set(), [error], []
    while pending:
        current = pending.pop()
        if isinstance(current, tuple):
            pending += list(current)
        elif isinstance(current, BaseException) and id(current) not in seen:
            seen.add(id(current))
            found.append(current)
            failures = getattr(current, "failures", None)
            pending += [current.__cause__, current.__context__, getattr(current, "exception", None),
                        getattr(current, "exc", None),
                        *(failures.values() if isinstance(failures, dict) else ())]
    return found


def damaged_shards(checkpoint: Path) -> list[str]:
    """Shard files shorter than the checkpoint's index says they are, or missing."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(checkpoint)).read_metadata().storage_data
    except BaseException:  # no readable index either: nothing more to say
        return []
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    damaged = []
    for name, size in sorted(needed.items()):
        path = checkpoint / name
        if not path.is_file():
            damaged.append(f"{name} (missing)")
        elif path.stat().st_size < size:
            damaged.append(f"{name} ({path.stat().st_size} of {size} bytes: truncated)")
    return damaged


def damaged_archive(path: Path) -> str | None:
    """What is wrong with a ``torch.save`` file (a zip archive: each member's CRC checked, which
    ``torch.load`` does not do: a changed byte loads as another value), or None if sound."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return str(error)
    return None if bad is None else f"{bad} fails its checksum"


def _damaged_common(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's ``common.pt``, or None if it is sound or absent."""
    common = checkpoint / "common.pt"
    return damaged_archive(common) if common.is_file() else None


def damaged_files(checkpoint: Path) -> list[str]:
    """Megatron-Core's own files of a checkpoint that are missing or cannot be read:
    ``metadata.json``, and ``common.pt`` where the installed megatron-core needs it (up to 0.16;
    from 0.19 a checkpoint without it keeps its common state in the shards)."""
    from megatron.core.dist_checkpointing import serialization

    found = []
    metadata = checkpoint / "metadata.json"
    try:
        json.loads(metadata.read_text())
    except FileNotFoundError:
        found.append("metadata.json (missing)")
    except (OSError, ValueError) as error:
        found.append(f"metadata.json (damaged: {error})")
    common = checkpoint / "common.pt"
    if common.is_file():
        bad = _damaged_common(checkpoint)
        if bad is not None:
            found.append(f"common.pt (damaged: {bad})")
    elif not hasattr(serialization, "_legacy_common_state_exists"):
        from megatron.core import __version__

        found.append(f"common.pt (missing: megatron-core 0.19 and later keep it in the shards, "
                     f"and this is {__version__})")
    return found


def shard_reason(checkpoint: Path, error: BaseException) -> str:
    """Which file of a checkpoint failed to load and why, as far as can be told."""
    damaged, shards = damaged_files(checkpoint), damaged_shards(checkpoint)
    if shards:
        damaged.append(f"shard {', '.join(shards)}")
    if damaged:
        return ", ".join(damaged)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if len(last) > REASON_LENGTH:  # e.g. a missing key listed with every key there is
        last = f"{last[:REASON_LENGTH]} ... ({len(last) - REASON_LENGTH} more characters)"
    return f"{type(error).__name__}{': ' + last if last else ''}"


REASON_LENGTH = 300
"""The characters of a loader's own message that an error line keeps."""


def read_model_config(checkpoint: Path) -> ModelConfig:
    """The architecture a checkpoint was saved with; a missing or damaged file is a
    :class:`CheckpointError` naming it."""
    try:
        return ModelConfig.load(checkpoint / MODEL_CONFIG_FILE)
    except (FileNotFoundError, json.JSONDecodeError, ValueError, TypeError,
            AttributeError) as error:  # missing, not JSON, or not a model config's fields
        reason = "missing" if isinstance(error, FileNotFoundError) else f"damaged: {error}"
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: {MODEL_CONFIG_FILE} "
                              f"({reason})") from None


def check_model_config(checkpoint: Path, expected: ModelConfig) -> None:
    """Refuse a checkpoint of another architecture, naming the fields that differ."""
    differ = [f"{k}: checkpoint {saved!r} vs model {wanted!r}" for k, (saved, wanted) in
              sorted(read_model_config(checkpoint).differences(expected).items())]
    if differ:
        raise ValueError(f"checkpoint {checkpoint} does not match the model: " + "; ".join(differ))


def checkpoint_assets(checkpoint: Path) -> dict[str, Path]:
    """Folders saved with a checkpoint (tokenizer, original HF config): inside the iteration,
    or next to the iterations in checkpoints written before assets moved inside."""
    found = {}
    for name in ("tokenizer", "hf"):
        for folder in (checkpoint / name, checkpoint.parent / name):
            if folder.is_dir():
                found[name] = folder
                break
    return found
