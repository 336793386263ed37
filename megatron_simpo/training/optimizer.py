"""Megatron DistributedDataParallel wrapping, Megatron-Core's (distributed) Adam optimizer and
its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

LrDecayStyle = Literal["cosine", "linear", "constant"]
LR_DECAY_STYLES = get_args(LrDecayStyle)


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """Adam with decoupled weight decay and a warmup + decay schedule, as Megatron-LM configures
    them."""

    lr: float = 1e-6
    """Peak learning rate (SimPO's Llama-3-8B-Instruct recipe: 1e-6)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: LrDecayStyle = "cosine"
    """Decay from the peak to the minimum over the run after warmup."""
    lr_warmup_fraction: float = 0.1
    """Share of the run spent warming up linearly from 0, in [0, 1): ceil(iterations x
    fraction) steps (all but the last at most), as Hugging Face's Trainer rounds warmup_ratio;
    the first step runs at rate 0."""
    weight_decay: float = 0.0
    """Decoupled weight decay (SimPO's released recipes use none), on every weight but biases
    and 1-D ones (norms, q/k norms): Megatron-LM's rule, the same weights Hugging Face's Trainer
    leaves undecayed (biases and norms, by name) on the architectures here."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this (0 disables)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state and fp32 master weights over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Reduce gradient buckets over data-parallel ranks while the backward pass still runs."""
    overlap_param_gather: bool = False
    """All-gather the distributed optimizer's updated parameters during the next forward pass,
    bucket by bucket (needs use_distributed_optimizer and overlap_grad_reduce)."""
    override_opt_param_scheduler: bool = False
    """Resume (--load) on the command line's learning-rate schedule (--lr, --min-lr,
    --lr-decay-style, --lr-warmup-fraction, --weight-decay, run length) where it differs from
    the checkpoint's: the run goes on from the checkpoint's step count in the new schedule."""
    use_checkpoint_opt_param_scheduler: bool = False
    """Resume (--load) on the checkpoint's learning-rate schedule where the command line's
    differs; iterations past its end run at its final rate (its --min-lr; refused if 0)."""

    def __post_init__(self) -> None:
        """Every number finite; Adam's first step, ``lr / (1 - adam_beta1)``, representable in
        fp32 (the optimizer's arithmetic; PyTorch fails mid-step on an overflow)."""
        for name in ("lr", "min_lr", "lr_warmup_fraction", "weight_decay", "adam_beta1",
                     "adam_beta2", "adam_eps", "clip_grad"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got "
                                 f"{getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for flag, beta in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {beta}")
        if not self.adam_eps > 0:
            raise ValueError(f"--adam-eps must be > 0, got {self.adam_eps}")
        if self.lr / (1.0 - self.adam_beta1) > torch.finfo(torch.float32).max:
            raise ValueError(f"--lr {self.lr} is out of range: Adam's first step "
                             f"lr / (1 - adam_beta1) = {self.lr / (1.0 - self.adam_beta1):.3g} "
                             f"overflows fp32 (max {torch.finfo(torch.float32).max:.3g})")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0, got {self.clip_grad}")
        if not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {self.lr_warmup_fraction}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {', '.join(LR_DECAY_STYLES)}, "
                             f"got {self.lr_decay_style!r}")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("give --override-opt-param-scheduler (the command line's schedule) "
                             "or --use-checkpoint-opt-param-scheduler (the checkpoint's), not "
                             "both")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.overlap_param_gather and not (self.use_distributed_optimizer
                                              and self.overlap_grad_reduce):
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer and "
                             "--overlap-grad-reduce")


def wrap_with_ddp(model: torch.nn.Module, settings: OptimizerSettings):
    """Megatron ``DistributedDataParallel`` with an fp32 contiguous gradient buffer.

    ``average_in_collective=False`` because the step normalises by the global number of pairs
    (``calculate_per_token_loss``), not by the data-parallel size.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=settings.overlap_grad_reduce,
        overlap_param_gather=settings.overlap_param_gather,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: list, settings: OptimizerSettings, *, bf16: bool = False):
    """Megatron-Core's Adam over the DDP-wrapped chunks (distributed when the settings say so).

    Also installs the hooks Megatron's schedules call: gradient finalisation (DP all-reduce,
    tied-embedding sync, scaling by the global pair count) and the loss scaler.
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
        chunk.config.no_sync_func = chunk.no_sync
        if settings.overlap_grad_reduce:  # the schedules start each bucket's reduction early
            chunk.config.grad_sync_func = chunk.start_grad_sync
    return optimizer


