"""The SimPO paper's analyses of a run, from its metrics.jsonl and --eval-dump files.

* training curves: reward accuracy, reward margin, chosen/rejected log-probs over iterations,
  for the training batches and the held-out pairs;
* the distribution of held-out reward margins at the first and the last evaluation (how gamma
  moves it);
* length exploitation: the Spearman correlation between response length and the average
  log-prob (SimPO's length-normalised reward) and the summed log-prob (a DPO-like reward), and
  between length and the run's reward;
* the sequence-level KL estimate from the reference on held-out chosen responses: the mean over
  pairs of log pi(y_w|x) - log pi_ref(y_w|x), with pi_ref's log-probs from the run's iteration-0
  dump (the run starts from its reference/SFT model and evaluates it first) or from another
  dump of the same held-out pairs (``--reference``).

``summarize`` computes the numbers (numpy only); ``plot`` draws PNGs with matplotlib.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_simpo.checkpoint.layout import check_writable_folder
from megatron_simpo.checkpoint.metrics_file import METRICS_FILE, read_metrics_file
from megatron_simpo.distributed.files import jsonl_lines, write_text_atomically
from megatron_simpo.evaluation import rounds

PLOTS = ("training_curves.png", "margin_distribution.png", "length_correlation.png",
         "kl_from_reference.png")
"""The figures an analysis may write, each replaced or removed by the next analysis."""


CURVES = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
DUMP_ANALYSES = ("margin distribution", "length correlation", "KL from the reference")
"""What needs the held-out pairs' rows (--eval-dump); the summary says which it skipped."""


class RunError(ValueError):
    """A run folder that cannot be analysed; the message names what is missing."""


