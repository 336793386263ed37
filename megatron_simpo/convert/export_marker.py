"""The file every Hugging Face export of this project holds, so that a command exporting into a
folder the user names (``--hf-out``) replaces an earlier export there and nothing else."""

from __future__ import annotations

from pathlib import Path

EXPORT_MARKER = "megatron_simpo_export.json"
"""Written into every export (``megatron_to_hf.export_rank0``): the checkpoint it came from."""


def check_replaceable(folder: str | Path, flag: str) -> None:
    """Refuse ``folder`` unless it is new, empty or an earlier export of this project."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"{flag} {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / EXPORT_MARKER).is_file():
        raise ValueError(f"{flag} {folder} holds files that are not an export of this project "
                         f"(no {EXPORT_MARKER}); give a new or empty folder (an export "
                         "made before exports held that file: remove its files yourself)")
