"""The training loop: data -> step -> log / evaluate / checkpoint, for SimPO or DPO."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_simpo import checkpointing, runtime
from megatron_simpo.config import TrainConfig
from megatron_simpo.data import (PairSampler, PreferenceBatch, TokenizedPair, collate_pairs,
                                 load_datasets, load_tokenizer, padded_length)
from megatron_simpo.flops import step_flops
from megatron_simpo.model import (ModelConfig, build_model, check_transformer_impl,
                                  enable_memory_lean_logprobs)
from megatron_simpo.optimizer import build_optimizer, finish_param_sync, wrap_with_ddp
from megatron_simpo.precision import check_fp8_support, padding_multiple
from megatron_simpo.step import evaluate, train_step


@dataclass
class TrainSummary:
    """What a run did, on every rank (tests and the demo read it)."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    iteration: int = 0


@dataclass(frozen=True)
class ModelSource:
    config: ModelConfig
    resume_from: Path | None
    weights_from: Path | None
    tokenizer_path: Path


def resolve_model_source(config: TrainConfig) -> ModelSource:
    """Which architecture, weights and tokenizer the run uses (before anything is built)."""
    resume = checkpointing.find_checkpoint(config.load, "--load") if config.load else None
    pretrained = (checkpointing.find_checkpoint(config.pretrained_checkpoint,
                                                "--pretrained-checkpoint")
                  if config.pretrained_checkpoint else None)
    if resume is not None:
        model_config = checkpointing.read_model_config(resume)
    elif pretrained is not None:
        model_config = checkpointing.read_model_config(pretrained)
    else:
        model_config = ModelConfig.from_hf_config(config.model_config_path)
    tokenizer = config.data.tokenizer_path
    if tokenizer is None:
        source = resume or pretrained
        tokenizer = source.parent / "tokenizer"
        if not tokenizer.is_dir():
            raise FileNotFoundError(f"no tokenizer next to {source}; give --tokenizer")
    if config.data.seq_length > model_config.max_position_embeddings:
        raise ValueError(f"--seq-length ({config.data.seq_length}) exceeds the model's maximum "
                         f"sequence length ({model_config.max_position_embeddings})")
    return ModelSource(model_config, resume, pretrained, Path(tokenizer))


def _collate_shard(pairs: list[TokenizedPair], indices: list[int], length: int,
                   pad_id: int, device) -> PreferenceBatch:
    return collate_pairs([pairs[i] for i in indices], length, pad_id).to(device)


def _pair_tokens(pairs: list[TokenizedPair], indices: list[int]) -> int:
    return sum(2 * len(pairs[i].prompt) + len(pairs[i].chosen) + len(pairs[i].rejected) - 2
               for i in indices)


def _pair_flops(config: ModelConfig, pairs: list[TokenizedPair], indices: list[int]) -> int:
    """Model FLOPs of a training step over these pairs (padding excluded; see flops.py)."""
    rows = [len(pairs[i].prompt) + len(response) - 1
            for i in indices for response in (pairs[i].chosen, pairs[i].rejected)]
    scored = sum(len(pairs[i].chosen) + len(pairs[i].rejected) for i in indices)
    return step_flops(config, rows, scored)


class MetricsWriter:
    """Rank 0 writes metrics.jsonl (and TensorBoard events when asked and installed)."""

    def __init__(self, config: TrainConfig, rank: int, resuming: bool):
        self.active = rank == 0
        self.path = Path(config.save) / "metrics.jsonl" if config.save and self.active else None
        self.tensorboard = None
        if config.tensorboard_dir and self.active:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError("--tensorboard-dir needs the tensorboard package "
                                   "(pip install tensorboard)") from error
            self.tensorboard = SummaryWriter(config.tensorboard_dir)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resuming:  # a fresh run starts a fresh file; a resumed one appends
                self.path.write_text("")

    def write(self, iteration: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        if self.path:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"iteration": iteration, **values}) + "\n")
        if self.tensorboard:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, iteration)
            self.tensorboard.flush()


def _log_line(iteration: int, total: int, consumed: int, lr: float, metrics: dict,
              grad_norm, elapsed: float, tokens: int, tflops_per_gpu: float) -> str:
    norm = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
    return (f" iteration {iteration:8d}/{total:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {1000 * elapsed:.1f} | "
            f"throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.1f} | learning rate: {lr:.3E} | "
            f"loss: {metrics['loss']:.6E} | reward accuracy: {metrics['rewards/accuracies']:.3f} | "
            f"reward margin: {metrics['rewards/margins']:.4f} | grad norm: {norm} | "
            f"tokens/s: {tokens / max(elapsed, 1e-9):.0f} |")


