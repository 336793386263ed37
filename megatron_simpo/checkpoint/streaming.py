"""Checkpoint reads and writes that hold a few tensors at a time: what lets the converters run
in about the model's own memory (docs/conversion.md, "Measured cost")."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_simpo.checkpoint.layout import CheckpointError, check_model_config, shard_reason
from megatron_simpo.model.architecture import ModelConfig


def own_storage(sharded: dict, model) -> None:
    """Give every tensor of ``sharded`` that is a view into a larger parameter its own copy, one
    parameter at a time, and free that parameter (the checkpoint writer would copy each view
    anyway: Megatron-Core's ``FileSystemWriterAsync`` clones views before writing)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded)
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    views: dict[int, list] = {}
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor) and value.data is not None:
            data = value.data
            if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                views.setdefault(data.untyped_storage().data_ptr(), []).append(value)
    with torch.no_grad():
        for pointer, tensors in views.items():
            for tensor in tensors:
                tensor.data = tensor.data.clone()
            if pointer in params:
                params[pointer].data = torch.empty(0, dtype=params[pointer].dtype)


def _one_fragment(sharded):
    """A layer's slice of a tensor stacked over layers, as a tensor of its own: the layer axis
    becomes a leading axis of size 1 and the fragment grid is dropped.

    Megatron-Core (0.16) describes a stacked tensor to PyTorch's checkpoint as a grid of
    fragments whose other fragments it places on "another rank"; in a world of one that is
    rank 0 again, so reading one layer's slice alone fails. A fragment without a grid is read
    by its global offsets, like any uneven shard: the same bytes of the same files.
    """
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sharded, ShardedTensorFactory):
        build = sharded.build_fn
        return replace(sharded, build_fn=lambda *args: [_one_fragment(t) for t in build(*args)])
    if not isinstance(sharded, ShardedTensor) or not sharded.prepend_axis_num:
        return sharded
    lead = (1,) * sharded.prepend_axis_num
    return replace(sharded, data=sharded.data.view(*lead, *sharded.data.shape),
                   local_shape=lead + tuple(sharded.local_shape), prepend_axis_num=0,
                   axis_fragmentations=None)


def load_model_parts(checkpoint: Path, model, parts: list[list[str]], *,
                     model_config: ModelConfig):
    """Weights only, a few tensors at a time: yields, for each list of ``model``'s state-dict
    names in ``parts``, a dict name -> loaded tensor of the parameter's shape (resharded as
    :func:`load_checkpoint` does).

    Each part is a separate read of the checkpoint, so only the tensors of the part being
    consumed need to be in memory (an exporter frees them before asking for the next). Not
    checked for NaN/inf: the caller checks each tensor.
    """
    from megatron.core import dist_checkpointing

    check_model_config(checkpoint, model_config)
    sharded = model.sharded_state_dict()
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()
              if torch.is_tensor(value)}
    for part in parts:
        subset = {name: _one_fragment(sharded.pop(name)) for name in part}
        try:
            # A part is not every fragment of its tensors, which the access check would refuse.
            loaded = dist_checkpointing.load(subset, str(checkpoint),
                                             validate_access_integrity=False)
        except BaseException as error:  # torch's CheckpointException is a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"cannot read checkpoint {checkpoint}: "
                                  f"{shard_reason(checkpoint, error)}") from error
        del subset
        yield {name: loaded.pop(name).reshape(shapes[name]) for name in part}
