"""What a resume may change: the rules between a checkpoint's run settings and the command line.

Every checkpoint records the settings of its run (:func:`settings_record`). A resume (--load)
is compared with them before anything is built (``run_setup.prepare``), and again once the run
length in iterations is known (``Checkpointer.resume``: ``--train-epochs`` over the data):

* the learning-rate schedule, ``--lr``, ``--min-lr``, ``--lr-decay-style``,
  ``--lr-warmup-fraction``, ``--weight-decay``, Adam's ``--adam-beta1``, ``--adam-beta2`` and
  ``--adam-eps``, and the run length (``--train-iters`` /
  ``--train-epochs`` and the iterations they amount to): a difference is refused unless

  - ``--override-opt-param-scheduler``: the command line's schedule, built for the new run
    length, at the checkpoint's step count ``n``: step ``n + 1`` runs at ``lr(n)`` of the new
    schedule (Megatron-Core's ``OptimizerParamScheduler.get_lr``);
  - ``--use-checkpoint-opt-param-scheduler``: the checkpoint's schedule; past its last step the
    rate stays at its ``--min-lr``, and a longer run is refused when that is 0 (its extra
    iterations would change nothing);
* ``--seed`` (the data order): refused unless ``--override-data``, which goes on from the
  checkpoint's position (consumed samples) in the new seed's order;
* ``--global-batch-size``: refused, no flag accepts it (the position, the epoch order and the
  schedule all count in global batches): a new run starts from the checkpoint with
  ``--pretrained-checkpoint``;
* the objective (``--algorithm``, ``--loss-type``, ``--beta``, the margin gamma, and the other
  loss settings, compared as the loss uses them: ``--beta`` left to its default equals the
  default given): refused likewise, since one run optimises one objective (its metrics and
  its checkpoints' optimizer state belong to it).

How a global batch is split (``--micro-batch-size``, ``--max-tokens-per-microbatch``, the
parallel layout: TP, PP, CP, DP) may change: the same pairs make the same step.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_simpo.checkpoint.layout import TrainState, checkpoint_fingerprint
from megatron_simpo.training.config import TrainConfig

SCHEDULE_FIELDS = ("lr", "min_lr", "lr_decay_style", "lr_warmup_fraction", "weight_decay",
                   "adam_beta1", "adam_beta2", "adam_eps")
"""OptimizerSettings fields of the learning-rate schedule (the checkpoint's scheduler holds
them) and Adam's settings (its param groups hold them: loading the optimizer state restores
the checkpoint's). Records from before 2026-11-29 lack Adam's, which are then not compared."""


class ResumeError(ValueError):
    """A resume that contradicts its checkpoint; the message names each difference (old -> new)
    and the flag that accepts it."""


def command_line_schedule(config: TrainConfig, total_iters: int) -> dict:
    """The schedule the command line asks for: its settings and the iterations it spans."""
    return {**{name: getattr(config.optimizer, name) for name in SCHEDULE_FIELDS},
            "iterations": total_iters}


def objective(config: TrainConfig) -> dict:
    """The objective the loss optimises, each setting as the loss uses it, by its flag."""
    loss = config.loss
    return {"--algorithm": loss.algorithm, "--loss-type": loss.loss_type, "--beta": loss.beta,
            "--simpo-gamma": loss.margin, "--label-smoothing": loss.label_smoothing,
            "--sft-weight": loss.sft_weight, "--length-normalization": loss.normalize_length,
            "--orpo-lambda": loss.orpo_lambda, "--rdpo-alpha": loss.rdpo_alpha,
            "--slic-delta": loss.slic_delta,
            # a mixture-of-experts model's load-balancing term and which tokens its experts take
            "--moe-aux-loss-coeff": config.moe.moe_aux_loss_coeff,
            "--moe-expert-capacity-factor": config.moe.moe_expert_capacity_factor}


def _floats(*values) -> bool:
    return all(isinstance(v, float) for v in values)


def _same(old, new) -> bool:
    """Equal, floats to rounding (a margin given as gamma or as beta x ratio)."""
    return math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-12) if _floats(old, new) else old == new


def settings_record(config: TrainConfig, total_iters: int, schedule: dict,
                    reference: dict | None = None) -> dict:
    """What a checkpoint records of its run: the ``schedule`` in effect (see
    :func:`effective_schedule`), the run length as given and in iterations, the seed, the
    global batch size, the objective, and the reference model (dpo, ipo, rdpo: ``reference``,
    its :func:`reference_record`)."""
    return {"schedule": dict(schedule), "train_iters": config.train_iters,
            "train_epochs": config.train_epochs, "total_iters": total_iters,
            "seed": config.seed, "global_batch_size": config.global_batch_size,
            "objective": objective(config), "state_layout": state_layout(config),
            "reference": reference}


def reference_record(config: TrainConfig, reference: Path | None) -> dict | None:
    """The reference model a run's loss compares with (None without one): its checkpoint and
    fingerprint (``checkpoint.layout.checkpoint_fingerprint``)."""
    if not config.loss.needs_reference or reference is None:
        return None
    return {"checkpoint": str(reference), "fingerprint": checkpoint_fingerprint(reference)}


def state_layout(config: TrainConfig) -> dict:
    """The settings that decide which tensors a checkpoint's optimizer state holds (fp32 master
    weights beside bf16 ones; the distributed optimizer's sharded state), by their flag."""
    return {"--bf16": config.bf16,
            "--use-distributed-optimizer": config.optimizer.use_distributed_optimizer,
            # a frozen router has no optimizer state
            "--freeze-moe-router": config.moe.freeze_moe_router}


