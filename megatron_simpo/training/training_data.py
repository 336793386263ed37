"""A run's data: the tokenized pairs, their order, and how a global batch becomes this rank's
micro-batches (the planner in batching.py, the tensors from data.collate_microbatch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_simpo.checkpoint import checkpointing
from megatron_simpo.data.batching import BatchPlan, Microbatch, PairLengths, plan_global_batch
from megatron_simpo.training.config import TrainConfig
from megatron_simpo.data.config import DataError
from megatron_simpo.data.sampler import PairSampler
from megatron_simpo.data.collate import PreferenceBatch, TokenizedPair, collate_microbatch
from megatron_simpo.data.pair_table import length_statistics
from megatron_simpo.data.tokenization import load_tokenizer
from megatron_simpo.data.cache import prepare_data
from megatron_simpo.model.precision import padding_multiple
from megatron_simpo.training.run_setup import ModelSource


@dataclass
class TrainingData:
    """The tokenized pairs, their order, and how a global batch becomes this rank's batches."""

    train_pairs: Sequence[TokenizedPair]
    """A data_cache.PairTable: memory-mapped, read pair by pair."""
    valid_pairs: Sequence[TokenizedPair]
    pad_id: int
    sampler: PairSampler
    padding_multiple: int
    dropped: list[str] = field(default_factory=list)
    """Rows left out because their two responses are the same tokens (file:line)."""
    cut: dict[str, int] = field(default_factory=lambda: {"prompts": 0, "responses": 0})
    """Prompts cut on the left (--max-prompt-length), responses on the right (--seq-length)."""
    train_reference: torch.Tensor | None = None
    """[n_train, 2] precomputed reference log-prob sums (chosen, rejected), --reference-logps."""
    valid_reference: torch.Tensor | None = None
    """[n_valid, 2] the same for the validation pairs."""
    fingerprint: str | None = None
    """Identity of the training data (saved in checkpoints, checked on resume)."""
    messages: list[str] = field(default_factory=list)
    """How the data was prepared (tokenized now, or the cache reused)."""

    @classmethod
    def load(cls, config: TrainConfig, source: ModelSource) -> "TrainingData":
        """The pairs of ``config.data`` under the run's tokenizer; no reference log-probs
        (``train.load_data`` attaches those of --reference-logps)."""
        tokenizer = load_tokenizer(source.tokenizer_path)
        prepared = prepare_data(config.data, tokenizer, source.tokenizer_path, config.seed,
                                vocab_size=source.config.vocab_size)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(prepared.train, prepared.valid, pad_id,
                   PairSampler(len(prepared.train), config.global_batch_size, config.seed),
                   padding_multiple(config.sequence_alignment), prepared.dropped, prepared.cut,
                   fingerprint=prepared.fingerprint, messages=prepared.messages)

    def warnings(self, config: TrainConfig, dp_size: int) -> list[str]:
        """What the user should know about the data before training starts."""
        found = [f"> training data: {len(self.train_pairs)} pairs, "
                 f"{length_statistics(self.train_pairs)}; {self.cut['prompts']} prompt(s) cut on "
                 f"the left (--max-prompt-length), {self.cut['responses']} response(s) on the "
                 f"right (--seq-length); {len(self.dropped)} pair(s) dropped"]
        left = len(self.train_pairs) % config.global_batch_size
        if left and len(self.train_pairs) > config.global_batch_size:
            found.append(f"> {left} pair(s) of each epoch are not trained: the epoch's last, "
                         f"incomplete global batch (of {config.global_batch_size}) is dropped, "
                         "as Megatron-LM does; each epoch's permutation leaves out others")
        if self.dropped:
            found.append(f"warning: {len(self.dropped)} pair(s) dropped: chosen and rejected are "
                         f"the same tokens (first: {', '.join(self.dropped[:3])}); "
                         "--identical-pairs refuse stops on them instead")
        usable = self.usable_valid_pairs(config, dp_size)
        per_step = (config.micro_batch_size or 1) * dp_size
        if not self.valid_pairs:
            found.append("warning: no validation pairs (--valid-data-path or --valid-fraction): "
                         "no held-out metrics this run")
        elif usable == 0:
            found.append(f"warning: the validation set has {len(self.valid_pairs)} pair(s), fewer "
                         f"than one micro-batch per data-parallel rank ({per_step}): no "
                         "evaluation")
        elif usable < len(self.valid_pairs):
            why = (f"each of the {dp_size} data-parallel ranks evaluates as many pairs, as "
                   "expert parallelism needs" if config.batching.token_budget else
                   f"it uses whole micro-batches of {per_step} across the ranks")
            found.append(f"warning: {len(self.valid_pairs) - usable} of "
                         f"{len(self.valid_pairs)} validation pairs are left out of evaluation "
                         f"({why})")
        return found

    def check_resume(self, saved: checkpointing.TrainState | None, config: TrainConfig,
                     checkpoint) -> str | None:
        """Refuse to resume ``checkpoint`` on other data than it was trained on, unless
        --override-data (then the warning to print)."""
        if saved is None or saved.data_fingerprint in (None, self.fingerprint):
            return None
        if not config.override_data:
            raise DataError(f"--load {checkpoint} was trained on other data "
                            f"(fingerprint {saved.data_fingerprint}, now {self.fingerprint}:"
                            " the data's content, its split or columns, the tokenizer, "
                            "--seq-length, --max-prompt-length or the held-out split changed, or "
                            "this version of megatron_simpo tokenizes differently); "
                            "give --override-data to go on from its position "
                            f"({saved.consumed_samples} samples) in the new data")
        return (f"warning: --override-data: resuming {checkpoint} on other data than it was "
                f"trained on (fingerprint {saved.data_fingerprint}, now {self.fingerprint})")

    def plan(self, pairs: list[TokenizedPair], indices: list[int], config: TrainConfig,
             dp_size: int) -> BatchPlan:
        """How these pairs run on the data-parallel ranks (megatron_simpo.data.batching)."""
        return plan_global_batch(indices, [PairLengths.of(pairs[i]) for i in indices], dp_size=dp_size,
                                 micro_batch_size=config.micro_batch_size or 1,
                                 config=config.batching, seq_length=config.data.seq_length,
                                 multiple=self.padding_multiple,
                                 equal_counts=config.parallel.expert_model_parallel_size > 1)

    def collate(self, pairs: list[TokenizedPair], microbatch: Microbatch, config: TrainConfig,
                device, reference: torch.Tensor | None) -> PreferenceBatch:
        """One micro-batch as tensors on ``device``; packed rows carry their segments, in sbhd
        layout for the local layer spec and THD for Transformer Engine. ``reference``:
        [n_pairs_of_the_set, 2] summed reference log-probs, or None."""
        batch = collate_microbatch(pairs, microbatch, self.pad_id,
                                   thd=config.transformer_impl != "local")
        if reference is not None:  # fp32, as the reference pass computes them
            # [n, 2] (chosen, rejected) -> [2n] in the batch's row order (chosen, rejected, ...)
            batch = batch.with_reference(reference[list(microbatch.pairs)].reshape(-1).float())
        return batch.to(device)

    def train_microbatches(self, indices: list[int], config: TrainConfig, dp_rank: int,
                           dp_size: int, device) -> tuple[list[PreferenceBatch], BatchPlan]:
        """This rank's micro-batches of a global batch, and the plan of the whole batch."""
        plan = self.plan(self.train_pairs, indices, config, dp_size)
        return [self.collate(self.train_pairs, mb, config, device, self.train_reference)
                for mb in plan.ranks[dp_rank]], plan

    def usable_valid_pairs(self, config: TrainConfig, dp_size: int) -> int:
        """Validation pairs evaluated: all under a token budget, else whole micro-batches
        on every rank."""
        if config.batching.token_budget:
            if config.parallel.expert_model_parallel_size > 1:  # as many micro-batches each
                return len(self.valid_pairs) // dp_size * dp_size
            return len(self.valid_pairs) if len(self.valid_pairs) >= dp_size else 0
        chunk = config.micro_batch_size * dp_size
        return len(self.valid_pairs) // chunk * chunk

    def eval_microbatches(self, config: TrainConfig, dp_rank: int, dp_size: int, device
                          ) -> tuple[list[PreferenceBatch], list[tuple[int, ...]]]:
        """This rank's share of the validation pairs, laid out as the training batches are,
        and the validation indices of each micro-batch's pairs."""
        usable = self.usable_valid_pairs(config, dp_size)
        if usable == 0:
            return [], []
        plan = self.plan(self.valid_pairs, list(range(usable)), config, dp_size)
        mine = plan.ranks[dp_rank]
        return ([self.collate(self.valid_pairs, mb, config, device, self.valid_reference)
                 for mb in mine], [tuple(mb.pairs) for mb in mine])
