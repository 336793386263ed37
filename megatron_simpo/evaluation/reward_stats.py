"""Reward statistics of one build-pairs run (``--reward-stats FILE``), and of rounds of them.

Over the rows build-pairs wrote for every prompt (``samples``, ``scores``; a prompt whose samples
are all identical is scored once and that score stands for each of its samples):

    mean_reward   = mean over every sample of every prompt of its reward
    mean_chosen   = mean over the kept pairs of max(scores)   (the chosen response's reward)
    mean_rejected = mean over the kept pairs of min(scores)   (the rejected response's reward)

with the counts ``prompts``, ``samples`` (per prompt), ``pairs`` and ``dropped`` (by reason:
identical, tie, empty). ``mean_chosen`` / ``mean_rejected`` are None when no pair is kept.
The file is written whole (a temporary name, then renamed) and checked when read back
(``read_stats``: every key, of its type, or ValueError naming the file and key).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_simpo.distributed.files import write_text_atomically

DROPS = ("identical", "tie", "empty")


def statistics(rows: list[dict], choices: list) -> dict:
    """The statistics (module docstring) of build-pairs ``rows`` (each ``samples`` and
    ``scores``) and their ``pairs.Choice`` s."""
    every, chosen, rejected = [], [], []
    dropped = dict.fromkeys(DROPS, 0)
    for row, choice in zip(rows, choices):
        scores = row["scores"]
        if scores is None:
            raise ValueError(f"prompt {row['prompt_id']} has no scores (its samples were not "
                             "scored)")
        every.extend(scores)
        if choice.dropped:
            dropped[choice.dropped] += 1
        else:
            chosen.append(scores[choice.chosen])
            rejected.append(scores[choice.rejected])

    def mean(values):
        return math.fsum(values) / len(values) if values else None

    return {"prompts": len(rows), "samples": len(rows[0]["samples"]) if rows else 0,
            "pairs": len(chosen), "dropped": dropped, "mean_reward": mean(every),
            "mean_chosen": mean(chosen), "mean_rejected": mean(rejected)}


def write_stats(path: str | Path, stats: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(path, json.dumps(stats, indent=1) + "\n")


def _number(value, optional: bool) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_stats(path: str | Path) -> dict:
    """A ``--reward-stats`` file, checked (ValueError naming the file and the key)."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a reward-statistics file ({type(error).__name__})") \
            from None
    checks = {"prompts": lambda v: isinstance(v, int) and v >= 0,
              "samples": lambda v: isinstance(v, int) and v >= 0,
              "pairs": lambda v: isinstance(v, int) and v >= 0,
              "dropped": lambda v: isinstance(v, dict) and set(v) == set(DROPS) and all(
                  isinstance(n, int) and n >= 0 for n in v.values()),
              "mean_reward": lambda v: _number(v, stats.get("prompts") == 0),
              "mean_chosen": lambda v: _number(v, stats.get("pairs") == 0),
              "mean_rejected": lambda v: _number(v, stats.get("pairs") == 0)}
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: not a reward-statistics file (not a JSON object)")
    for key, ok in checks.items():
        if key not in stats or not ok(stats[key]):
            raise ValueError(f"{path}: {key} is {stats.get(key, 'missing')!r}; not a "
                             "reward-statistics file written by build-pairs --reward-stats")
    return stats
