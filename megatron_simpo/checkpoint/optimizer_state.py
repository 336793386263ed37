"""Loading a checkpoint's optimizer state into Megatron-Core's optimizers: what its loaders
need here and do not do themselves (torch Adam's ``step``, chained MoE optimizers, param groups
paired by their schedule from megatron-core 0.19)."""

from __future__ import annotations

import torch

from megatron_simpo.checkpoint.layout import CheckpointError


def torch_optimizers(optimizer) -> list:
    """The torch optimizers under a Megatron (possibly chained) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [inner.optimizer for inner in chained if getattr(inner, "optimizer", None) is not None]


def materialize_adam_state(optimizer) -> None:
    """Give torch's Adam/AdamW zero state (step 0) before a checkpoint is loaded into it.

    Megatron-Core's loading path reads the optimizer state's structure, including each param's
    ``step``; its own state initialiser creates only the moments for torch's Adam (used where
    neither Transformer Engine nor Apex is installed, e.g. on CPU). The values are overwritten
    by the checkpoint; parameters are not touched.
    """
    for inner in torch_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                state.setdefault("step", torch.tensor(0.0))
                state.setdefault("exp_avg", torch.zeros_like(param, memory_format=torch.preserve_format))
                state.setdefault("exp_avg_sq", torch.zeros_like(param, memory_format=torch.preserve_format))


def _load_one_optimizer_state(inner, state_dict: dict) -> None:
    """The workaround of :func:`load_optimizer_state` for one (not chained) optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    torch_state = inner.optimizer.state if getattr(inner, "optimizer", None) is not None else {}
    state_dict, saved_schedules = _matched_param_groups(inner, state_dict)
    if (isinstance(inner, DistributedOptimizer)
            and state_dict.get("param_state_sharding_type") == "fully_reshardable"
            and any("step" in s for s in torch_state.values())):
        state_dict = dict(state_dict)
        param_state = state_dict.pop("param_state")
        state_dict.pop("param_state_sharding_type")
        inner.load_state_dict(state_dict)
        steps = {param: state.pop("step") for param, state in inner.optimizer.state.items()
                 if "step" in state}
        try:
            inner.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in steps.items():
                inner.optimizer.state[param]["step"] = step
    else:
        inner.load_state_dict(state_dict)
    if saved_schedules:
        structure = _structural_keys()
        for group in inner.optimizer.param_groups:
            _set_schedule(group, saved_schedules[_identifier(group, structure)])


SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
"""Param-group keys of the learning-rate and weight-decay schedule. From megatron-core 0.19
every optimizer pairs a checkpoint's param groups with the run's by them too, so a resume on
another schedule (--override-opt-param-scheduler) would find no saved group to load."""


def _structural_keys() -> tuple[str, ...]:
    """The keys Megatron-Core pairs param groups by, less the schedule's."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    return tuple(key for key in megatron_optimizer.param_group_identifier_keys
                 if key not in SCHEDULE_KEYS)


def _identifier(group: dict, keys: tuple[str, ...]) -> tuple:
    # NeMo spells lr_mult / wd_mult pre_lr_mult / pre_wd_mult (Megatron-Core reads both)
    return tuple(group.get(key, group.get(f"pre_{key}")) for key in keys)


def _schedule(group: dict) -> dict:
    """A param group's own schedule values (the keys it has: a missing one is the scheduler's)."""
    return {key: group[key] for key in SCHEDULE_KEYS if key in group}


def _set_schedule(group: dict, schedule: dict) -> dict:
    """``group`` with exactly ``schedule``'s schedule keys (the others removed)."""
    for key in SCHEDULE_KEYS:
        group.pop(key, None)
    group.update(schedule)
    return group


