"""Reading the metrics.jsonl of a save folder back (a resume trims it, analyze-run plots it):
JSON only, so that readers need neither torch nor Megatron."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_simpo.distributed.files import jsonl_lines

METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
    """A damaged metrics.jsonl line (not JSON before the last line, or not a metrics row), or a
    report of the run (metrics.jsonl, an eval dump) that cannot be written; the message names
    the file (and the line)."""


def write_failed(path: str | Path, error: OSError) -> MetricsFileError:
    """The error of a run's report that cannot be written (a full disk, a removed folder)."""
    return MetricsFileError(f"cannot write {path}: {error.strerror or type(error).__name__}; "
                            "the run stops (resume from its last checkpoint with --load)")


def _row(line: str) -> dict:
    """A metrics row: a JSON object with an integer "iteration" (ValueError otherwise)."""
    row = json.loads(line)
    if not isinstance(row, dict) or type(row.get("iteration")) is not int:
        raise ValueError('not a JSON object with an integer "iteration"')
    return row


def read_metrics_file(path: str | Path) -> tuple[list[tuple[str, dict]], str | None]:
    """The (line, row) pairs of a metrics.jsonl, and a warning when its last line was dropped.

    Rule: a last line that does not parse as JSON is what a write cut off by ``kill -9`` leaves;
    it is dropped with a one-line warning. Any other line that is not a metrics row (a JSON
    object with an integer "iteration") raises :class:`MetricsFileError` naming the file and
    the line. Blank lines are skipped.
    """
    path = Path(path)
    lines = jsonl_lines(path.read_text(encoding="utf-8", errors="replace"))
    last = lines[-1][0] if lines else 0
    found, warning = [], None
    for number, line in lines:
        try:
            found.append((line, _row(line)))
        except json.JSONDecodeError as error:
            if number != last:
                raise MetricsFileError(f"{path} line {number} is not JSON ({error}); the file "
                                       "is damaged: fix or remove that line") from None
            warning = (f"warning: {path} line {number} is cut off (not JSON: a write "
                       "interrupted by a kill); dropped")
        except ValueError as error:
            raise MetricsFileError(f"{path} line {number} is {error}; the file is damaged: "
                                   "fix or remove that line") from None
    return found, warning
