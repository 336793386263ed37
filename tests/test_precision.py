"""FP8 settings: validation with Megatron-LM's flag names, the TransformerConfig they produce,
the sequence alignment they need, and a clear refusal where Transformer Engine or a GPU is missing.
(The FP8 step itself runs in tests/test_gpu.py.)"""

import pytest
import torch

from megatron_simpo.model.architecture import ModelConfig
from megatron_simpo.data.collate import TokenizedPair, padded_length
from megatron_simpo.model.builder import transformer_config
from megatron_simpo.distributed.parallel import ParallelConfig
from megatron_simpo.model.precision import (Fp8Config, check_fp8_support, padding_multiple,
                                            sequence_alignment)
from tests.tiny import tiny_hf_config


@pytest.mark.parametrize("settings, message", [
    (dict(format="e5m2"), "--fp8-format must be one of e4m3, hybrid"),
    (dict(format="hybrid", recipe="nvfp4"), "--fp8-recipe must be one of"),
    (dict(format="hybrid", amax_history_len=0), "--fp8-amax-history-len must be >= 1"),
    (dict(format="hybrid", amax_compute_algo="mean"), "--fp8-amax-compute-algo must be"),
    (dict(format="hybrid", margin=-1), "--fp8-margin must be >= 0"),
    (dict(format="hybrid", recipe="tensorwise", amax_history_len=1024),
     "--fp8-amax-history-len only apply to --fp8-recipe delayed"),
    (dict(format="e4m3", recipe="blockwise", margin=2, amax_compute_algo="max"),
     "--fp8-amax-compute-algo, --fp8-margin only apply to --fp8-recipe delayed"),
    (dict(format="hybrid", first_last_layers_bf16=True),
     "--first-last-layers-bf16 needs --fp8-recipe tensorwise, blockwise or mxfp8"),
    (dict(format="hybrid", recipe="tensorwise", first_last_layers_bf16=True,
          num_layers_at_end_in_bf16=-1), "--num-layers-at-end-in-bf16 must be >= 0"),
])
def test_bad_fp8_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Fp8Config(**settings)


def test_bf16_layers_must_fit_a_pipeline_stage():
    fp8 = Fp8Config(format="hybrid", recipe="tensorwise", first_last_layers_bf16=True,
                    num_layers_at_start_in_bf16=2, num_layers_at_end_in_bf16=1)
    fp8.check_model(num_layers=4, pipeline_model_parallel_size=2)  # 2 layers per stage: fits
    with pytest.raises(ValueError, match=r"--num-layers-at-start-in-bf16 \(2\) exceeds the "
                                         r"layers of a pipeline stage \(4 layers / PP 4\)"):
        fp8.check_model(num_layers=4, pipeline_model_parallel_size=4)


def test_fp8_settings_reach_megatron_transformer_config():
    """The overrides are TransformerConfig fields Megatron-Core accepts, with the values asked for;
    unset delayed-scaling knobs keep Megatron-LM's defaults."""
    model = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    fp8 = Fp8Config(format="hybrid", amax_history_len=1024, amax_compute_algo="max", margin=1)
    config = transformer_config(model, ParallelConfig(), params_dtype=torch.bfloat16,
                                **fp8.transformer_overrides())
    assert (config.fp8, config.fp8_recipe, config.fp8_margin) == ("hybrid", "delayed", 1)
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (1024, "max")
    assert not config.first_last_layers_bf16
    fp8 = Fp8Config(format="e4m3", recipe="tensorwise", first_last_layers_bf16=True,
                    num_layers_at_start_in_bf16=0, num_layers_at_end_in_bf16=2)
    config = transformer_config(model, ParallelConfig(), params_dtype=torch.bfloat16,
                                **fp8.transformer_overrides())
    assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len) == ("e4m3", "tensorwise", 1)
    assert (config.first_last_layers_bf16, config.num_layers_at_start_in_bf16,
            config.num_layers_at_end_in_bf16) == (True, 0, 2)


def test_sequence_alignment_and_padding():
    delayed, mx = Fp8Config(format="hybrid"), Fp8Config(format="e4m3", recipe="mxfp8")
    assert sequence_alignment(None, 1) == 1
    assert sequence_alignment(None, 4) == 4          # sequence parallel at TP=4
    assert sequence_alignment(delayed, 1) == 16
    assert sequence_alignment(mx, 2) == 64           # s/2 tokens per rank, multiples of 32
    assert padding_multiple(1) == 8 and padding_multiple(64) == 64 and padding_multiple(12) == 24
    pairs = [TokenizedPair(list(range(20)), list(range(30)), list(range(9)))]  # 49 inputs
    assert padded_length(pairs, 2048, padding_multiple(16)) == 64
    assert padded_length(pairs, 2048, padding_multiple(64)) == 64
    assert padded_length(pairs, 48, padding_multiple(16)) == 48   # capped by --seq-length


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_fp8_is_refused_clearly_without_transformer_engine_or_gpu():
    try:
        import transformer_engine  # noqa: F401
        message = "--fp8-format needs a CUDA GPU"
    except ImportError:
        message = "--fp8-format needs Transformer Engine, which is not installed"
    with pytest.raises(RuntimeError, match=message):
        check_fp8_support(Fp8Config(format="hybrid"))


def test_sequence_parallel_needs_tensor_parallelism():
    with pytest.raises(ValueError, match="--sequence-parallel .* needs --tensor-model-parallel-size > 1"):
        ParallelConfig(sequence_parallel=True)
    assert ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True).sequence_multiple == 4
    assert ParallelConfig(tensor_model_parallel_size=4).sequence_multiple == 1
