"""Rounds of on-policy SimPO (examples/iterative_simpo.sh): the reward per round.

The rounds' root holds ``round-N`` folders (N = 0, 1, ...). Round N >= 1 sampled its training
prompts with the model round N-1 made (round 1: the start model), scored them and trained one
epoch on the pairs; its folder holds

    rewards.json          build-pairs --reward-stats of its training samples (``reward_stats``)
    heldout-rewards.json  the same for held-out prompts sampled by the model it made (optional)
    checkpoint/           its training run (metrics.jsonl: the held-out reward accuracy)

and ``round-0`` only the start model's ``heldout-rewards.json``. ``summarize`` gives, per round,
the training samples' mean reward / chosen / rejected, the held-out samples' mean reward and
the trainer's last held-out reward accuracy; every file read is checked first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megatron_simpo.checkpoint.metrics_file import METRICS_FILE, read_metrics_file
from megatron_simpo.evaluation.reward_stats import read_stats

ROUND = re.compile(r"round-(\d+)")


def round_folders(root: str | Path) -> dict[int, Path]:
    """N -> ``root/round-N`` for the round folders under ``root`` (none: not a rounds root)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {int(m.group(1)): p for p in root.iterdir()
            if p.is_dir() and (m := ROUND.fullmatch(p.name))}


def _heldout_accuracy(checkpoint: Path) -> float | None:
    """The last ``eval/rewards/accuracies`` of the round's metrics.jsonl, if it has one (read
    as every reader of that file reads it: ``checkpoint.metrics_file``)."""
    path = checkpoint / METRICS_FILE
    if not path.is_file():
        return None
    rows, _ = read_metrics_file(path)
    found = [row["eval/rewards/accuracies"] for _, row in rows
             if row.get("eval/rewards/accuracies") is not None]
    return float(found[-1]) if found else None


def summarize(root: str | Path) -> dict:
    """Per round (module docstring); ValueError naming the folder or file that is missing or
    not what build-pairs and the trainer write."""
    folders = round_folders(root)
    if not folders:
        raise ValueError(f"{root}: no round-N folders (the ROOT of examples/iterative_simpo.sh)")
    rows = []
    for number in sorted(folders):
        folder = folders[number]
        row = {"round": number}
        if number > 0:
            if not (folder / "rewards.json").is_file():
                raise ValueError(f"{folder}: no rewards.json (its build-pairs --reward-stats); "
                                 "the round did not finish sampling")
            stats = read_stats(folder / "rewards.json")
            row.update({k: stats[k] for k in ("prompts", "pairs", "mean_reward", "mean_chosen",
                                              "mean_rejected")})
            row["heldout_reward_accuracy"] = _heldout_accuracy(folder / "checkpoint")
        if (folder / "heldout-rewards.json").is_file():
            row["heldout_mean_reward"] = read_stats(folder / "heldout-rewards.json")["mean_reward"]
        rows.append(row)
    return {"root": str(root), "rounds": rows}


def plot(summary: dict, out_dir: str | Path) -> Path:
    """``rewards_per_round.png``: the training samples' mean, chosen and rejected reward (of
    the model each round sampled with, round N: the model after round N-1) and the held-out
    samples' mean reward of the model each round made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    rows = summary["rounds"]
    for key, label, style in (("mean_reward", "sampled (all samples)", "o-"),
                              ("mean_chosen", "chosen", "^--"),
                              ("mean_rejected", "rejected", "v--")):
        points = [(r["round"] - 1, r[key]) for r in rows if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), style, label=f"{label}, training prompts")
    points = [(r["round"], r["heldout_mean_reward"]) for r in rows
              if r.get("heldout_mean_reward") is not None]
    if points:
        axis.plot(*zip(*points), "s-", label="sampled, held-out prompts")
    axis.set_xlabel("rounds of training behind the sampling model")
    axis.set_ylabel("mean reward")
    axis.set_xticks(sorted({r["round"] for r in rows} | {r["round"] - 1 for r in rows if r["round"]}))
    axis.legend(fontsize=8)
    figure.tight_layout()
    out = Path(out_dir) / "rewards_per_round.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def analyze(root: str | Path, out_dir: str | Path) -> Path:
    """Write ``rounds.json`` and the plot in ``out_dir``; print a table of the rounds."""
    summary = summarize(root)
    out_dir = Path(out_dir)
    picture = plot(summary, out_dir)
    (out_dir / "rounds.json").write_text(json.dumps(summary, indent=1) + "\n")

    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    print("round N: training prompts sampled by model N-1 (mean, chosen, rejected reward); "
          "model N on the held-out prompts (mean reward) and pairs (reward accuracy)")
    print("round  sampled  chosen  rejected  held-out  held-out acc.")
    for r in summary["rounds"]:
        print(f"{r['round']:>5}  {cell(r.get('mean_reward')):>7}  {cell(r.get('mean_chosen')):>6}"
              f"  {cell(r.get('mean_rejected')):>8}  {cell(r.get('heldout_mean_reward')):>8}"
              f"  {cell(r.get('heldout_reward_accuracy')):>13}")
    print(f"> rounds of {root}: {picture.name} and rounds.json in {out_dir}")
    return out_dir