def effective_schedule(config: TrainConfig, saved: TrainState | None, total_iters: int) -> dict:
    """The schedule the run trains on: the command line's for a new run or with
    --override-opt-param-scheduler, else the checkpoint's (its record; loading the scheduler
    keeps the checkpoint's values, and :func:`check_resume` has refused a command line that
    differs without --use-checkpoint-opt-param-scheduler)."""
    if (not config.optimizer.override_opt_param_scheduler and saved is not None
            and saved.settings is not None):
        return dict(saved.settings["schedule"])
    return command_line_schedule(config, total_iters)


def _length(train_iters: int | None, train_epochs: int | None) -> tuple[str, int]:
    if train_iters is not None:
        return "--train-iters", train_iters
    return "--train-epochs", train_epochs


def schedule_differences(saved: dict, config: TrainConfig, total_iters: int | None) -> list[str]:
    """``--flag old -> new`` for each schedule setting and the run length that differ from
    the checkpoint's record (the run length in iterations only when ``total_iters`` is known)."""
    schedule, optimizer = saved["schedule"], config.optimizer
    found = [f"--{name.replace('_', '-')} {schedule[name]} -> {getattr(optimizer, name)}"
             for name in SCHEDULE_FIELDS
             if name in schedule and schedule[name] != getattr(optimizer, name)]
    (old_flag, old), (new_flag, new) = (_length(saved["train_iters"], saved["train_epochs"]),
                                        _length(config.train_iters, config.train_epochs))
    if old_flag == new_flag and old != new:
        found.append(f"{new_flag} {old} -> {new}")
    elif old_flag != new_flag:
        found.append(f"{old_flag} {old} -> {new_flag} {new}")
    elif total_iters is not None and total_iters != saved["total_iters"]:
        found.append(f"run length {saved['total_iters']} -> {total_iters} iterations "
                     f"({new_flag} {new} over other data)")
    return found


