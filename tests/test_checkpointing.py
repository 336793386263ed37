"""Loading weights into a model: every tensor required, Transformer Engine's extra state optional."""

from pathlib import Path

import pytest
import torch

from megatron_simpo.checkpoint.checkpointing import load_model_state


class _WithExtraState(torch.nn.Module):
    """Stands in for TE's attention core: an ``_extra_state`` in state_dict, no parameters."""

    def __init__(self):
        super().__init__()
        self.restored = None

    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state):
        self.restored = state


def _model():
    model = torch.nn.Module()
    model.linear = torch.nn.Linear(3, 2)
    model.core_attention = _WithExtraState()
    return model


def test_absent_extra_state_is_tolerated_and_weights_load():
    model, source = _model(), _model()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    assert "core_attention._extra_state" in model.state_dict()
    load_model_state(model, state, Path("ckpt"))
    assert torch.equal(model.linear.weight, source.linear.weight)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("linear.bias"), r"missing \['linear.bias'\]"),
    (lambda s: s.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
])
def test_missing_or_unexpected_weights_are_refused_by_name(change, message):
    state = dict(_model().state_dict())
    change(state)
    with pytest.raises(ValueError, match=r"ckpt does not fit the model: .*" + message):
        load_model_state(_model(), state, Path("ckpt"))