def prepare(config: TrainConfig) -> tuple[ModelSource, int]:
    """Every check that can fail before training: model source, world layout, batch sizes.

    Returns the model source and the number of micro-batches per step and rank.
    """
    source = resolve_model_source(config)
    _, world_size, _ = runtime.read_world()
    config.parallel.validate(world_size, source.config)
    if config.fp8 is not None:
        config.fp8.check_model(source.config.num_layers,
                               config.parallel.pipeline_model_parallel_size)
    check_transformer_impl(config.transformer_impl)  # then what the machine has
    if config.fp8 is not None:
        check_fp8_support(config.fp8)
    return source, config.check_world(world_size)


def run(config: TrainConfig, prepared: tuple[ModelSource, int] | None = None) -> TrainSummary:
    """Train as configured; call on every rank (under torchrun or spawned)."""
    source, num_microbatches = prepared or prepare(config)
    rank, _, _ = runtime.read_world()
    env = runtime.initialize(config.parallel, seed=config.seed, model_config=source.config)
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    say = print if rank == 0 else (lambda *a, **k: None)
    tokenizer = load_tokenizer(source.tokenizer_path)
    if len(tokenizer) > source.config.vocab_size:
        raise ValueError(f"tokenizer {source.tokenizer_path} has {len(tokenizer)} tokens, more "
                         f"than the model's vocabulary ({source.config.vocab_size})")
    train_pairs, valid_pairs = load_datasets(config.data, tokenizer, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampler = PairSampler(len(train_pairs), config.global_batch_size, config.seed)
    total_iters = config.train_iters or config.train_epochs * sampler.batches_per_epoch
    say(f"> {len(train_pairs)} training pairs, {len(valid_pairs)} validation pairs, "
        f"{total_iters} iterations of {config.global_batch_size} pairs "
        f"({num_microbatches} micro-batches of {config.micro_batch_size} per rank, "
        f"DP={env.data_parallel_size})")

    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = build_model(source.config, config.parallel, transformer_impl=config.transformer_impl,
                        params_dtype=dtype, **config.transformer_overrides())
    if source.resume_from is None and source.weights_from is not None:
        checkpointing.load_checkpoint(source.weights_from, model, model_config=source.config)
    if config.logprob_chunk_size:
        enable_memory_lean_logprobs(model, config.logprob_chunk_size)
    model = wrap_with_ddp(model, config.optimizer)
    optimizer = build_optimizer([model], config.optimizer, bf16=config.bf16)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=config.optimizer.lr, min_lr=config.optimizer.min_lr,
        lr_warmup_steps=int(config.lr_warmup_fraction * total_iters), lr_decay_steps=total_iters,
        lr_decay_style=config.lr_decay_style, start_wd=config.optimizer.weight_decay,
        end_wd=config.optimizer.weight_decay, wd_incr_steps=total_iters, wd_incr_style="constant")
    reference = None
    if config.loss.needs_reference:
        # Same precision as the policy (FP8 included); nothing to recompute without gradients.
        reference = build_model(source.config, config.parallel,
                                transformer_impl=config.transformer_impl, params_dtype=dtype,
                                **(config.fp8.transformer_overrides() if config.fp8 else {}))
        checkpointing.load_checkpoint(source.weights_from, reference, model_config=source.config)
        reference.eval().requires_grad_(False)
        if config.logprob_chunk_size:
            enable_memory_lean_logprobs(reference, config.logprob_chunk_size)

    iteration, consumed = 0, 0
    if source.resume_from is not None:
        state = checkpointing.load_checkpoint(source.resume_from, model.module, optimizer,
                                              scheduler, model_config=source.config)
        iteration, consumed = state.iteration, state.consumed_samples
        say(f"> resumed from {source.resume_from} at iteration {iteration}")

    dp_rank, dp_size = ps.get_data_parallel_rank(), env.data_parallel_size
    writer = MetricsWriter(config, rank, resuming=source.resume_from is not None)
    summary = TrainSummary(iteration=iteration)
    vocab = source.config.vocab_size
    eval_batches = _eval_microbatches(valid_pairs, config, dp_rank, dp_size, pad_id, env.device)

    def run_eval(at: int) -> None:
        if not eval_batches:
            return
        metrics = evaluate([model], eval_batches, config.loss, vocab_size=vocab,
                           reference_model=reference)
        metrics = {f"eval/{name}": value for name, value in metrics.items()}
        summary.evals.append((at, metrics))
        writer.write(at, metrics)
        say(f" validation at iteration {at:8d} | " +
            " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()) + " |")

    run_eval(iteration)
    while iteration < total_iters:
        start = time.perf_counter()
        indices = sampler.global_batch(consumed)
        length = padded_length([train_pairs[i] for i in indices], config.data.seq_length,
                               padding_multiple(config.sequence_alignment))
        shard = _collate_shard(train_pairs, PairSampler.shard(indices, dp_rank, dp_size), length,
                               pad_id, env.device)
        lr = optimizer.param_groups[0]["lr"]
        result = train_step([model], optimizer, shard.split(num_microbatches), config.loss,
                            vocab_size=vocab, reference_model=reference)
        scheduler.step(increment=1)
        iteration += 1
        consumed += config.global_batch_size
        elapsed = time.perf_counter() - start
        summary.losses.append(result.metrics["loss"])
        summary.iteration = iteration
        if iteration % config.log_interval == 0 or iteration == total_iters:
            tokens = _pair_tokens(train_pairs, indices)
            # Model FLOPs of SimPO's work (DPO's reference pass not counted) per rank.
            tflops = _pair_flops(source.config, train_pairs, indices) / elapsed / 1e12 / env.world_size
            writer.write(iteration, {**result.metrics, "learning_rate": lr,
                                     "grad_norm": result.grad_norm, "consumed_samples": consumed,
                                     "iteration_time_s": elapsed, "tokens_per_second": tokens / elapsed,
                                     "tflops_per_gpu": tflops})
            say(_log_line(iteration, total_iters, consumed, lr, result.metrics, result.grad_norm,
                          elapsed, tokens, tflops))
        if config.eval_interval and iteration % config.eval_interval == 0 and iteration != total_iters:
            run_eval(iteration)
        if config.save and config.save_interval and iteration % config.save_interval == 0 \
                and iteration != total_iters:
            _save(config, iteration, consumed, model, optimizer, scheduler, source)
    if not summary.evals or summary.evals[-1][0] != iteration:
        run_eval(iteration)
    if config.save:
        _save(config, iteration, consumed, model, optimizer, scheduler, source)
    if len(summary.evals) > 1:
        (first_at, first), (last_at, last) = summary.evals[0], summary.evals[-1]
        key = "eval/rewards/accuracies"
        say(f"> held-out reward accuracy: {first[key]:.3f} at iteration {first_at} -> "
            f"{last[key]:.3f} at iteration {last_at}")
    return summary


def _save(config, iteration, consumed, model, optimizer, scheduler, source: ModelSource) -> None:
    finish_param_sync([model])
    source_dir = source.weights_from or source.resume_from
    source_assets = checkpointing.checkpoint_assets(source_dir) if source_dir else {}
    path = checkpointing.save_checkpoint(
        config.save, checkpointing.TrainState(iteration, consumed), model.module, optimizer,
        scheduler, source.config, assets={**source_assets, "tokenizer": source.tokenizer_path})
    if dist.get_rank() == 0:
        print(f"> saved checkpoint {path}")


def _eval_microbatches(pairs: list[TokenizedPair], config: TrainConfig, dp_rank: int,
                       dp_size: int, pad_id: int, device) -> list[PreferenceBatch]:
    """This rank's share of the validation pairs as equal micro-batches (remainder dropped)."""
    chunk = config.micro_batch_size * dp_size
    usable = len(pairs) // chunk * chunk
    if usable == 0:
        return []
    length = padded_length(pairs[:usable], config.data.seq_length,
                           padding_multiple(config.sequence_alignment))
    indices = PairSampler.shard(list(range(usable)), dp_rank, dp_size)
    batch = _collate_shard(pairs, indices, length, pad_id, device)
    return batch.split(len(indices) // config.micro_batch_size)


def main(argv=None) -> None:
    """CLI entry point: bad flags and inputs end with ``error: ...`` and exit code 2."""
    import sys

    from megatron_simpo.arguments import parse_args

    config = parse_args(argv)
    try:
        prepared = prepare(config)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"train_simpo: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run(config, prepared)
    finally:
        runtime.shutdown()