def read_metrics(run: Path) -> tuple[list[dict], str | None]:
    """The rows of a run's metrics.jsonl, and the warning about a cut-off last line it dropped
    (``checkpoint.metrics_file.read_metrics_file``: a damaged line before it is an error)."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"{run}: no metrics.jsonl (the --save folder of a training run)")
    rows, warning = read_metrics_file(path)
    if not rows:
        raise RunError(f"{path} has no rows: the run logged nothing yet")
    return [row for _, row in rows], warning


def read_dumps(run: Path) -> dict[int, list[dict]]:
    """iteration -> the held-out pairs' rows of its --eval-dump file."""
    folder = Path(run) / "eval_dump"
    dumps = {}
    for path in sorted(folder.glob("iter_*.jsonl")):
        dumps[int(path.stem.removeprefix("iter_"))] = [
            json.loads(line) for _, line in jsonl_lines(path.read_text(encoding="utf-8"))]
    return dumps


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranked = np.empty(len(values), dtype=np.float64)
    ranked[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranked)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); nan if either is constant."""
    rx, ry = ranks(np.asarray(x)), ranks(np.asarray(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


def _series(metrics: list[dict], prefix: str) -> dict[str, list[list[float]]]:
    found = {}
    for name in CURVES:
        points = [[row["iteration"], row[prefix + name]] for row in metrics
                  if row.get(prefix + name) is not None]
        if points:
            found[name] = points
    return found


def _margins(rows: list[dict]) -> dict:
    margins = np.array([r["reward_margin"] for r in rows])
    return {"mean": float(margins.mean()), "std": float(margins.std()),
            "quantiles": {str(q): float(np.quantile(margins, q)) for q in (0.1, 0.5, 0.9)},
            "positive_fraction": float((margins > 0).mean()), "values": margins.tolist()}


def _length_correlations(rows: list[dict]) -> dict:
    """Over both responses of every pair: length vs average log-prob, summed log-prob, reward."""
    tokens = np.array([r[f"{s}_tokens"] for r in rows for s in ("chosen", "rejected")])
    mean = np.array([r[f"{s}_logp_mean"] for r in rows for s in ("chosen", "rejected")])
    summed = np.array([r[f"{s}_logp_sum"] for r in rows for s in ("chosen", "rejected")])
    reward = np.array([r[f"reward_{s}"] for r in rows for s in ("chosen", "rejected")])
    return {"length_vs_mean_logp": spearman(tokens, mean),
            "length_vs_summed_logp": spearman(tokens, summed),
            "length_vs_reward": spearman(tokens, reward)}


def read_dump(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such eval-dump file")
    return [json.loads(line) for _, line in jsonl_lines(path.read_text(encoding="utf-8"))]


def _kl(dumps: dict[int, list[dict]], reference: list[dict], what: str) -> list[list[float]]:
    """Per evaluation: mean over held-out pairs of log pi(y_w) - log pi_ref(y_w)."""
    start = {r["pair"]: r["chosen_logp_sum"] for r in reference}
    found = []
    for at, rows in sorted(dumps.items()):
        missing = [r["pair"] for r in rows if r["pair"] not in start]
        if missing:
            raise RunError(f"{what} has no pair {min(missing)} of the evaluation at iteration "
                           f"{at}: it was not made on the same held-out pairs")
        found.append([at, float(np.mean([r["chosen_logp_sum"] - start[r["pair"]]
                                         for r in rows]))])
    return found


def summarize(run: str | Path, reference: str | Path | None = None) -> dict:
    """Every figure of the analyses, as plain numbers (the JSON summary). ``reference``: an
    eval-dump file of another model on the same held-out pairs, for the KL estimate from it
    (default: the run's own iteration-0 dump, i.e. the model it started from)."""
    run = Path(run)
    metrics, warning = read_metrics(run)
    summary = {"run": str(run), "train": _series(metrics, ""), "eval": _series(metrics, "eval/"),
               "warnings": [warning] if warning else [], "skipped": []}
    if not summary["eval"]:
        summary["skipped"].append("held-out curves (no evaluation in metrics.jsonl)")
    dumps = read_dumps(run)
    if not dumps:  # the curves only
        summary["skipped"].append(f"{', '.join(DUMP_ANALYSES)} (no --eval-dump in this run)")
        return summary
    first, last = min(dumps), max(dumps)
    summary["eval_dump_iterations"] = sorted(dumps)
    summary["margins"] = {"first": {"iteration": first, **_margins(dumps[first])},
                          "last": {"iteration": last, **_margins(dumps[last])}}
    summary["length_correlation"] = {"iteration": last, **_length_correlations(dumps[last])}
    if reference is not None:
        summary["kl_reference"] = str(reference)
        summary["kl_from_reference"] = _kl(dumps, read_dump(reference), str(reference))
    elif first == 0:
        summary["kl_reference"] = "the run's iteration-0 evaluation (its starting model)"
        summary["kl_from_reference"] = _kl(dumps, dumps[0], "iteration 0")
    else:
        summary["skipped"].append(f"{DUMP_ANALYSES[-1]} (no iteration-0 dump to take the "
                                  f"reference from, the first is iteration {first}; give "
                                  "--reference)")
    return summary


def plot(summary: dict, out_dir: str | Path) -> list[Path]:
    """PNG figures of ``summary`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:  # an earlier analysis's: a plot skipped now must not stay beside it
        (out_dir / name).unlink(missing_ok=True)
    written = []

    def save(figure, name: str) -> None:
        assert name in PLOTS
        figure.tight_layout()
        written.append(out_dir / name)
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for axis, name in zip(axes.flat, CURVES):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = summary[split].get(name)
            if points:
                x, y = zip(*points)
                axis.plot(x, y, style, label="held-out" if split == "eval" else "training",
                          markersize=3)
        axis.set_title(name)
        axis.set_xlabel("iteration")
        axis.legend()
    save(figure, "training_curves.png")
    if "margins" in summary:
        figure, axis = plt.subplots(figsize=(6, 4))
        for which in ("first", "last"):
            data = summary["margins"][which]
            axis.hist(data["values"], bins=30, alpha=0.6,
                      label=f"iteration {data['iteration']} (mean {data['mean']:.2f})")
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_xlabel("held-out reward margin")
        axis.set_ylabel("pairs")
        axis.legend()
        save(figure, "margin_distribution.png")
    correlation = summary.get("length_correlation", {})
    values = [correlation.get(key, math.nan) for key in
              ("length_vs_mean_logp", "length_vs_summed_logp", "length_vs_reward")]
    if not all(math.isnan(value) for value in values):  # undefined: one length (said by main)
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.bar(["length vs\naverage log-prob", "length vs\nsummed log-prob",
                  "length vs\nreward"], values)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_ylabel("Spearman correlation")
        axis.set_title(f"held-out responses, iteration {correlation['iteration']}")
        save(figure, "length_correlation.png")
    if "kl_from_reference" in summary:
        figure, axis = plt.subplots(figsize=(6, 4))
        x, y = zip(*summary["kl_from_reference"])
        axis.plot(x, y, "o-")
        axis.set_xlabel("iteration")
        axis.set_ylabel("mean log pi - log pi_ref (chosen)")
        axis.set_title("sequence-level KL estimate from the reference", fontsize=10)
        save(figure, "kl_from_reference.png")
    return written


@dataclass(frozen=True)
class AnalysisConfig:
    """``megatron-simpo-analyze-run``: plots and a JSON summary of one run."""

    run: str
    """the run's --save folder, or the ROOT of examples/iterative_simpo.sh (its round-N
    folders: the reward per round)"""
    output: str | None = None
    """where the PNGs and summary.json go (default: <run>/analysis)"""
    reference: str | None = None
    """an eval_dump/iter_*.jsonl file of the reference model on the same held-out pairs, for
    the KL estimate (default: the run's iteration-0 dump)"""


def strict_json(value) -> str:
    """``value`` as strict JSON: an undefined number (a correlation of constant lengths, NaN)
    is null, which every JSON reader takes."""
    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item
    return json.dumps(clean(value), indent=1, allow_nan=False)


def analyze(config: AnalysisConfig) -> Path:
    """Write the plots and summary.json, print where and the length correlations; a run that
    cannot be analysed raises :class:`RunError` naming what is missing. A rounds' root (no
    metrics.jsonl, round-N folders) gets ``rounds.analyze``: the reward per round."""
    out = Path(config.output or Path(config.run) / "analysis")
    if config.reference and not Path(config.reference).is_file():
        raise RunError(f"--reference {config.reference} does not exist")
    flag = "--output" if config.output else "the analysis folder"
    if not (Path(config.run) / METRICS_FILE).is_file() and rounds.round_folders(config.run):
        if config.reference:
            raise RunError(f"--reference is for one run's KL estimate; {config.run} holds rounds")
        check_writable_folder(out, flag)
        return rounds.analyze(config.run, out)
    summary = summarize(config.run, config.reference)  # the run is there: then its output
    check_writable_folder(out, flag)
    for warning in summary["warnings"]:
        print(warning)
    written = plot(summary, out)
    compact = {k: v for k, v in summary.items() if k != "margins"}
    if "margins" in summary:
        compact["margins"] = {w: {k: v for k, v in m.items() if k != "values"}
                              for w, m in summary["margins"].items()}
    write_text_atomically(out / "summary.json", strict_json(compact))
    print(f"> analysis of {config.run}: {', '.join(p.name for p in written)} and summary.json "
          f"in {out}")
    for skipped in summary["skipped"]:
        print(f"> skipped: {skipped}")
    if "length_correlation" in summary:
        c = summary["length_correlation"]
        if math.isnan(c["length_vs_mean_logp"]):
            print("> length correlations: undefined, every held-out response has the same length")
        else:
            print(f"> Spearman(length, average log-prob) {c['length_vs_mean_logp']:.3f}, "
                  f"(length, summed log-prob) {c['length_vs_summed_logp']:.3f}, "
                  f"(length, reward) {c['length_vs_reward']:.3f}")
    return out
