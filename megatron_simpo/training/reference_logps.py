"""Reference log-probs computed once: DPO, IPO and R-DPO without a resident reference model.

``megatron-simpo-reference-logps`` (``python -m megatron_simpo.training.reference_logps``, under torchrun
like training) takes the training command line, whose ``--pretrained-checkpoint`` is the
reference model, and writes ``--output`` (default: the ``--reference-logps`` of that command
line). It runs the reference model forward-only over every training and validation pair,
data-parallel over the ranks at any TP/PP, and stores each pair's summed response log-probs
keyed by the pair's token ids (after the chat template and truncation). Training with
``--reference-logps FILE`` attaches them to the batches instead of running a reference model:
no reference weights in memory and no reference forward pass per step.

Refused: a file computed from another reference checkpoint (its fingerprint differs from the
run's ``--pretrained-checkpoint``), and a run with a pair the file does not hold (other data,
tokenizer, ``--seq-length`` or ``--max-prompt-length``). Flags of the command line that do not
change the log-probs (loss, optimizer, run length, ``--save``) are accepted and not used, so
that one argument list serves both commands; a model or layout training refuses (e.g.
``--share-prompt`` on sliding-window layers) is refused here too (``run_setup.check_model_layout``).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_simpo.checkpoint.layout import checkpoint_fingerprint, damaged_archive
from megatron_simpo.data.batching import PairLengths, plan_forward
from megatron_simpo.data.config import DataError
from megatron_simpo.data.collate import TokenizedPair

FORMAT = "megatron_simpo.reference_logps/1"


def pair_key(pair: TokenizedPair) -> str:
    """A pair's identity: a hash of its prompt, chosen and rejected token ids."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (pair.prompt, pair.chosen, pair.rejected):
        ids = np.asarray(part, dtype=np.int64)
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(ids.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ReferenceLogps:
    """Summed response log-probs of a reference model, per pair."""

    rows: dict[str, int]
    """pair key -> row of ``sums``."""
    sums: torch.Tensor
    """[n, 2] float64: chosen and rejected summed response log-probs."""
    checkpoint: str
    """The reference checkpoint (iteration folder) they were computed from."""
    fingerprint: str
    """``checkpoint_fingerprint`` of that checkpoint."""

    def save(self, path: str | Path) -> None:
        """Write atomically: a partial file never replaces a good one."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        torch.save({"format": FORMAT, "keys": list(self.rows), "sums": self.sums,
                    "checkpoint": self.checkpoint, "fingerprint": self.fingerprint}, partial)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceLogps":
        """Read a file :meth:`save` wrote, verified before it is trusted: its archive's CRCs
        (``torch.load`` checks none: a changed byte loads as another log-prob), then its
        contents (one finite [chosen, rejected] row per key)."""
        if not Path(path).is_file():
            raise DataError(f"--reference-logps {path}: no such file")
        damaged = damaged_archive(Path(path)) if zipfile.is_zipfile(path) else None
        if damaged:
            raise DataError(f"--reference-logps {path}: damaged ({damaged}); recompute it with "
                            "megatron-simpo-reference-logps")
        try:
            saved = torch.load(path, weights_only=True)
        except Exception:  # PyTorch's own text (e.g. "use weights_only=False") would mislead
            raise DataError(f"--reference-logps {path}: not a reference log-probs file (the "
                            "tensor-only .pt file megatron-simpo-reference-logps writes)") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise DataError(f"--reference-logps {path}: not a reference log-probs file "
                            f"(format {saved.get('format') if isinstance(saved, dict) else None!r}, "
                            f"expected {FORMAT}, written by megatron-simpo-reference-logps)")
        keys, sums = saved.get("keys"), saved.get("sums")
        if (not isinstance(sums, torch.Tensor) or sums.dtype != torch.float64
                or sums.dim() != 2 or sums.shape[1] != 2 or not isinstance(keys, list)
                or len(keys) != sums.shape[0]):
            raise DataError(f"--reference-logps {path}: damaged (expected [n, 2] float64 sums "
                            "for n keys); recompute it with megatron-simpo-reference-logps")
        bad = (~torch.isfinite(sums)).any(dim=1).nonzero()
        if len(bad):
            raise DataError(f"--reference-logps {path}: pair row {int(bad[0])} holds a "
                            f"non-finite log-prob ({sums[int(bad[0])].tolist()}); recompute it "
                            "with megatron-simpo-reference-logps")
        return cls({key: row for row, key in enumerate(keys)}, sums,
                   saved["checkpoint"], saved["fingerprint"])

    def check_reference(self, checkpoint: Path, path: str | Path) -> None:
        """Refuse log-probs of another model than the run's reference checkpoint."""
        if checkpoint_fingerprint(checkpoint) != self.fingerprint:
            raise DataError(f"--reference-logps {path} was computed from {self.checkpoint}, not "
                            f"from --pretrained-checkpoint {checkpoint} (the fingerprints "
                            "differ): recompute it with megatron-simpo-reference-logps")

    def lookup(self, pairs: Sequence[TokenizedPair], what: str, path: str | Path) -> torch.Tensor:
        """[len(pairs), 2] float64 sums of ``pairs``; every pair must be in the file."""
        rows, missing = [], []
        for index, pair in enumerate(pairs):
            row = self.rows.get(pair_key(pair))
            if row is None:
                missing.append(index)
            rows.append(row)
        if missing:
            raise DataError(f"--reference-logps {path} has no log-probs for {len(missing)} of "
                            f"{len(pairs)} {what} pairs (first: pair {missing[0]}): it was "
                            "computed for other data, tokenizer, --seq-length or "
                            "--max-prompt-length; recompute it with megatron-simpo-reference-logps")
        return self.sums[torch.tensor(rows, dtype=torch.long)]


def interleaved(sums: torch.Tensor) -> torch.Tensor:
    """[n, 2] (chosen, rejected) -> [2n] in the batch's row order (chosen, rejected, ...)."""
    return sums.reshape(-1)


def _forward_microbatches(data, pairs, indices: list[int], config) -> tuple:
    """Micro-batches over these pairs for a forward-only pass, from the training planner
    (``batching.plan_forward``): the run's token budget (and packing), or --micro-batch-size
    pairs of similar lengths each padded to its longest."""
    return plan_forward(indices, [PairLengths.of(pairs[i]) for i in indices],
                        micro_batch_size=config.micro_batch_size, config=config.batching,
                        seq_length=config.data.seq_length, multiple=data.padding_multiple)


def prepare(config):
    """Every check that can fail before the reference model runs (one process, no process
    group): the reference checkpoint, and the model and layout as training checks them
    (``run_setup.check_model_layout``: what training refuses, e.g. ``--share-prompt`` on
    sliding-window layers, would give other log-probs). Returns the model source."""
    from megatron_simpo.training.run_setup import check_model_layout, resolve_model_source

    if not config.pretrained_checkpoint:
        raise ValueError("give the reference model as --pretrained-checkpoint")
    source = resolve_model_source(config)
    check_model_layout(config, source)
    return source


def compute(config, output: str | Path, source=None) -> Path:
    """Compute and save the reference log-probs of the run ``config`` describes (every rank);
    ``source``: what :func:`prepare` returned (checked here when not given)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.runtime import max_over_world
    from megatron_simpo.training.step import attach_reference_logps
    from megatron_simpo.training.run_setup import build_reference_from_config
    from megatron_simpo.training.training_data import TrainingData

    source = source or prepare(config)
    env = runtime.initialize(config.parallel, seed=config.seed, model_config=source.config)
    data = TrainingData.load(config, source)
    model, head = build_reference_from_config(config, source)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    holds_results = (parallel_state.is_pipeline_last_stage()
                     and parallel_state.get_tensor_model_parallel_rank() == 0)
    found: dict[str, tuple[float, float]] = {}
    for pairs in (data.train_pairs, data.valid_pairs):
        if not pairs:
            continue
        mine = list(range(dp_rank, len(pairs), dp_size))  # each pair on one data-parallel rank
        planned = _forward_microbatches(data, pairs, mine or [0], config)
        if config.parallel.expert_model_parallel_size > 1:
            # each micro-batch's expert all-to-all spans the data-parallel ranks: a rank with
            # fewer runs its last again (the same sums again) until all have run as many
            count = max_over_world(len(planned))
            planned = planned + (planned[-1],) * (count - len(planned))
        elif not mine:
            planned = ()
        for microbatch in planned:
            batch = data.collate(pairs, microbatch, config, env.device, None)
            [batch] = attach_reference_logps(model, [batch], head)
            if holds_results:
                sums = batch.reference_logp_sum.double().cpu().reshape(-1, 2)
                found.update((pair_key(pairs[i]), tuple(s.tolist()))
                             for i, s in zip(microbatch.pairs, sums))
    everything = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(found if holds_results else {}, everything, dst=0)
    output = Path(output)
    if env.rank == 0:
        merged = {key: sums for part in everything for key, sums in part.items()}
        result = ReferenceLogps({key: row for row, key in enumerate(merged)},
                                torch.tensor(list(merged.values()), dtype=torch.float64),
                                str(source.weights_from),
                                checkpoint_fingerprint(source.weights_from))
        output.parent.mkdir(parents=True, exist_ok=True)
        result.save(output)
        print(f"> saved reference log-probs of {len(merged)} pairs from {source.weights_from} "
              f"to {output}", flush=True)
    dist.barrier()
    return output
