"""Cache entries that cannot lie: checksums written at build time and checked on open, token ids
range-checked, the folders of dead builders swept, builder workers that die with their builder.

An entry ``pairs-<digest>/`` holds ``pairs/`` (``save_to_disk``: the Arrow file, state.json,
dataset_info.json) and ``prepared.json``, written last: the entry's key, its pair count and
``files``, every file of ``pairs/`` as ``[size, sha256]``. ``entry_problem`` proves an entry
before it is trusted, and names the first thing wrong:

* half-built: no ``prepared.json``; damaged: it is not JSON of that form;
* stale: written for another key, or by a version that wrote no checksums;
* damaged: a recorded file is missing, has another size (truncated), or other bytes (sha256:
  random bytes at the same size, swapped columns, a garbled state.json), or a file was added.

SHA-256 runs at about 1.4 GB/s (hashlib, SHA-NI), the pages a rank reads anyway: a 355 MB entry
of 100k pairs costs about 0.3 s of a warm start (docs/performance.md). Then ``token_id_problem``
checks every token id of the opened table against the vocabulary, once per entry.

A build writes into ``.<entry>.building-<host>-<pid>`` and renames it into place; one killed
with ``kill -9`` leaves that folder, which the next build on the host removes once ``pid`` is
gone (``sweep_dead_builds``). ``builder_guard`` makes every process the builder forks (the
tokenizing workers of ``datasets.map``, its manager) die with it (Linux ``PR_SET_PDEATHSIG``),
and turns SIGTERM into one "stopping" line and exit code 143 after the partial entry is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from megatron_simpo.data.config import DataError
from megatron_simpo.distributed.lifecycle import die_with_parent

SUMMARY = "prepared.json"
"""The entry's summary and checksums, written after everything else."""
PAIRS = "pairs"
"""The entry's save_to_disk folder."""
ABSENT = "absent"
"""``entry_problem`` of a folder that does not exist (nothing to report: it is built)."""
_BUILDING = ".building-"


def file_checksums(folder: Path) -> dict[str, list]:
    """``{path under folder: [size in bytes, sha256 hex]}`` of every file under ``folder``."""
    sums = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        sums[path.relative_to(folder).as_posix()] = [path.stat().st_size, digest]
    return sums


def entry_problem(folder: Path, key: dict) -> str | None:
    """What is wrong with the entry in ``folder`` for ``key`` (``asdict`` of its CacheKey):
    ``None`` when every file is as built, ``ABSENT`` when there is no entry, else the first
    fault in words (half-built, stale, damaged: the file and how)."""
    if not folder.exists():
        return ABSENT
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except FileNotFoundError:
        return f"half-built: it has no {SUMMARY}"
    except (OSError, ValueError) as error:
        return f"{SUMMARY} cannot be read ({type(error).__name__})"
    if not isinstance(summary, dict):
        return f"{SUMMARY} is garbled"
    if "files" not in summary:
        return "stale: written by an older version, without checksums"
    if not isinstance(summary.get("tokens"), str):
        return "stale: written by an older version, without its tokens' digest"
    if summary.get("key") != json.loads(json.dumps(key)):
        return "stale: written for another source or setting"
    try:
        files = {str(name): (int(size), str(digest))
                 for name, (size, digest) in summary["files"].items()}
    except (AttributeError, TypeError, ValueError):
        return f"{SUMMARY} is garbled (its checksums)"
    pairs = folder / PAIRS
    try:
        found = {p.relative_to(pairs).as_posix() for p in pairs.rglob("*") if p.is_file()}
    except OSError as error:
        return f"{PAIRS} cannot be listed ({error.strerror or error})"
    for name, (size, _) in sorted(files.items()):
        if name not in found:
            return f"{PAIRS}/{name} is missing"
        try:
            actual = (pairs / name).stat().st_size
        except OSError as error:
            return f"{PAIRS}/{name} cannot be read ({error.strerror or error})"
        if actual != size:
            return f"{PAIRS}/{name} is {actual} bytes, {size} when built"
    extra = sorted(found - set(files))
    if extra:
        return f"{PAIRS}/{extra[0]} was not written by the build"
    for name, (_, digest) in sorted(files.items()):
        try:
            with (pairs / name).open("rb") as handle:
                if hashlib.file_digest(handle, "sha256").hexdigest() != digest:
                    return f"{PAIRS}/{name} does not match its checksum (its bytes changed)"
        except OSError as error:  # an I/O error: the agreed DataError path names it
            return f"{PAIRS}/{name} cannot be read ({error.strerror or error})"
    return None