_SCHEDULE_HOOKS = ("finalize_model_grads_func", "grad_scale_func", "no_sync_func",
                   "grad_sync_func")


def remove_schedule_hooks(model_chunks: list) -> None:
    """Undo what :func:`build_optimizer` installed on the models' configs (the optimizer's
    ``scale_loss`` among them), so that a finished run's model no longer holds its optimizer."""
    for chunk in model_chunks:
        for hook in _SCHEDULE_HOOKS:
            setattr(chunk.config, hook, None)


def finish_param_sync(model_chunks: list) -> None:
    """Complete the parameters on every rank now (``--overlap-param-gather``).

    With overlapped gathering, the shards other data-parallel ranks updated arrive during the
    next forward pass. Anything that reads the weights outside a forward pass (saving a
    checkpoint, exporting, handing the model back) calls this first; the next forward then finds
    its buckets already gathered. A no-op without overlapped gathering.
    """
    for chunk in model_chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def warmup_iters(settings: OptimizerSettings, total_iters: int) -> int:
    """Warm-up steps of a run of ``total_iters`` optimizer steps: ``ceil(total_iters x
    lr_warmup_fraction)``, Hugging Face Trainer's rounding of ``warmup_ratio``
    (``TrainingArguments.get_warmup_steps``: the same float product, rounded up), so that a
    recipe ported from TRL runs at the rate of ``get_cosine_schedule_with_warmup`` at every
    step. At most ``total_iters - 1`` (Megatron-Core's schedule ends its warm-up before its
    decay): a one-step run steps at ``lr``. Megatron-LM counts the warm-up in samples instead,
    unrounded (``fraction x iterations`` steps)."""
    return min(math.ceil(total_iters * settings.lr_warmup_fraction), max(total_iters - 1, 0))


def build_scheduler(optimizer, settings: OptimizerSettings, total_iters: int):
    """Megatron-Core's ``OptimizerParamScheduler``: linear warmup from 0 over
    :func:`warmup_iters` steps, then decay to ``min_lr`` at the last iteration; constant weight
    decay. Stepped once per optimizer step (after it: step ``k``, counted from 0, runs at the
    rate after ``k`` steps, ``lr x k / warmup`` during the warm-up, as Hugging Face's
    schedules); saved in checkpoints.

    Loading a checkpoint's schedule keeps the checkpoint's values (Megatron-Core's
    ``use_checkpoint_opt_param_scheduler``), or with ``override_opt_param_scheduler`` these
    settings' values, at the checkpoint's step count (``training.resume`` decides which a
    resume may use)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=settings.lr, min_lr=settings.min_lr,
        lr_warmup_steps=warmup_iters(settings, total_iters), lr_decay_steps=total_iters,
        lr_decay_style=settings.lr_decay_style, start_wd=settings.weight_decay,
        end_wd=settings.weight_decay, wd_incr_steps=total_iters, wd_incr_style="constant",
        override_opt_param_scheduler=settings.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not settings.override_opt_param_scheduler)


def override_loaded_schedule(optimizer, scheduler, settings: OptimizerSettings) -> None:
    """``--override-opt-param-scheduler`` after a checkpoint is loaded: the rates are the
    settings' at the loaded step count.

    Megatron-Core's param groups carry their own ``max_lr`` / ``min_lr``, which ``get_lr`` reads
    before the scheduler's, and Adam's ``betas`` and ``eps``; loading the optimizer state
    restores the checkpoint's: they are set to the settings' here and the current rate
    recomputed (``step(0)``).
    """
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = settings.lr, settings.min_lr
        if "betas" in group:
            group["betas"] = (settings.adam_beta1, settings.adam_beta2)
            group["eps"] = settings.adam_eps
    scheduler.step(increment=0)
