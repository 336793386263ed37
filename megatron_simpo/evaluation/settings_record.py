"""What made an output, kept beside it: a resume that would complete the output with other
settings is refused, naming each difference (generate-answers' ``<file>.settings.json``,
build-pairs' ``<output>.parts/settings.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from megatron_simpo.distributed.files import write_text_atomically


def model_identity(hf: str | None, load: str | None) -> str:
    """The model an output comes from, as a record holds it: the absolute Hugging Face folder,
    or the iteration folder ``--load`` names now (a save root's tracker moves as training goes
    on: completing the output from the newer iteration is another model)."""
    from megatron_simpo.checkpoint.layout import find_checkpoint

    return str((find_checkpoint(load) if load else Path(hf)).resolve())


def local_path(spec: str | None) -> str | None:
    """A path flag as a record holds it: absolute where it names a local file or folder (the
    same one however it is spelled, from whichever folder; another one under the same relative
    spelling differs), as given otherwise (a Hub name). ``file.py:function`` (a reward
    function) keeps its function name."""
    if spec is None:
        return None
    module, colon, function = spec.rpartition(":")
    if colon and module.endswith(".py"):
        return f"{local_path(module)}:{function}"
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def write(path: Path, settings: dict) -> None:
    """Record ``settings`` in ``path`` (atomically)."""
    write_text_atomically(path, json.dumps(settings, indent=1) + "\n")


def differences(path: Path, settings: dict, name: Callable[[str], str] = lambda key: key, *,
                start_over: str, paths: tuple[str, ...] = ()) -> list[str]:
    """``<name> <recorded> -> <now>`` for each setting whose recorded value differs (a setting
    the record does not hold was not kept by the version that wrote it: not compared).
    ``paths``: settings now held as :func:`local_path`; a record of an earlier version holds
    them as given, and a relative one is read from the current folder. Raises
    ValueError naming ``path`` when it is missing or not a record, with ``start_over``: what
    to move away to start over."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: missing or not a settings record; move {start_over} away "
                         "to start over")
    for key in paths:  # as local_path holds them (a no-op on a record that does already)
        if isinstance(recorded.get(key), str):
            recorded[key] = local_path(recorded[key])
    return [f"{name(key)} {recorded[key]!r} -> {value!r}"
            for key, value in settings.items() if key in recorded and recorded[key] != value]