def tokens_digest(table) -> str:
    """sha256 of a pairs table's token ids, row by row (prompt, chosen, rejected: each row's
    lengths and ids): the pairs' identity, whatever their source is called or however this
    version caches them. Written into the entry's summary when it is built
    (:func:`recorded_tokens_digest`)."""
    import numpy as np
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    for column in ("prompt", "chosen", "rejected"):
        ids = table.column(column)
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
        digest.update(column.encode())
        digest.update(np.ascontiguousarray(lengths, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(values, dtype="<i4").tobytes())
    return digest.hexdigest()


def recorded_tokens_digest(folder: Path) -> str:
    """The :func:`tokens_digest` an entry's summary records (read after ``entry_problem``
    found the entry sound)."""
    return json.loads((folder / SUMMARY).read_text())["tokens"]


def token_id_problem(table, vocab_size: int) -> str | None:
    """The first token id outside ``[0, vocab_size)`` of a pairs table (Arrow columns prompt,
    chosen, rejected of list<int32>), with its row's source, or ``None``: min/max per column,
    the row found only when one is out of range."""
    import numpy as np
    import pyarrow.compute as pc

    for column in ("prompt", "chosen", "rejected"):
        ids = table.column(column)
        bounds = pc.min_max(pc.list_flatten(ids)).as_py()
        if bounds["min"] is None or (0 <= bounds["min"] and bounds["max"] < vocab_size):
            continue
        values = pc.list_flatten(ids).to_numpy()
        bad = int(np.flatnonzero((values < 0) | (values >= vocab_size))[0])
        row = pc.list_parent_indices(ids).to_numpy()[bad]
        return (f"{table.column('source')[int(row)].as_py()}: token id {int(values[bad])} in "
                f"{column} is outside the vocabulary [0, {vocab_size})")
    return None


def building_folder(folder: Path) -> Path:
    """Where this process builds the entry ``folder`` before renaming it into place."""
    return folder.parent / f".{folder.name}{_BUILDING}{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def sweep_dead_builds(cache_dir: Path) -> list[str]:
    """Remove the build folders that builders on this host left when they were killed (their
    pid is gone); one message per folder removed."""
    removed = []
    host = socket.gethostname()
    for path in sorted(cache_dir.glob(f".*{_BUILDING}*")):
        owner_host, _, pid = path.name.rsplit(_BUILDING, 1)[1].rpartition("-")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(f"> data: removed {path}, left by a build that was killed (pid {pid})")
    return removed


def discard_entry(folder: Path, problem: str) -> None:
    """Move a damaged entry out of the way (into this process's build folder, removed with it)
    so it can be built again; DataError naming it when that is impossible."""
    work = building_folder(folder)
    try:
        shutil.rmtree(work, ignore_errors=True)
        os.rename(folder, work)
        shutil.rmtree(work)
    except OSError as error:
        raise DataError(f"the data cache entry {folder} is damaged ({problem}) and cannot be "
                        f"removed to rebuild it: {error.strerror or error} (remove it, or choose "
                        "another --data-cache-dir)") from None


_builder_pid: int | None = None
_hooked = False


def _after_fork_in_child() -> None:
    """In every process a builder forks: die with the builder (SIGKILL on its death), and no
    SIGTERM handler of the builder's; Ctrl-C is the builder's to act on (no KeyboardInterrupt
    in each worker); a builder already gone ends it at once."""
    global _builder_pid
    parent = _builder_pid
    if parent is None:
        return
    _builder_pid = os.getpid()  # what this process forks in turn dies with it
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        pass
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


@contextmanager
def builder_guard(what: str):
    """While a build runs in this process: the processes it forks die with it, and SIGTERM
    prints ``> data: received SIGTERM while tokenizing <what>: stopping ...`` and ends the build
    with SystemExit(143) (the caller's ``finally`` removes the partial entry)."""
    global _builder_pid, _hooked
    if not _hooked:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooked = True
    owner, stopped, previous = os.getpid(), [], {}

    def stop(number, frame):
        if os.getpid() != owner:  # a child forked before its hook ran
            os._exit(128 + number)
        if stopped:
            return
        stopped.append(number)
        print(f"> data: received {signal.Signals(number).name} while tokenizing {what}: "
              "stopping (the partial cache entry is removed; the next run tokenizes it again)",
              file=sys.stderr, flush=True)
        if callable(previous.get(number)):  # the command's own (lifecycle.StopRequests): noted
            previous[number](number, frame)
        raise SystemExit(128 + number)

    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, stop)
    _builder_pid = owner
    try:
        yield
    except BaseException:
        if stopped:  # whatever the interrupted pool raised on its way out
            raise SystemExit(128 + stopped[0]) from None
        raise
    finally:
        _builder_pid = None
        for number, handler in previous.items():
            signal.signal(number, handler)
