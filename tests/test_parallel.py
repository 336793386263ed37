"""Parallel sizes are validated before any process group or model exists."""

import pytest
import torch.distributed as dist

from megatron_simpo.distributed import runtime
from megatron_simpo.model.architecture import ModelConfig
from megatron_simpo.distributed.parallel import ParallelConfig
from tests.tiny import tiny_hf_config

MODEL = ModelConfig.from_hf_config(tiny_hf_config("llama3"))  # 4 heads, 2 groups, 4 layers


@pytest.mark.parametrize("tp, pp, world, message", [
    (3, 1, 4, r"--tensor-model-parallel-size \(3\) x --pipeline-model-parallel-size \(1\) = 3 does not divide the world size \(4\)"),
    (2, 3, 8, "does not divide the world size"),
    (4, 1, 8, r"--tensor-model-parallel-size \(4\) must divide the number of query groups"),
    (8, 1, 8, r"--tensor-model-parallel-size \(8\) must divide the number of attention heads"),
    (1, 3, 3, r"--pipeline-model-parallel-size \(3\) must divide the number of layers"),
])
def test_bad_sizes_fail_before_anything_is_built(monkeypatch, tp, pp, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=message):
        runtime.initialize(ParallelConfig(tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp), model_config=MODEL)
    assert not dist.is_initialized()


def test_non_positive_sizes_are_refused():
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size must be a positive integer"):
        ParallelConfig(pipeline_model_parallel_size=0)


def test_data_parallel_size_is_the_remainder():
    assert ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel_size(8) == 2


def test_build_model_checks_sizes_too():
    from megatron_simpo.model.builder import build_model

    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        build_model(MODEL, ParallelConfig(tensor_model_parallel_size=8))