def check_resume(config: TrainConfig, saved: TrainState | None, checkpoint: Path,
                 total_iters: int | None = None, reference: dict | None = None) -> list[str]:
    """Refuse (:class:`ResumeError`, one line) a resume of ``checkpoint`` whose command line
    differs from the run it saved, unless a flag accepts each difference; returns the lines to
    print about the accepted ones. ``total_iters``: the new run length in iterations, when known;
    ``reference``: the :func:`reference_record` of the --pretrained-checkpoint now given.
    Checkpoints without a record (written before it was kept) are not checked."""
    if saved is None or saved.settings is None:
        return []
    record, optimizer = saved.settings, config.optimizer
    refused, notes = [], []
    schedule = schedule_differences(record, config, total_iters)
    if schedule:
        listed = ", ".join(schedule)
        if optimizer.override_opt_param_scheduler:
            notes.append(f"> --override-opt-param-scheduler: the command line's learning-rate "
                         f"schedule ({listed}) from the checkpoint's step count")
        elif optimizer.use_checkpoint_opt_param_scheduler:
            kept = ", ".join(f"--{name.replace('_', '-')} {record['schedule'][name]}"
                             for name in SCHEDULE_FIELDS if name in record["schedule"])
            notes.append(f"warning: --use-checkpoint-opt-param-scheduler: the checkpoint's "
                         f"learning-rate schedule is kept ({kept}, over "
                         f"{record['schedule']['iterations']} steps), not the command line's "
                         f"({listed})")
        else:
            refused.append(f"{listed} (give --override-opt-param-scheduler to train on the "
                           "command line's learning-rate schedule, or "
                           "--use-checkpoint-opt-param-scheduler to keep the checkpoint's)")
    if record["seed"] != config.seed:
        change = f"--seed {record['seed']} -> {config.seed}"
        if config.override_data:
            notes.append(f"warning: --override-data: {change}: going on from the checkpoint's "
                         f"position ({saved.consumed_samples} samples) in the new seed's order")
        else:
            refused.append(f"{change} (it orders the data: give --override-data to go on from "
                           f"the checkpoint's position, {saved.consumed_samples} samples, in "
                           "the new order)")
    if record["global_batch_size"] != config.global_batch_size:
        refused.append(f"--global-batch-size {record['global_batch_size']} -> "
                       f"{config.global_batch_size} (no flag resumes at another global batch "
                       "size: start a new run from the checkpoint with "
                       f"--pretrained-checkpoint {checkpoint})")
    if "objective" in record:  # recorded since 2026-11-28
        now = objective(config)
        changed = [f"{flag} {old:g} -> {now.get(flag):g}" if _floats(old, now.get(flag))
                   else f"{flag} {old} -> {now.get(flag)}"
                   for flag, old in record["objective"].items() if not _same(old, now.get(flag))]
        if changed:
            refused.append(f"{', '.join(changed)} (a run optimises one objective: start a new "
                           f"run from the checkpoint with --pretrained-checkpoint {checkpoint})")
    for flag, old in record.get("state_layout", {}).items():  # recorded since this check
        now = state_layout(config).get(flag)
        if old != now:
            refused.append(f"{flag} {'on' if old else 'off'} -> {'on' if now else 'off'} (the "
                           "checkpoint's optimizer state is laid out for the first: resume with "
                           f"it, or start a new run from --pretrained-checkpoint {checkpoint})")
    was = record.get("reference")  # recorded since 2026-11-29
    if was is not None and config.loss.needs_reference:
        if reference is None or reference["fingerprint"] != was["fingerprint"]:
            given = None if reference is None else reference["checkpoint"]
            refused.append(f"--pretrained-checkpoint {was['checkpoint']} -> {given} (the "
                           "reference model: its weights differ, and a run compares with one "
                           "reference; resume with the run's)")
    if refused:
        raise ResumeError(f"--load {checkpoint} contradicts the command line: "
                          + "; ".join(refused))
    if total_iters is not None:
        notes += _check_length(config, saved, checkpoint, total_iters, bool(schedule))
    return notes


def _check_length(config: TrainConfig, saved: TrainState, checkpoint: Path, total_iters: int,
                  schedule_changed: bool) -> list[str]:
    """A run length the checkpoint can go on to: not before its iteration, and with the
    checkpoint's schedule, not past its end at a learning rate of 0."""
    flag, value = _length(config.train_iters, config.train_epochs)
    if total_iters < saved.iteration:
        raise ResumeError(f"--load {checkpoint} is at iteration {saved.iteration}, past the "
                          f"run's {total_iters} iterations ({flag} {value})")
    schedule = saved.settings["schedule"]
    if not (config.optimizer.use_checkpoint_opt_param_scheduler and schedule_changed
            and total_iters > schedule["iterations"]):
        return []
    first = max(schedule["iterations"], saved.iteration) + 1
    if schedule["min_lr"] == 0:
        raise ResumeError(f"--use-checkpoint-opt-param-scheduler: the checkpoint's schedule "
                          f"ends after {schedule['iterations']} steps at --min-lr 0, so "
                          f"iterations {first}-{total_iters} would train at learning rate 0; "
                          "give --override-opt-param-scheduler for a schedule over the new "
                          "run length")
    return [f"> iterations {first}-{total_iters} run past the checkpoint's schedule at its "
            f"final rate, --min-lr {schedule['min_lr']}"]
