"""--eval-dump: every held-out pair's log-probs and rewards at an evaluation, one JSON line
each, in <save>/eval_dump/iter_NNNNNNN.jsonl (tools/analyze_run.py reads them).

The values come from the evaluation's own forward pass (``step.Evaluation``): the dump adds
no forward pass. A line holds the pair's index in the validation set, its summed and average
response log-probs and response lengths, its rewards and margin under the run's objective,
and (dpo, ipo, rdpo) the reference's summed log-probs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_simpo.checkpoint.metrics_file import write_failed
from megatron_simpo.data.collate import TokenizedPair
from megatron_simpo.distributed.files import write_text_atomically
from megatron_simpo.training.losses import LossConfig, preference_loss
from megatron_simpo.training.step import Evaluation

FOLDER = "eval_dump"


def dump_rows(evaluation: Evaluation, microbatch_pairs: Sequence[tuple[int, ...]],
              pairs: Sequence[TokenizedPair], loss: LossConfig) -> list[dict]:
    """The lines of this rank's pairs: ``microbatch_pairs[k]`` are the validation indices of
    the pairs of micro-batch k. Rewards are recomputed in float64 from the log-prob sums."""
    rows = []
    for indices, logps, reference in zip(microbatch_pairs, evaluation.logp_sums,
                                         evaluation.reference_logp_sums):
        logps = logps.double().cpu().view(-1, 2)  # [n, 2]: chosen, rejected
        counts = torch.tensor([[len(pairs[i].chosen), len(pairs[i].rejected)]
                               for i in indices], dtype=torch.float64)
        ref = None if reference is None else reference.double().cpu().view(-1, 2)
        _, metrics = preference_loss(
            logps[:, 0], counts[:, 0], logps[:, 1], counts[:, 1], loss,
            None if ref is None else ref[:, 0], None if ref is None else ref[:, 1])
        for k, index in enumerate(indices):
            rows.append({"pair": index,
                         "chosen_logp_sum": logps[k, 0].item(),
                         "rejected_logp_sum": logps[k, 1].item(),
                         "chosen_tokens": int(counts[k, 0]),
                         "rejected_tokens": int(counts[k, 1]),
                         "chosen_logp_mean": (logps[k, 0] / counts[k, 0]).item(),
                         "rejected_logp_mean": (logps[k, 1] / counts[k, 1]).item(),
                         "reward_chosen": metrics["rewards/chosen"][k].item(),
                         "reward_rejected": metrics["rewards/rejected"][k].item(),
                         "reward_margin": metrics["rewards/margins"][k].item(),
                         **({} if ref is None else {
                             "reference_chosen_logp_sum": ref[k, 0].item(),
                             "reference_rejected_logp_sum": ref[k, 1].item()})})
    return rows


def drop_dumps_from(save: str | Path, iteration: int) -> None:
    """Remove the dumps of ``iteration`` and later from ``save`` (rank 0), as metrics.jsonl drops
    its lines: all of them for a fresh run (``--overwrite``), those a resumed run evaluates
    again or passes for a resumed one."""
    for path in (Path(save) / FOLDER).glob("iter_*.jsonl*"):
        number = path.name[len("iter_"):].split(".")[0]
        if number.isdigit() and int(number) >= iteration:
            path.unlink()


def write_eval_dump(save: str | Path, at: int, evaluation: Evaluation,
                    microbatch_pairs: Sequence[tuple[int, ...]],
                    pairs: Sequence[TokenizedPair], loss: LossConfig) -> None:
    """Gather every rank's lines on rank 0, which writes them in pair order (atomically).
    Call on every rank; the lines come from the first tensor- and context-parallel rank of the
    last pipeline stage (the others hold the same values, or none)."""
    from megatron.core import parallel_state as ps

    rows = []
    if (evaluation.logp_sums and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0):
        rows = dump_rows(evaluation, microbatch_pairs, pairs, loss)
    rank = dist.get_rank()
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if rank == 0:
        ordered = sorted((row for part in gathered for row in part), key=lambda r: r["pair"])
        path = Path(save) / FOLDER / f"iter_{at:07d}.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in ordered))
        except OSError as error:
            raise write_failed(path, error) from None