def _matched_param_groups(inner, state_dict: dict) -> tuple[dict, dict | None]:
    """The state dict with each saved param group's schedule keys set to those of the run's
    group of the same structure, so that Megatron-Core pairs them whatever the schedule, and
    the saved groups' schedule values by structure (restored after the load, as megatron-core
    0.16 leaves them: the checkpoint's schedule; ``optimizer.override_loaded_schedule`` then
    sets the command line's where asked). Unchanged where the pairing ignores the schedule."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    if (not set(SCHEDULE_KEYS) & set(megatron_optimizer.param_group_identifier_keys)
            or getattr(inner, "optimizer", None) is None):
        return state_dict, None
    # where the torch optimizer's state dict is: under "optimizer" (the distributed and the
    # mixed-precision optimizers; "optimizer_state_dict" in old checkpoints), or the whole of
    # it (the fp32 optimizer)
    key = next((k for k in ("optimizer", "optimizer_state_dict")
                if isinstance(state_dict.get(k), dict) and "param_groups" in state_dict[k]), None)
    holder = state_dict if key is None else state_dict[key]
    if "param_groups" not in holder:
        return state_dict, None
    structure = _structural_keys()
    current = {_identifier(g, structure): g for g in inner.optimizer.param_groups}
    saved_groups = holder["param_groups"]
    saved = {_identifier(g, structure): _schedule(g) for g in saved_groups}
    if len(saved) != len(saved_groups) or set(saved) != set(current):
        return state_dict, None  # not one-to-one by structure: leave the pairing to Megatron
    holder = {**holder, "param_groups": [
        _set_schedule(dict(g), _schedule(current[_identifier(g, structure)]))
        for g in saved_groups]}
    return (holder if key is None else {**state_dict, key: holder}), saved


def load_optimizer_state(optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict``, working around a megatron-core 0.16.1 bug with torch Adam.

    With torch's Adam (no Transformer Engine/Apex, e.g. on CPU) every parameter's optimizer
    state holds a ``step``; the distributed optimizer's "fully_reshardable" loader copies every
    state key from the checkpoint but deliberately skips ``step`` there (it comes from the
    param groups), so it fails with KeyError 'step'. Here the param groups (and step) are
    loaded first and the per-parameter tensors then loaded with ``step`` set aside. A
    mixture-of-experts model's optimizer chains two (dense and expert parameters, each over
    its own data-parallel group): each gets its part.
    """
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained and len(chained) > 1:  # MoE: dense and expert parameters, one state dict each
        if len(chained) != len(state_dict):
            raise CheckpointError(f"the checkpoint holds {len(state_dict)} optimizer states, "
                                  f"this run has {len(chained)}")
        for inner, state in zip(chained, (v for _, v in sorted(state_dict.items()))):
            _load_one_optimizer_state(inner, state)
        optimizer._synchronize_steps()
    else:
        _load_one_optimizer_state((chained or [optimizer])[0], state_dict)
    # Megatron restores torch Adam's step as ONE tensor shared by every parameter; torch then
    # increments it once per parameter per step, corrupting the bias correction. Unshare it.
    for torch_optimizer in torch_optimizers(optimizer):
        for state in torch_optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def loaded_adam(optimizer) -> dict:
    """Adam's settings as the (loaded) optimizer holds them, by OptimizerSettings' names."""
    group = torch_optimizers(optimizer)[0].param_groups[0]
    return {"adam_beta1": group["betas"][0], "adam_beta2": group["betas"][1],
            "adam_eps": group["eps"]}


# (model params, the optimizer's own copies) attribute pairs of Megatron-Core's optimizers: the
# mixed-precision one (fp32 copies of bf16/fp16 weights) and the distributed one (shards).
_MAIN_PARAM_GROUPS = (("float16_groups", "fp32_from_float16_groups"),
                      ("model_float16_groups", "shard_fp32_from_float16_groups"),
                      ("model_fp32_groups", "shard_fp32_groups"))


def state_tensors(optimizer, names: dict[int, str]):
    """(description, tensor) of every tensor the optimizer steps with: its main weights (the
    model's own, fp32 copies or their shards) and each one's state (Adam's ``exp_avg`` and
    ``exp_avg_sq``; not ``step``). ``names``: id of a model parameter -> its name; a copy is
    described by its model parameter's name."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    owner = dict(names)
    for inner in chained:
        for model_attr, main_attr in _MAIN_PARAM_GROUPS:
            for model_group, main_group in zip(getattr(inner, model_attr, None) or [],
                                               getattr(inner, main_attr, None) or []):
                for param, main in zip(model_group, main_group):
                    if main is not None and id(param) in names:
                        owner[id(main)] = names[id(param)]
    for torch_optimizer in torch_optimizers(optimizer):
        for group in torch_optimizer.param_groups:
            for main in group["params"]:
                name = owner.get(id(main), f"a parameter of shape {list(main.shape)}")
                yield f"{name} (the optimizer's main weight)", main
                for key, value in torch_optimizer.state.get(main, {}).items():
                    if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                        yield f"{name} (the optimizer's {key})", value
